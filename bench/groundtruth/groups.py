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

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.cluster.vq
import torch
from torch import Tensor

from bench import metrics
from bench.groundtruth.base import CellResult, Evaluation, GroundTruth, Protocol, Settings, checked
from bench.groundtruth.loo import base_reference, retrain_effects
from bench.registry import registered
from bench.seeding import rng
from estimators.base import GROUP, SINGLE
from tasks.base import RetrainSpec, Task, TaskData, TrainedModel

GROUP_KINDS = ("random", "same-class", "cluster")
RETRAIN_MODES = ("warm", "scratch")


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
    chunk: int = 25


def warm_steps(task: Task, n_kept: int, epochs: float) -> int:
    """SGD steps in ``epochs`` passes over ``n_kept`` points with the task's batch size."""
    batch = getattr(getattr(task, "recipe", None), "batch_size", 64)
    return max(1, round(epochs * math.ceil(n_kept / batch)))


def retrain_specs(task: Task, retrain: str, seeds: int, steps: int, lr_factor: float) -> list[RetrainSpec]:
    if retrain not in RETRAIN_MODES:
        raise ValueError(f"unknown retrain mode {retrain!r}. Valid: {', '.join(RETRAIN_MODES)}")
    if task.convex:
        return [RetrainSpec("exact")]
    return [RetrainSpec(retrain, s, steps, lr_factor) for s in range(seeds)]


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


def pack_groups(groups: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    return {"members": np.concatenate(groups), "offsets": np.cumsum([0, *map(len, groups)])}


def unpack_groups(extra: dict[str, np.ndarray]) -> list[np.ndarray]:
    offsets = extra["offsets"]
    return [extra["members"][offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def predict_group_removals(ev: Evaluation, groups: Sequence[np.ndarray]) -> np.ndarray:
    """``[Q, G]`` predicted query-loss change per removed group: group scores if the estimator has them,
    else the sum of its single-point scores over each group."""
    device = ev.data.train.targets.device
    tensors = [torch.as_tensor(g, dtype=torch.long, device=device) for g in groups]
    shape = (len(ev.queries), len(groups))
    if GROUP in ev.estimator.capabilities:
        return checked(ev.estimator.score_groups(ev.queries, tensors), shape)
    union = np.unique(np.concatenate(groups))
    singles = checked(ev.estimator.score(ev.queries, torch.as_tensor(union, dtype=torch.long, device=device)),
                      (len(ev.queries), len(union)))
    return np.stack([singles[:, np.searchsorted(union, g)].sum(1) for g in groups], axis=1)


def _label(kind: str, fraction: float) -> str:
    return f"{kind}@{100 * fraction:g}%"


@registered("group")
class GroupRemoval(Protocol):
    """Remove whole groups (random, same-class, feature-cluster; 1%–30% of the data) and retrain."""

    Config: ClassVar[type] = GroupRemovalConfig
    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP})
    headline: ClassVar[str] = "pearson"
    columns: ClassVar[tuple[str, ...]] = ("spearman", "pearson_random", "pearson_same-class", "pearson_cluster",
                                          "pearson_coherent_large")
    column_noun: ClassVar[str] = "removed groups"

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        cfg = self.config
        plan = plan_groups(task, data, base, cfg, self.seed)
        steps = warm_steps(task, len(data.train), cfg.warm_epochs)
        specs = retrain_specs(task, cfg.retrain, cfg.seeds, steps, cfg.warm_lr_factor)
        removals: list[Tensor] = [torch.as_tensor(g, dtype=torch.long) for g in plan.groups]
        deltas, diagnostics = retrain_effects(task, data, base, removals, specs, base_reference, chunk=cfg.chunk,
                                              progress=progress, desc=f"group retrains [{task.name}]")
        extra = {**pack_groups(plan.groups), "kinds": plan.kinds, "fractions": plan.fractions}
        if not task.convex:
            diagnostics["warm_steps" if cfg.retrain == "warm" else "scratch"] = float(steps)
        return GroundTruth(self.name, np.array([], dtype=np.int64), deltas[0], diagnostics,
                           deltas[1:] if len(specs) > 1 else None, extra)

    def predict(self, ev: Evaluation) -> np.ndarray:
        return predict_group_removals(ev, unpack_groups(ev.truth.extra))

    def measure(self, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> CellResult:
        result = CellResult(predicted=predicted, actual=truth.actual)
        kinds, fractions = truth.extra["kinds"], truth.extra["fractions"]
        per_cell: dict[tuple[str, float], dict[str, np.ndarray]] = {}
        for code, kind in enumerate(GROUP_KINDS):
            for fraction in np.unique(fractions):
                columns = (kinds == code) & (fractions == fraction)
                if columns.sum() >= 3:
                    per_cell[kind, float(fraction)] = metrics.per_query(predicted[:, columns], truth.actual[:, columns],
                                                                        settings.top_k)
        if not per_cell:
            raise ValueError("group: every (kind, size) cell needs at least 3 groups (raise groups_per_cell)")

        def mean_over(cells: list[tuple[str, float]], name: str) -> np.ndarray:
            """Per query, the mean over ``cells`` (cells where the query's value is undefined are skipped)."""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN query: NaN, dropped by summarise
                return np.nanmean(np.stack([per_cell[c][name] for c in cells]), axis=0)

        cells = list(per_cell)
        for name in ("pearson", "spearman"):
            result.add(name, mean_over(cells, name), settings)
        for kind in GROUP_KINDS:
            chosen = [c for c in cells if c[0] == kind]
            if chosen:
                result.add(f"pearson_{kind}", mean_over(chosen, "pearson"), settings)
        large = [c for c in cells if c[0] != "random" and c[1] >= 0.1]
        if large:
            result.add("pearson_coherent_large", mean_over(large, "pearson"), settings)
        for cell in cells:
            result.add(f"pearson[{_label(*cell)}]", per_cell[cell]["pearson"], settings)
        return result
