"""The deterministic track: ground truth from θ̂'s own training run replayed with data weights (MAGIC's setting).

Ilyas & Engstrom (2025, "MAGIC") fix a training run (initialisation and batch order) and ask how a query's
loss after the run depends on each training point's weight in it. Here every retrain replays the base
model's own run from scratch (its seed's initialisation, its batches, the recipe's learning rates, momentum
and weight decay) with the removed points' weights set to 0; nothing else changes, so the truth is a
function of the data weights alone and has no seed noise: its ceiling is 1. Δ = loss(replay) − loss(θ̂).
Replays train several at a time as one stacked model, whose kernels round differently from θ̂'s own run;
one control replay (all weights 1) measures that difference, recorded as the float32 floor of the truth.

- ``lds-replay``: LDS over random subsets that drop ``drop_fraction`` of the training set (the headline;
  MAGIC's small-fraction regime), with the ``sweep`` fractions as further columns;
- ``loo-replay``: leave-one-out, each removed point's weight set to 0.

Both score the first ``n_queries`` queries and run on the first ``base_models`` base models (each replay is a
full training run: the track is sized apart from the seed-averaged one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench import metrics
from bench.executors import Executor
from bench.groundtruth.base import (
    CellResult,
    Evaluation,
    GroundTruth,
    ScoreMatrixProtocol,
    Settings,
    TaskShape,
    checked,
    pack_groups,
    predict_group_removals,
    unpack_groups,
)
from bench.groundtruth.loo import check_removals, plan_removals
from bench.groundtruth.retraining import check_at_least
from bench.records import Fact, fact
from bench.registry import registered
from bench.seeding import rng
from estimators.base import GROUP, REPLAY, SINGLE
from tasks.base import Split, Task, TaskData, TrainedModel


def check_replay_sizes(n_queries: int, base_models: int) -> None:
    check_at_least("n_queries", n_queries, 0, "0 scores every query")
    check_at_least("base_models", base_models, 0, "0 runs on every base model")


def check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1) (a share of the training set to drop), got {value}")


@dataclass(frozen=True)
class LdsReplayConfig:
    """``n_subsets`` subsets per fraction; the headline drops ``drop_fraction``, the columns each of ``sweep``."""

    drop_fraction: float = 0.01
    sweep: tuple[float, ...] = (0.05, 0.5)
    n_subsets: int = 12
    n_queries: int = 16
    base_models: int = 1

    def __post_init__(self) -> None:
        check_fraction("drop_fraction", self.drop_fraction)
        for value in self.sweep:
            check_fraction("every sweep fraction", value)
        if self.drop_fraction in self.sweep or len(set(self.sweep)) != len(self.sweep):
            raise ValueError(f"sweep fractions must be distinct and differ from drop_fraction = {self.drop_fraction}, "
                             f"got {list(self.sweep)}")
        check_at_least("n_subsets", self.n_subsets, 3, "a rank correlation across subsets")
        check_replay_sizes(self.n_queries, self.base_models)


@dataclass(frozen=True)
class LooReplayConfig:
    """``n_removed`` points, each replayed with its weight 0."""

    n_removed: int = 12
    n_queries: int = 16
    base_models: int = 1

    def __post_init__(self) -> None:
        check_at_least("n_removed", self.n_removed, 2, "a correlation across removals needs two")
        check_replay_sizes(self.n_queries, self.base_models)


def replay_effects(task: Task, data: TaskData, base: TrainedModel, removals: list[np.ndarray], queries: Split, *,
                   progress: bool, desc: str) -> tuple[np.ndarray, dict[str, float]]:
    """``[Q, R]`` query-loss changes from θ̂ when the points of each removal get weight 0 in θ̂'s replayed run,
    and the replays' diagnostics. The first stack also carries a control (all weights 1): its distance from θ̂
    (the same run, stacked kernels) is the float32 floor of every Δ."""
    model = task.build_model()
    with torch.no_grad():
        own = task.per_example_loss(model, base.params, queries).cpu().double().numpy()
    rows = [None, *removals]  # None: the control
    losses, bar = [], tqdm(total=len(removals), desc=desc, unit="replay", disable=not progress, leave=False)
    for first in range(0, len(rows), task.retrain_batch):
        chunk = rows[first : first + task.retrain_batch]
        weights = torch.ones(len(chunk), len(data.train))
        for row, removed in enumerate(chunk):
            if removed is not None:
                weights[row, torch.as_tensor(removed, dtype=torch.long)] = 0.0
        trained = task.replay_weighted(data, weights)
        with torch.no_grad():
            losses += [task.per_example_loss(model, params, queries).cpu().double().numpy() for params in trained]
        bar.update(sum(removed is not None for removed in chunk))
    bar.close()
    effects = np.stack(losses[1:], axis=1) - own[:, None]
    return effects, {"deterministic": 1.0, "exact_retraining": 0.0, "seeds": 1.0,
                     "replay_steps": float(task.recorded_run(data).run.steps), "replay_models": float(len(rows)),
                     "control_vs_base_rms": float(np.sqrt(np.mean((losses[0] - own) ** 2))),
                     "effect_rms": float(np.sqrt(np.mean(effects ** 2)))}


class ReplayProtocol(ScoreMatrixProtocol):
    """A truth from θ̂'s replayed run: ceiling 1, no seeds; estimators score the first ``n_queries`` queries."""

    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP, REPLAY})

    @classmethod
    def check_against(cls, config: LdsReplayConfig | LooReplayConfig, task: TaskShape) -> None:
        if task.convex:
            raise ValueError(f"{cls.name}: {task.name} is convex (solved to its optimum, not trained by a recorded "
                             "SGD run): use 'lds' or 'loo', whose retraining is exact already")

    def query_split(self, queries: Split) -> Split:
        count = self.config.n_queries or len(queries)
        return queries.subset(torch.arange(min(count, len(queries))))

    def ceiling_of(self, truth: GroundTruth) -> float | None:
        return 1.0

    def facts(self, truth: GroundTruth) -> list[Fact]:
        gt = truth.diagnostics
        return [*super().facts(truth),
                fact("every retrain replays θ̂'s own run ({} SGD steps from its initialisation, its batches) with the "
                     "removed points' weights set to 0: {} replays, the control included", int(gt["replay_steps"]),
                     int(gt["replay_models"])),
                fact("float32 floor: a control replay (all weights 1, stacked kernels) differs from θ̂ itself by "
                     "RMS {} in query loss; the columns' effects have RMS {}", f"{gt['control_vs_base_rms']:.2e}",
                     f"{gt['effect_rms']:.2e}")]


@registered("lds-replay")
class LdsReplay(ReplayProtocol):
    """Spearman, per query, across random subsets dropping a small fraction, each θ̂'s run replayed without them."""

    Config: ClassVar[type] = LdsReplayConfig
    headline: ClassVar[str] = "lds"
    correlation: ClassVar[str] = "spearman"
    column_noun: ClassVar[str] = "subsets"

    def __init__(self, config: LdsReplayConfig, *, seed: int):
        super().__init__(config, seed=seed)
        self.columns = tuple(sweep_metric(f) for f in config.sweep)

    def fractions(self) -> tuple[float, ...]:
        return (self.config.drop_fraction, *self.config.sweep)

    def plan(self, n_train: int) -> list[np.ndarray]:
        """Per fraction (headline first), ``n_subsets`` sorted sets of ``round(f·n)`` (≥ 1) points to drop."""
        found = []
        for fraction in self.fractions():
            generator, size = rng(self.seed, "lds-replay", f"{fraction:g}"), max(1, round(fraction * n_train))
            found += [np.sort(generator.permutation(n_train)[:size]) for _ in range(self.config.n_subsets)]
        return found

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        removed = self.plan(len(data.train))
        effects, diagnostics = replay_effects(task, data, base, removed, self.query_split(data.queries),
                                              progress=progress, desc=f"lds-replay replays [{task.name}]")
        diagnostics.update(drop_fraction=self.config.drop_fraction, n_subsets=float(self.config.n_subsets))
        return GroundTruth(self.name, np.array([], dtype=np.int64), effects, diagnostics, None, pack_groups(removed))

    def blocks(self, truth: GroundTruth) -> list[np.ndarray]:
        return [np.arange(self.config.n_subsets)]

    def predict(self, ev: Evaluation) -> np.ndarray:
        return predict_group_removals(_on_queries(ev, self.query_split(ev.queries)), unpack_groups(ev.truth.extra))

    def add_columns(self, result: CellResult, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> None:
        m = self.config.n_subsets
        for i, fraction in enumerate(self.config.sweep, start=1):
            block = slice(i * m, (i + 1) * m)
            result.add(sweep_metric(fraction), metrics.rowwise("spearman", predicted[:, block], truth.actual[:, block]))

    def facts(self, truth: GroundTruth) -> list[Fact]:
        sweep = ", ".join(f"{100 * f:g}%" for f in self.config.sweep)
        return [fact("headline LDS at drop fraction {} ({} subsets); sweep columns at {} ({} subsets each)",
                     f"{100 * self.config.drop_fraction:g}%", self.config.n_subsets, sweep, self.config.n_subsets),
                *super().facts(truth)]


@registered("loo-replay")
class LooReplay(ReplayProtocol):
    """Leave-one-out, each removal θ̂'s run replayed with the point's weight 0."""

    Config: ClassVar[type] = LooReplayConfig

    @classmethod
    def check_against(cls, config: LooReplayConfig, task: TaskShape) -> None:
        super().check_against(config, task)
        if task.n_train is not None:
            check_removals(cls.name, task.n_train, config.n_removed)

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        removed = plan_removals(len(data.train), self.config.n_removed, self.seed)
        effects, diagnostics = replay_effects(task, data, base, [np.array([i]) for i in removed],
                                              self.query_split(data.queries), progress=progress,
                                              desc=f"loo-replay replays [{task.name}]")
        return GroundTruth(self.name, removed, effects, diagnostics)

    def predict(self, ev: Evaluation) -> np.ndarray:
        index = torch.as_tensor(ev.truth.train_idx, dtype=torch.long, device=ev.data.train.targets.device)
        return checked(ev.estimator.score(self.query_split(ev.queries), index), ev.truth.actual.shape)


def sweep_metric(fraction: float) -> str:
    """The metric name of the LDS at one sweep fraction (``lds_drop_0.05``)."""
    return f"lds_drop_{fraction:g}"


def _on_queries(ev: Evaluation, queries: Split) -> Evaluation:
    return replace(ev, queries=queries)
