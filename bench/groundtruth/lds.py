"""Linear datamodeling score (LDS; Park et al., TRAK, ICML 2023).

M random subsets S_m of a fraction α of the training set are drawn from the
protocol's seed; the model is retrained on each (exactly on convex tasks,
otherwise warm-started for ``warm_epochs`` against a same-seed control) and the
query losses measured. An estimator predicts each subset's effect as the
removal of its complement (group scores, or the sum of single scores). LDS is
the mean over queries of the Spearman correlation across subsets between
prediction and actual loss change, the actual change being the mean over the
retraining seeds (TRAK averages several models per subset the same way); the
seeds' agreement gives the noise ceiling.
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


@dataclass(frozen=True)
class LdsConfig:
    """``n_subsets`` subsets of fraction ``alpha``; ``seeds`` retraining seeds (non-convex tasks)."""

    n_subsets: int = 40
    alpha: float = 0.5
    seeds: int = 2
    retrain: str = "warm"
    warm_epochs: float = 1.0
    warm_lr_factor: float = 0.1

    def __post_init__(self) -> None:
        check_retrain_mode(self.retrain)
        check_warm_epochs(self.warm_epochs)
        check_lr_factor("warm_lr_factor", self.warm_lr_factor)
        check_at_least("n_subsets", self.n_subsets, 3, "a rank correlation across subsets")
        check_at_least("seeds", self.seeds, 1)
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def plan_subsets(n_train: int, n_subsets: int, alpha: float, seed: int) -> list[np.ndarray]:
    """The *removed* complement of each subset (sorted indices), from the seed alone."""
    if not 0 < alpha < 1:
        raise ValueError(f"lds: alpha must be in (0, 1), got {alpha}")
    if n_subsets < 3:
        raise ValueError(f"lds: n_subsets must be ≥ 3 for a rank correlation, got {n_subsets}")
    generator = rng(seed, "lds", "subsets")
    kept = round(alpha * n_train)
    return [np.sort(generator.permutation(n_train)[kept:]) for _ in range(n_subsets)]


@registered("lds")
class LinearDatamodelingScore(ScoreMatrixProtocol):
    """Spearman, per query, across random α-subsets: predicted vs actual loss change."""

    Config: ClassVar[type] = LdsConfig
    version: ClassVar[str] = "2"  # 2: truth is the mean over all seeds (was the first half)
    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP})
    headline: ClassVar[str] = "lds"
    correlation: ClassVar[str] = "spearman"
    columns: ClassVar[tuple[str, ...]] = ("pearson",)
    column_noun: ClassVar[str] = "subsets"

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        cfg = self.config
        removed = plan_subsets(len(data.train), cfg.n_subsets, cfg.alpha, self.seed)
        specs = retrain_specs(task, cfg.retrain, cfg.seeds, cfg.warm_lr_factor, n_kept=len(data.train) - len(removed[0]),
                              epochs=cfg.warm_epochs)
        deltas, diagnostics = retrain_effects(task, data, base, [torch.as_tensor(r) for r in removed], specs,
                                              progress=progress, executor=executor,
                                              desc=f"lds retrains [{task.name}]")
        if specs[0].mode == "warm":
            diagnostics["warm_steps"] = float(specs[0].steps)
        return GroundTruth.from_seeds(self.name, np.array([], dtype=np.int64), deltas, diagnostics, pack_groups(removed))

    def predict(self, ev: Evaluation) -> np.ndarray:
        return predict_group_removals(ev, unpack_groups(ev.truth.extra))

    def add_columns(self, result: CellResult, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> None:
        result.add("pearson", metrics.rowwise("pearson", predicted, truth.actual))
