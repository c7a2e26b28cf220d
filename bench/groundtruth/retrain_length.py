"""Agreement as a function of retraining length (Schioppa et al., NeurIPS 2023).

Removal effects are measured after warm-started retraining from θ̂ for each of
several lengths T (in SGD steps, against a same-seed control run of the same
length), for the same removals: single points (``group_size = 1``, leave-one-out)
or seeded random groups, whose larger effects rise above the retraining noise of
deep models. Predictions are the estimator's single scores (summed over a group,
or its group scores), compared with each T separately; the headline is the mean
over T.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bench import metrics
from bench.groundtruth.base import CellResult, Evaluation, GroundTruth, Protocol, Settings
from bench.groundtruth.groups import pack_groups, predict_group_removals, unpack_groups
from bench.groundtruth.loo import base_reference, plan_removals, retrain_effects
from bench.registry import registered
from bench.seeding import rng
from estimators.base import GROUP, SINGLE
from tasks.base import RetrainSpec, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class RetrainLengthConfig:
    """``steps``: the retraining lengths T swept; ``n_removed`` removals of ``group_size`` random points
    each (1: leave-one-out); ``seeds`` for the noise ceiling."""

    n_removed: int = 30
    group_size: int = 1
    steps: tuple[int, ...] = (25, 100, 400)
    seeds: int = 2
    lr_factor: float = 0.1
    chunk: int = 10


def plan_removal_groups(n_train: int, n_removed: int, group_size: int, seed: int) -> list[np.ndarray]:
    """``n_removed`` sorted index arrays: single points (``group_size = 1``, as ``loo`` plans them) or random
    groups of ``group_size`` distinct points, from the seed alone."""
    if not 2 <= n_removed <= n_train:
        raise ValueError(f"retrain-length: n_removed must be in 2..{n_train} (correlations need two removals), "
                         f"got {n_removed}")
    if group_size == 1:
        return [np.array([i]) for i in plan_removals(n_train, n_removed, seed)]
    if not 1 < group_size < n_train:
        raise ValueError(f"retrain-length: group_size must be in 1..{n_train - 1}, got {group_size}")
    generator = rng(seed, "retrain-length", "groups")
    return [np.sort(generator.choice(n_train, group_size, replace=False)) for _ in range(n_removed)]


def _label(steps: int) -> str:
    return f"pearson@T={steps}"


@registered("retrain-length")
class RetrainLength(Protocol):
    """Removal effects (single points or random groups) after T warm-started SGD steps, for several T."""

    Config: ClassVar[type] = RetrainLengthConfig
    version: ClassVar[str] = "2"  # 2: removals stored as groups (group_size)
    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP})
    headline: ClassVar[str] = "pearson"
    column_noun: ClassVar[str] = "(removal, T) pairs"

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(_label(t) for t in self.config.steps)

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        cfg = self.config
        if not cfg.steps or min(cfg.steps) < 1:
            raise ValueError(f"retrain-length: steps must be positive step counts, got {list(cfg.steps)}")
        groups = plan_removal_groups(len(data.train), cfg.n_removed, cfg.group_size, self.seed)
        blocks, diagnostics = [], {}
        for steps in cfg.steps:
            specs = [RetrainSpec("warm", s, steps, cfg.lr_factor) for s in range(cfg.seeds)]
            deltas, diagnostics = retrain_effects(task, data, base, [torch.as_tensor(g) for g in groups], specs,
                                                  base_reference, chunk=cfg.chunk, progress=progress,
                                                  desc=f"retrain-length T={steps} [{task.name}]")
            blocks.append(deltas)
        stacked = np.concatenate(blocks, axis=2)  # [S, Q, T·R], T-major
        extra = {"steps": np.array(cfg.steps), **pack_groups(groups)}  # the columns: each removal, for each T
        return GroundTruth(self.name, np.array([], dtype=np.int64), stacked[0], diagnostics,
                           stacked[1:] if cfg.seeds > 1 else None, extra)

    def predict(self, ev: Evaluation) -> np.ndarray:
        removals = predict_group_removals(ev, unpack_groups(ev.truth.extra))
        return np.tile(removals, (1, len(ev.truth.extra["steps"])))

    def measure(self, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> CellResult:
        result = CellResult(predicted=predicted, actual=truth.actual)
        width = len(truth.extra["offsets"]) - 1
        per_length = []
        for block, steps in enumerate(truth.extra["steps"].tolist()):
            columns = slice(block * width, (block + 1) * width)
            values = metrics.per_query(predicted[:, columns], truth.actual[:, columns], settings.top_k)["pearson"]
            result.add(_label(steps), values, settings)
            per_length.append(values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a query undefined at every T stays NaN
            result.add("pearson", np.nanmean(np.stack(per_length), axis=0), settings)
        return result
