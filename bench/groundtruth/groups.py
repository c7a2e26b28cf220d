"""Group-removal ground truth: remove random, same-class and feature-cluster groups, retrain, measure.

Groups of each kind are drawn at several sizes (fractions of the training set;
a same-class group takes at most half of its class, so with 10 classes its
largest groups are ~5% of the data)
from the protocol's seed and θ̂'s features alone (never from any estimator's
scores). Each group is removed as a whole and the model retrained: exactly on
convex tasks, otherwise warm-started from θ̂ for ``warm_epochs`` epochs against
a same-seed control run (``retrain = "scratch"`` for the full recipe).
Estimators with group scores are asked for them; the others are scored by the
sum of their single-point scores over the group. Metrics are per-query
correlations across the groups of one (kind, size) cell, averaged over cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.cluster.vq
import torch
from torch import Tensor

from bench import metrics
from bench.executors import Executor
from bench.groundtruth.base import (
    CellResult,
    Evaluation,
    GroundTruth,
    ScoreMatrixProtocol,
    Settings,
    mean_over_blocks,
    pack_groups,
    predict_group_removals,
    unpack_groups,
)
from bench.groundtruth.retraining import (
    check_at_least,
    check_lr_factor,
    check_retrain_mode,
    check_warm_epochs,
    retrain_effects,
    retrain_specs,
)
from bench.registry import registered
from bench.seeding import rng
from estimators.base import GROUP, SINGLE
from tasks.base import Task, TaskData, TrainedModel

GROUP_KINDS = ("random", "same-class", "cluster")


@dataclass(frozen=True)
class GroupRemovalConfig:
    """``groups_per_cell`` groups of each kind at each fraction; ``seeds`` for non-convex tasks."""

    kinds: tuple[str, ...] = GROUP_KINDS
    fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3)
    groups_per_cell: int = 8
    n_clusters: int = 10
    seeds: int = 2
    retrain: str = "warm"
    warm_epochs: float = 1.0
    warm_lr_factor: float = 0.1

    def __post_init__(self) -> None:
        check_retrain_mode(self.retrain)
        check_warm_epochs(self.warm_epochs)
        check_lr_factor("warm_lr_factor", self.warm_lr_factor)
        check_at_least("groups_per_cell", self.groups_per_cell, 2, "a correlation within a block needs two")
        check_at_least("n_clusters", self.n_clusters, 1)
        check_at_least("seeds", self.seeds, 1)
        if not all(0 < f < 1 for f in self.fractions) or not self.fractions:
            raise ValueError(f"fractions must be in (0, 1), got {list(self.fractions)}")


@dataclass(frozen=True)
class GroupPlan:
    """Groups (training indices) with their kind and fraction."""

    groups: tuple[np.ndarray, ...]
    kinds: np.ndarray
    fractions: np.ndarray


def plan_groups(task: Task, data: TaskData, base: TrainedModel, config: GroupRemovalConfig, seed: int) -> GroupPlan:
    n = len(data.train)
    generator = rng(seed, "groups")
    labels = data.train.targets.cpu().numpy()
    unknown = set(config.kinds) - set(GROUP_KINDS)
    if unknown:
        raise ValueError(f"unknown group kinds {sorted(unknown)}. Valid: {', '.join(GROUP_KINDS)}")
    bad = [f for f in config.fractions if not 0 < f < 1]
    if bad:
        raise ValueError(f"group fractions must be in (0, 1), got {bad}")
    centroids = features = None
    if "cluster" in config.kinds:
        with torch.no_grad():
            raw = task.embed(base.params, data.train).double().cpu().numpy()
        features = (raw - raw.mean(0)) / (raw.std(0) + 1e-8)
        centroids, _ = scipy.cluster.vq.kmeans2(features, config.n_clusters, minit="++", seed=rng(seed, "kmeans"))
    groups, kinds, fractions = [], [], []
    for kind_code, kind in enumerate(GROUP_KINDS):
        if kind not in config.kinds:
            continue
        for fraction in config.fractions:
            size = max(1, round(fraction * n))
            for _ in range(config.groups_per_cell):
                if kind == "random":
                    members = generator.choice(n, size, replace=False)
                elif kind == "same-class":  # at most half of one class: removing a whole class is class-removal's job
                    pool = np.flatnonzero(labels == generator.choice(np.unique(labels)))
                    members = generator.choice(pool, max(1, min(size, len(pool) // 2)), replace=False)
                else:  # the points nearest a random k-means centroid in θ̂'s penultimate features
                    centre = centroids[generator.integers(len(centroids))]
                    members = np.argsort(((features - centre) ** 2).sum(1), kind="stable")[:size]
                groups.append(np.sort(members))
                kinds.append(kind_code)
                fractions.append(fraction)
    return GroupPlan(tuple(groups), np.array(kinds), np.array(fractions))


def _label(kind: str, fraction: float) -> str:
    return f"{kind}@{100 * fraction:g}%"


@registered("group")
class GroupRemoval(ScoreMatrixProtocol):
    """Remove whole groups (random, same-class, feature-cluster; 1%–30% of the data) and retrain."""

    Config: ClassVar[type] = GroupRemovalConfig
    version: ClassVar[str] = "2"  # 2: truth is the mean over seeds
    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP})
    headline: ClassVar[str] = "pearson"
    columns: ClassVar[tuple[str, ...]] = ("spearman", "pearson_random", "pearson_same-class", "pearson_cluster",
                                          "pearson_coherent_large")
    column_noun: ClassVar[str] = "removed groups"

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        cfg = self.config
        plan = plan_groups(task, data, base, cfg, self.seed)
        specs = retrain_specs(task, cfg.retrain, cfg.seeds, cfg.warm_lr_factor, n_kept=len(data.train),
                              epochs=cfg.warm_epochs)
        removals: list[Tensor] = [torch.as_tensor(g, dtype=torch.long) for g in plan.groups]
        deltas, diagnostics = retrain_effects(task, data, base, removals, specs,
                                              progress=progress, executor=executor, desc=f"group retrains [{task.name}]")
        extra = {**pack_groups(plan.groups), "kinds": plan.kinds, "fractions": plan.fractions}
        if specs[0].mode == "warm":
            diagnostics["warm_steps"] = float(specs[0].steps)
        return GroundTruth.from_seeds(self.name, np.array([], dtype=np.int64), deltas, diagnostics, extra)

    def predict(self, ev: Evaluation) -> np.ndarray:
        return predict_group_removals(ev, unpack_groups(ev.truth.extra))

    def cells(self, truth: GroundTruth) -> dict[tuple[str, float], np.ndarray]:
        """The columns of each (kind, size) cell that has at least 3 groups."""
        kinds, fractions = truth.extra["kinds"], truth.extra["fractions"]
        found = {}
        for code, kind in enumerate(GROUP_KINDS):
            for fraction in np.unique(fractions):
                columns = np.flatnonzero((kinds == code) & (fractions == fraction))
                if len(columns) >= 3:
                    found[kind, float(fraction)] = columns
        if not found:
            raise ValueError("group: every (kind, size) cell needs at least 3 groups (raise groups_per_cell)")
        return found

    def blocks(self, truth: GroundTruth) -> list[np.ndarray]:
        return list(self.cells(truth).values())

    def add_columns(self, result: CellResult, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> None:
        cells = self.cells(truth)
        pearson = {c: metrics.rowwise("pearson", predicted[:, cols], truth.actual[:, cols]) for c, cols in cells.items()}
        result.add("spearman", mean_over_blocks([metrics.rowwise("spearman", predicted[:, cols], truth.actual[:, cols])
                                           for cols in cells.values()]))
        for kind in GROUP_KINDS:
            chosen = [pearson[c] for c in cells if c[0] == kind]
            if chosen:
                result.add(f"pearson_{kind}", mean_over_blocks(chosen))
        large = [pearson[c] for c in cells if c[0] != "random" and c[1] >= 0.1]
        if large:
            result.add("pearson_coherent_large", mean_over_blocks(large))
        for cell, values in pearson.items():
            result.add(f"pearson[{_label(*cell)}]", values)
