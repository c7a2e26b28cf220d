"""The ground-truth protocol contract: plan and run retrains, then judge one estimator against them."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from bench import metrics
from bench.executors import Executor
from bench.records import Fact, fact
from estimators.base import GROUP, SINGLE, Estimator
from tasks.base import Params, Split, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class GroundTruth:
    """Actual effects of retrains: ``actual[q, j]`` = loss(θ₋ⱼ, z_q) − loss(θ̂, z_q) for column j.

    For leave-one-out, ``train_idx [R]`` names the removed point of column j;
    other protocols keep what defines their columns (groups, subsets, flipped
    labels, retrained parameters) in ``extra``. Same sign convention as the
    estimators. On non-convex tasks ``replicates [K, Q, C]`` are the effects
    under each of K retraining seeds and ``actual`` is their mean, which
    estimators are scored against; the seeds' agreement gives the noise ceiling.
    ``model`` is a model the protocol trained for the estimators to be fit on
    (e.g. on noisy labels).
    """

    protocol: str
    train_idx: np.ndarray
    actual: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)
    replicates: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    model: TrainedModel | None = None

    @classmethod
    def from_seeds(cls, protocol: str, train_idx: np.ndarray, deltas: np.ndarray, diagnostics: dict[str, Any],
                   extra: dict[str, np.ndarray] | None = None) -> GroundTruth:
        """``deltas [K, Q, C]`` from K retraining seeds: the truth is their mean; K ≥ 2 keeps them as replicates."""
        return cls(protocol, train_idx, deltas.mean(0), diagnostics, deltas if len(deltas) > 1 else None, extra or {})


@dataclass(frozen=True)
class TaskShape:
    """What planning knows of a task before anything is loaded or trained: its name, whether it is convex and
    its training-set size (None where only loading the data tells)."""

    name: str
    convex: bool
    n_train: int | None

    @classmethod
    def of(cls, name: str, task_cls: type[Task], config: Any) -> TaskShape:
        n_train = getattr(config, "n_train", None)
        return cls(name, bool(task_cls.convex), n_train if isinstance(n_train, int) else None)


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
    ``estimator`` is None when a cached prediction is judged again.
    """

    estimator: Estimator | None
    queries: Split
    truth: GroundTruth
    task: Task
    data: TaskData
    base: TrainedModel
    lift: Callable[[Params], Params]
    settings: Settings


@dataclass
class CellResult:
    """Metric means, the headline's 95% CI, valid-query counts; optional predicted/actual matrices to keep;
    ``per_query``: the headline's value for each query (NaN where undefined), for paired comparisons of
    estimators on the same queries (rank bands)."""

    metrics: dict[str, float] = field(default_factory=dict)
    ci: dict[str, list[float]] = field(default_factory=dict)
    n_valid: dict[str, int] = field(default_factory=dict)
    per_query: dict[str, list[float]] = field(default_factory=dict)
    predicted: np.ndarray | None = None
    actual: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, values: np.ndarray) -> None:
        """Record the mean over valid queries of per-query ``values`` under ``name``."""
        values = np.asarray(values, dtype=np.float64)
        valid = values[np.isfinite(values)]
        self.metrics[name] = float(valid.mean()) if len(valid) else float("nan")
        self.n_valid[name] = len(valid)


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
    #: Metrics (of ``headline`` and ``columns``) where lower is better; every other metric is higher-is-better.
    lower_is_better: ClassVar[frozenset[str]] = frozenset()
    #: True if ``predict`` returns one numpy array, which the runner caches apart from the metrics (so a metric
    #: or ceiling change re-judges saved predictions without refitting the estimator).
    caches_predictions: ClassVar[bool] = True
    #: False if the ground truth does not depend on θ̂ (e.g. models trained from scratch on subsets): it is then
    #: computed once per task's data, cached under a key without the base model, and shared by every base model.
    depends_on_base: ClassVar[bool] = True

    def metric_specs(self, top_k: int) -> dict[str, dict[str, Any]]:
        """``{name: {"title", "higher_is_better"}}`` for the headline and the columns, for the leaderboard."""
        return {name: {"title": metrics.metric_title(name, top_k), "higher_is_better": name not in self.lower_is_better}
                for name in (self.headline, *self.columns)}

    def __init__(self, config: Any, *, seed: int):
        self.config = config
        self.seed = seed

    @classmethod
    def check_against(cls, config: Any, task: TaskShape) -> None:
        """Raise ValueError if ``config`` cannot run on ``task`` (e.g. more removals than training points):
        called at planning, so the run stops before anything is trained or written. Nothing by default."""
        return None

    @abstractmethod
    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        """Plan the retrains (never from any estimator's scores), run them, measure."""

    def fit_data(self, data: TaskData, truth: GroundTruth) -> TaskData:
        """The data estimators are fit on (``fits_on_own_model`` protocols change it)."""
        return data

    @abstractmethod
    def predict(self, ev: Evaluation) -> Any:
        """The estimator's answer (score matrix, self-influence, parameter update), validated. This is the part
        the runner times as the estimator's scoring cost."""

    @abstractmethod
    def judge(self, prediction: Any, ev: Evaluation) -> CellResult:
        """Metrics of ``prediction`` against the ground truth (not part of the estimator's cost)."""

    def evaluate(self, ev: Evaluation) -> CellResult:
        return self.judge(self.predict(ev), ev)

    def noise_ceiling(self, truth: GroundTruth, settings: Settings) -> dict[str, Any]:
        """Diagnostics on how well any estimator can do against ``truth`` (none by default)."""
        return {}

    def facts(self, truth: GroundTruth) -> list[Fact]:
        """Sentences that describe this ground truth, for the leaderboard (its size by default)."""
        return [fact("{} queries × {} " + self.column_noun, truth.actual.shape[0], truth.actual.shape[1])]

    def replicate_seeds(self, task: Task, seeds: int) -> list[int]:
        """The training seeds of the truth's ``seeds`` replicates (``replicates[k]``): the task's replicate seeds
        0..K−1 of its base model (a warm retrain's batch order derives from them), for the published data."""
        return [task.replicate_seed(k) for k in range(seeds)]

    def ceiling_of(self, truth: GroundTruth) -> float | None:
        """The headline's ceiling (1.0 for an exact ground truth), or None where the headline has none."""
        return None


class ScoreMatrixProtocol(Protocol):
    """Protocols whose ground truth is a matrix of effects ``[Q, C]`` that estimators predict.

    The headline is, per query, the ``correlation`` (pearson or spearman) across the
    columns of each block of ``blocks(truth)``, averaged over blocks, then the mean
    over queries. Its 95% CI is a two-way bootstrap: queries and, within each block,
    columns are resampled (``aligned_blocks``: the blocks are the same removals seen
    differently, e.g. after several retraining lengths, and share one column draw).
    On non-convex tasks the noise ceiling is the same statistic with the correlation
    replaced by √ρ_K (:func:`bench.metrics.ceiling`) of the K retraining seeds.
    """

    correlation: ClassVar[str] = "pearson"
    aligned_blocks: ClassVar[bool] = False

    def blocks(self, truth: GroundTruth) -> list[np.ndarray]:
        """Column index sets the headline correlates within (default: all columns at once)."""
        return [np.arange(truth.actual.shape[1])]

    def predict(self, ev: Evaluation) -> np.ndarray:
        """The estimator's prediction of ``truth.actual`` (same shape)."""
        scores = ev.estimator.score(ev.queries, _train_idx(ev))
        return checked(scores, ev.truth.actual.shape)

    def add_columns(self, result: CellResult, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> None:
        """The leaderboard's other columns (default: Spearman, Kendall, top-k overlap across all columns)."""
        for name, values in metrics.per_query(predicted, truth.actual, settings.top_k).items():
            if name != self.headline:
                result.add(name, values)

    def judge(self, prediction: np.ndarray, ev: Evaluation) -> CellResult:
        return self.measure(prediction, ev.truth, ev.settings)

    def measure(self, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> CellResult:
        result = CellResult(predicted=predicted, actual=truth.actual)

        def statistic(rows: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
            return mean_over_blocks([metrics.rowwise(self.correlation, metrics.take(predicted, rows, b),
                                                     metrics.take(truth.actual, rows, b)) for b in blocks])

        values = statistic(np.arange(len(predicted)), self.blocks(truth))
        result.add(self.headline, values)
        result.per_query[self.headline] = [float(v) for v in values]
        result.ci[self.headline] = list(self._interval(statistic, truth, settings, result.metrics[self.headline]))
        self.add_columns(result, predicted, truth, settings)
        return result

    def noise_ceiling(self, truth: GroundTruth, settings: Settings) -> dict[str, Any]:
        """The ceiling (√ρ_K per query and block, averaged as the headline is), its two-way CI, the seeds'
        own agreement r, and whether the cell is informative (ceiling's lower bound ≥ metrics.INFORMATIVE_CEILING)."""
        if truth.replicates is None or len(truth.replicates) < 2:
            return {}
        replicates = truth.replicates

        def statistic(rows: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
            return mean_over_blocks([metrics.ceiling(self.correlation, metrics.take(replicates, rows, b)) for b in blocks])

        def agreement(rows: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
            return mean_over_blocks([metrics.seed_agreement(self.correlation, metrics.take(replicates, rows, b))
                                     for b in blocks])

        everything = np.arange(replicates.shape[1])
        value = float(np.nanmean(statistic(everything, self.blocks(truth))))
        low, high = self._interval(statistic, truth, settings, value)
        return {
            f"ceiling_{self.headline}": value,
            f"ceiling_{self.headline}_ci": [low, high],
            f"seed_agreement_{self.headline}": float(np.nanmean(agreement(everything, self.blocks(truth)))),
            "seeds": float(len(replicates)),
            "informative": bool(low >= metrics.INFORMATIVE_CEILING),
        }

    def facts(self, truth: GroundTruth) -> list[Fact]:
        gt, found = truth.diagnostics, super().facts(truth)
        if truth.replicates is not None:
            agreement = gt.get(f"seed_agreement_{self.headline}")
            found.append(fact("scored against the mean of {} retraining seeds (seed-vs-seed agreement r = {})",
                              len(truth.replicates), f"{agreement:.3f}") if agreement is not None else
                         fact("scored against the mean of {} retraining seeds", len(truth.replicates)))
        if gt.get("warm_steps") is not None:
            found.append(fact("warm-started retrains of {} epoch(s), {} steps", f"{gt['warm_epochs']:g}",
                              int(gt["warm_steps"])) if gt.get("warm_epochs") is not None else
                         fact("warm-started retrains of {} steps", int(gt["warm_steps"])))
        if gt.get("max_retrain_grad_norm") is not None:
            found.append(fact("retrains converged to ‖∇J‖ ≤ {}", f"{gt['max_retrain_grad_norm']:.1e}"))
        return found

    def ceiling_of(self, truth: GroundTruth) -> float | None:
        """√ρ_K over K ≥ 2 seeds; 1.0 for exact retraining (an oracle reaches 1); None for one noisy seed."""
        if truth.replicates is not None:
            return truth.diagnostics.get(f"ceiling_{self.headline}")
        return 1.0 if truth.diagnostics.get("exact_retraining") else None

    def _interval(self, statistic: Callable[[np.ndarray, list[np.ndarray]], np.ndarray], truth: GroundTruth,
                  settings: Settings, estimate: float) -> tuple[float, float]:
        blocks = self.blocks(truth)

        def draw(generator: np.random.Generator) -> list[np.ndarray]:
            if self.aligned_blocks:
                positions = generator.integers(0, len(blocks[0]), len(blocks[0]))
                return [b[positions] for b in blocks]
            return [b[generator.integers(0, len(b), len(b))] for b in blocks]

        return metrics.two_way_bootstrap(statistic, truth.actual.shape[0], draw, estimate=estimate,
                                         resamples=settings.resamples, seed=settings.seed)


def mean_over_blocks(per_block: list[np.ndarray]) -> np.ndarray:
    """Per query, the mean over blocks where the query's value is defined (NaN if none is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.stack(per_block), axis=0)


def pack_groups(groups: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Ragged index arrays as two flat arrays (``members``, ``offsets``) for the cache."""
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


def _train_idx(ev: Evaluation) -> Any:
    return torch.as_tensor(ev.truth.train_idx, dtype=torch.long, device=ev.data.train.targets.device)


def validate_scores(scores: Any, shape: tuple[int, ...]) -> str | None:
    """Why a score array is unusable, or None if it is fine."""
    if not isinstance(scores, torch.Tensor):
        return f"score() must return a torch.Tensor, got {type(scores).__name__}"
    if tuple(scores.shape) != tuple(shape):
        return f"score() returned shape {tuple(scores.shape)}, expected {tuple(shape)}"
    if scores.dtype != torch.float32:
        return f"score() returned dtype {scores.dtype}, expected torch.float32 (the Estimator contract)"
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
