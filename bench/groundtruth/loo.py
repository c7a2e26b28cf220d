"""Leave-one-out ground truth: remove one training point at a time and retrain.

Three registered variants, named in results:

- ``loo``: exact retraining to the unique optimum (convex tasks only);
- ``loo-warm``: from θ̂ for ``warm_epochs`` epochs of SGD without the point (Koh &
  Liang's protocol for their CNN, long enough that every removed point is
  visited). Δ is measured against a control run of the same steps and seed
  *with* the point, so drift from continued training cancels;
- ``loo-scratch``: the full recipe from scratch with the same seed and data order
  minus the point; Δ is measured against the base model of that seed.

Non-convex variants repeat everything for ``seeds`` retraining seeds; estimators
are scored against the mean over seeds, and the seeds' agreement gives the noise
ceiling (see :mod:`bench.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bench.executors import Executor
from bench.groundtruth.base import GroundTruth, ScoreMatrixProtocol, TaskShape
from bench.groundtruth.retraining import check_at_least, check_lr_factor, check_warm_epochs, retrain_effects, warm_steps
from bench.registry import registered
from bench.seeding import rng
from tasks.base import RetrainSpec, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class LooConfig:
    """``n_removed`` points sampled with the protocol's seed; ``seeds`` retraining seeds (non-convex);
    warm retrains last ``warm_epochs`` (≥ 1) epochs at ``warm_lr_factor`` × the recipe's rate."""

    n_removed: int = 100
    seeds: int = 2
    warm_epochs: float = 1.0
    warm_lr_factor: float = 0.1

    def __post_init__(self) -> None:
        check_warm_epochs(self.warm_epochs)
        check_lr_factor("warm_lr_factor", self.warm_lr_factor)
        check_at_least("n_removed", self.n_removed, 2, "a correlation across removals needs two")
        check_at_least("seeds", self.seeds, 1)


def check_removals(protocol: str, n_train: int, n_removed: int) -> None:
    """Raise ValueError unless 2 ≤ ``n_removed`` ≤ ``n_train``."""
    if not 2 <= n_removed <= n_train:
        raise ValueError(f"{protocol}: n_removed must be in 2..{n_train} (correlations need two removals; at most the "
                         f"training-set size), got {n_removed}")


def plan_removals(n_train: int, n_removed: int, seed: int) -> np.ndarray:
    """Sorted, distinct training indices to leave out, chosen from the seed alone."""
    check_removals("loo", n_train, n_removed)
    return np.sort(rng(seed, "loo", "removals").choice(n_train, size=n_removed, replace=False))


class LeaveOneOutBase(ScoreMatrixProtocol):
    Config: ClassVar[type] = LooConfig
    version: ClassVar[str] = "2"  # 2: truth is the mean over seeds; warm lengths in epochs
    mode: ClassVar[str]

    @classmethod
    def check_against(cls, config: LooConfig, task: TaskShape) -> None:
        if task.n_train is not None:
            check_removals(cls.name, task.n_train, config.n_removed)

    def n_seeds(self, task: Task) -> int:
        return 1 if task.convex else self.config.seeds

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        self.check_against(self.config, TaskShape(task.name, task.convex, len(data.train)))
        removed = plan_removals(len(data.train), self.config.n_removed, self.seed)
        steps = 0
        if self.mode == "warm":
            steps = warm_steps(task, len(data.train) - 1, self.config.warm_epochs)
        specs = [RetrainSpec(self.mode, s, steps, self.config.warm_lr_factor) for s in range(self.n_seeds(task))]
        deltas, diagnostics = retrain_effects(task, data, base, [torch.tensor([i]) for i in removed], specs,
                                              progress=progress, executor=executor,
                                              desc=f"{self.name} retrains [{task.name}]")
        if steps:
            diagnostics["warm_steps"] = float(steps)
            diagnostics["warm_epochs"] = float(self.config.warm_epochs)
        return GroundTruth.from_seeds(self.name, removed, deltas, diagnostics)


@registered("loo")
class LeaveOneOut(LeaveOneOutBase):
    """Exact leave-one-out: retrain to the unique optimum (convex tasks)."""

    mode: ClassVar[str] = "exact"

    @classmethod
    def check_against(cls, config: LooConfig, task: TaskShape) -> None:
        if not task.convex:
            raise ValueError(f"protocol 'loo' retrains exactly and needs a convex task; {task.name} is not: "
                             "use 'loo-warm' or 'loo-scratch'")
        super().check_against(config, task)


@registered("loo-warm")
class LeaveOneOutWarm(LeaveOneOutBase):
    """Warm-started from θ̂ for whole epochs without the point, against a same-seed control."""

    mode: ClassVar[str] = "warm"


@registered("loo-scratch")
class LeaveOneOutScratch(LeaveOneOutBase):
    """Retrained from scratch with the same seed and data order minus the point."""

    mode: ClassVar[str] = "scratch"
