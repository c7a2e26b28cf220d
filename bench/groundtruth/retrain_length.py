"""Agreement as a function of retraining length (Schioppa et al., NeurIPS 2023).

Removal effects are measured after warm-started retraining from θ̂ for each of
several lengths T (in epochs over the kept data, each ≥ 1 so every removed point
is visited; against a same-seed control run of the same length), for the same
removals: single points (``group_size = 1``, leave-one-out) or seeded random
groups, whose larger effects rise above the retraining noise of deep models.
Predictions are the estimator's single scores (summed over a group, or its group
scores), compared with each T separately; the headline is the mean over T. Each removal
is retrained once per seed, for the longest T: the shorter lengths are snapshots of that
run, which equal separate runs of those lengths bit for bit (``RetrainSpec.snapshots``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bench import metrics
from bench.executors import Executor
from bench.groundtruth.base import (
    CellResult,
    Evaluation,
    GroundTruth,
    ScoreMatrixProtocol,
    Settings,
    TaskShape,
    pack_groups,
    predict_group_removals,
    unpack_groups,
)
from bench.groundtruth.loo import plan_removals
from bench.groundtruth.retraining import check_at_least, check_lr_factor, check_warm_epochs, retrain_effects, warm_steps
from bench.records import Fact, fact
from bench.registry import registered
from bench.seeding import rng
from estimators.base import GROUP, SINGLE
from tasks.base import RetrainSpec, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class RetrainLengthConfig:
    """``epochs``: the retraining lengths T swept, increasing (whole passes over the kept data, each ≥ 1; one
    warm run of the longest per removal and seed yields them all);
    ``n_removed`` removals of ``group_size`` random points each (1: leave-one-out); ``seeds`` for the
    noise ceiling."""

    n_removed: int = 30
    group_size: int = 1
    epochs: tuple[float, ...] = (1.0, 2.0, 4.0)
    seeds: int = 2
    lr_factor: float = 0.1

    def __post_init__(self) -> None:
        if not self.epochs:
            raise ValueError("epochs must list at least one retraining length")
        for epochs in self.epochs:
            check_warm_epochs(epochs)
        if list(self.epochs) != sorted(set(self.epochs)):
            raise ValueError(f"epochs must be increasing (one run of the longest keeps the shorter ones), got "
                             f"{list(self.epochs)}")
        check_at_least("n_removed", self.n_removed, 2, "a correlation across removals needs two")
        check_at_least("group_size", self.group_size, 1)
        check_at_least("seeds", self.seeds, 1)
        check_lr_factor("lr_factor", self.lr_factor)


def check_removal_groups(n_train: int, n_removed: int, group_size: int) -> None:
    """Raise ValueError unless 2 ≤ ``n_removed`` ≤ ``n_train`` and 1 ≤ ``group_size`` < ``n_train``."""
    if not 2 <= n_removed <= n_train:
        raise ValueError(f"retrain-length: n_removed must be in 2..{n_train} (correlations need two removals), "
                         f"got {n_removed}")
    if not 1 <= group_size < n_train:
        raise ValueError(f"retrain-length: group_size must be in 1..{n_train - 1}, got {group_size}")


def plan_removal_groups(n_train: int, n_removed: int, group_size: int, seed: int) -> list[np.ndarray]:
    """``n_removed`` sorted index arrays: single points (``group_size = 1``, as ``loo`` plans them) or random
    groups of ``group_size`` distinct points, from the seed alone."""
    check_removal_groups(n_train, n_removed, group_size)
    if group_size == 1:
        return [np.array([i]) for i in plan_removals(n_train, n_removed, seed)]
    generator = rng(seed, "retrain-length", "groups")
    return [np.sort(generator.choice(n_train, group_size, replace=False)) for _ in range(n_removed)]


def _label(epochs: float) -> str:
    return f"pearson@{epochs:g}ep"


@registered("retrain-length")
class RetrainLength(ScoreMatrixProtocol):
    """Removal effects (single points or random groups) after T epochs of warm-started SGD, for several T."""

    Config: ClassVar[type] = RetrainLengthConfig
    version: ClassVar[str] = "3"  # 2: removals stored as groups; 3: lengths in epochs, truth the mean over seeds

    @classmethod
    def check_against(cls, config: RetrainLengthConfig, task: TaskShape) -> None:
        if task.n_train is not None:
            check_removal_groups(task.n_train, config.n_removed, config.group_size)
    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP})
    headline: ClassVar[str] = "pearson"
    aligned_blocks: ClassVar[bool] = True  # block t holds the same removals, retrained for the t-th length
    column_noun: ClassVar[str] = "(removal, T) pairs"

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(_label(t) for t in self.config.epochs)

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        cfg = self.config
        groups = plan_removal_groups(len(data.train), cfg.n_removed, cfg.group_size, self.seed)
        steps = [warm_steps(task, len(data.train) - cfg.group_size, epochs) for epochs in cfg.epochs]
        if len(set(steps)) < len(steps):
            raise ValueError(f"retrain-length: epochs {list(cfg.epochs)} round to the same step counts {steps} on "
                             f"{task.name}; choose lengths further apart")
        # one warm run of the longest length per removal and seed, its shorter lengths kept on the way
        specs = [RetrainSpec("warm", s, steps[-1], cfg.lr_factor, tuple(steps[:-1])) for s in range(cfg.seeds)]
        stacked, diagnostics = retrain_effects(task, data, base, [torch.as_tensor(g) for g in groups], specs,
                                               progress=progress, executor=executor,
                                               desc=f"retrain-length T={', '.join(f'{e:g}' for e in cfg.epochs)} epochs "
                                                    f"[{task.name}]")  # [S, Q, T·R], T-major
        extra = {"epochs": np.array(cfg.epochs, dtype=np.float64), "steps": np.array(steps), **pack_groups(groups)}
        return GroundTruth.from_seeds(self.name, np.array([], dtype=np.int64), stacked, diagnostics, extra)

    def predict(self, ev: Evaluation) -> np.ndarray:
        removals = predict_group_removals(ev, unpack_groups(ev.truth.extra))
        return np.tile(removals, (1, len(ev.truth.extra["epochs"])))

    def facts(self, truth: GroundTruth) -> list[Fact]:
        lengths = [f"{e:g}" for e in truth.extra["epochs"].tolist()]
        steps = [str(int(t)) for t in truth.extra["steps"].tolist()]
        template = "warm-started retrains of " + ", ".join(["{}"] * len(lengths)) + " epochs (" + ", ".join(
            ["{}"] * len(steps)) + " steps)"
        return [*super().facts(truth), fact(template, *lengths, *steps)]

    def blocks(self, truth: GroundTruth) -> list[np.ndarray]:
        width = len(truth.extra["offsets"]) - 1
        return [np.arange(t * width, (t + 1) * width) for t in range(len(truth.extra["epochs"]))]

    def add_columns(self, result: CellResult, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> None:
        for epochs, columns in zip(truth.extra["epochs"].tolist(), self.blocks(truth), strict=True):
            result.add(_label(epochs), metrics.rowwise("pearson", predicted[:, columns], truth.actual[:, columns]))
