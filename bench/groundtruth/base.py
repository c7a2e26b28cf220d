"""The ground-truth protocol contract: plan and run retrains, then judge one estimator against them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from bench import metrics
from estimators.base import SINGLE, Estimator
from tasks.base import Params, Split, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class GroundTruth:
    """Actual effects of retrains: ``actual[q, j]`` = loss(θ₋ⱼ, z_q) − loss(θ̂, z_q) for column j.

    For leave-one-out, ``train_idx [R]`` names the removed point of column j;
    other protocols keep what defines their columns (groups, subsets, flipped
    labels, retrained parameters) in ``extra``. Same sign convention as the
    estimators. ``replicates [S, Q, C]`` are the same effects under other
    retraining seeds and give the noise ceiling. ``model`` is a model the
    protocol trained for the estimators to be fit on (e.g. on noisy labels).
    """

    protocol: str
    train_idx: np.ndarray
    actual: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)
    replicates: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    model: TrainedModel | None = None


@dataclass(frozen=True)
class Settings:
    """Suite-wide metric settings for one cell."""

    top_k: int = 10
    resamples: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class Evaluation:
    """What a protocol judges in one cell: a fitted estimator, the queries as it sees them, the truth.

    ``lift`` maps an estimator's parameter update (its own parameter names) to
    the full model's names; ``data`` and ``base`` are what the estimator was fit on.
    """

    estimator: Estimator
    queries: Split
    truth: GroundTruth
    task: Task
    data: TaskData
    base: TrainedModel
    lift: Callable[[Params], Params]
    settings: Settings


@dataclass
class CellResult:
    """Metric means, their 95% CIs and valid-query counts; optional predicted/actual matrices to keep."""

    metrics: dict[str, float] = field(default_factory=dict)
    ci: dict[str, list[float]] = field(default_factory=dict)
    n_valid: dict[str, int] = field(default_factory=dict)
    predicted: np.ndarray | None = None
    actual: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, values: np.ndarray, settings: Settings) -> None:
        """Summarise per-query ``values`` under ``name`` (mean, bootstrap CI)."""
        summary = metrics.summarise(np.asarray(values, dtype=np.float64), resamples=settings.resamples,
                                    seed=settings.seed)
        self.metrics[name] = summary.mean
        self.ci[name] = [summary.low, summary.high]
        self.n_valid[name] = summary.n_valid


class EvaluationError(Exception):
    """An estimator's output cannot be judged (wrong shape, NaN, ...): the cell is recorded as failed."""


class Protocol(ABC):
    """A way of producing ground truth by retraining, and of judging an estimator against it."""

    name: ClassVar[str]
    Config: ClassVar[type]
    version: ClassVar[str] = "1"
    #: The estimator must provide at least one of these capabilities (else: not applicable).
    needs: ClassVar[frozenset[str]] = frozenset({SINGLE})
    #: The metric that ranks estimators (higher is better), and the leaderboard's other columns.
    headline: ClassVar[str] = "pearson"
    columns: ClassVar[tuple[str, ...]] = ("spearman", "kendall", "top_k_overlap")
    #: What one column of ``actual`` is, for the leaderboard ("removed points", "groups", ...).
    column_noun: ClassVar[str] = "removed points"
    #: True if estimators are fit on ``truth.model`` (and the data it was trained on), not on θ̂.
    fits_on_own_model: ClassVar[bool] = False

    def __init__(self, config: Any, *, seed: int):
        self.config = config
        self.seed = seed

    @abstractmethod
    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        """Plan the retrains (never from any estimator's scores), run them, measure."""

    def fit_data(self, data: TaskData, truth: GroundTruth) -> TaskData:
        """The data estimators are fit on (``fits_on_own_model`` protocols change it)."""
        return data

    def predict(self, ev: Evaluation) -> np.ndarray:
        """The estimator's prediction of ``truth.actual`` (same shape)."""
        scores = ev.estimator.score(ev.queries, _train_idx(ev))
        return checked(scores, ev.truth.actual.shape)

    def measure(self, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> CellResult:
        """Per-query correlations across columns, averaged over queries."""
        result = CellResult(predicted=predicted, actual=truth.actual)
        for name, values in metrics.per_query(predicted, truth.actual, settings.top_k).items():
            result.add(name, values, settings)
        return result

    def evaluate(self, ev: Evaluation) -> CellResult:
        return self.measure(self.predict(ev), ev.truth, ev.settings)

    def noise_ceiling(self, truth: GroundTruth, settings: Settings) -> dict[str, Any]:
        """Each metric of each seed replicate against the ground truth, averaged over replicates."""
        if truth.replicates is None or len(truth.replicates) == 0:
            return {}
        results = [self.measure(rep, truth, settings) for rep in truth.replicates]
        ceiling: dict[str, Any] = {}
        for name in results[0].metrics:
            ceiling[f"ceiling_{name}"] = float(np.nanmean([r.metrics[name] for r in results]))
            ceiling[f"ceiling_{name}_ci"] = [float(np.nanmean([r.ci[name][i] for r in results])) for i in (0, 1)]
        return ceiling


def _train_idx(ev: Evaluation) -> Any:
    return torch.as_tensor(ev.truth.train_idx, dtype=torch.long, device=ev.data.train.targets.device)


def validate_scores(scores: Any, shape: tuple[int, ...]) -> str | None:
    """Why a score array is unusable, or None if it is fine."""
    if not isinstance(scores, torch.Tensor):
        return f"score() must return a torch.Tensor, got {type(scores).__name__}"
    if tuple(scores.shape) != tuple(shape):
        return f"score() returned shape {tuple(scores.shape)}, expected {tuple(shape)}"
    if not torch.is_floating_point(scores):
        return f"score() returned dtype {scores.dtype}, expected a floating dtype (float32)"
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        return f"score() returned {bad} non-finite values (NaN or inf) out of {scores.numel()}"
    return None


def checked(scores: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``scores`` as a float64 numpy array, or EvaluationError saying what is wrong with it."""
    problem = validate_scores(scores, shape)
    if problem:
        raise EvaluationError(problem)
    return scores.detach().cpu().numpy().astype(np.float64)
