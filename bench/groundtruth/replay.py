"""The deterministic track: ground truth from θ̂'s own training run replayed with data weights (MAGIC's setting).

Ilyas & Engstrom (2025, "MAGIC") fix a training run (initialisation and batch order) and ask how a query's
loss after the run depends on each training point's weight in it. Here every retrain replays the base
model's own run from scratch (its seed's initialisation, its batches, the recipe's learning rates, momentum
and weight decay) with the removed points' weights set to 0; nothing else changes, so the truth is a
function of the data weights alone and has no seed noise. Δ = loss(replay) − loss(control),
the control replayed with every weight 1 on the same stacked trainer (its members are bit-identical whatever
their position in a stack). ``recipe = "warm"`` replays the warm fine-tune from θ̂ instead (``warm_epochs`` at
``warm_lr_factor`` × the rate: the control run of the warm protocols). Two diagnostics say whether a first-order
method can reach the truth: the smoothness probe (one weight moved by 1e-3, against that share of the point's
removal: equal for a response linear in the weights, far apart for a chaotic run) and the float32 floor (the
control against the same run trained alone, whose kernels round differently), which also sets the ceiling:
what an estimator that does not reproduce the trainer's rounding can reach.

- ``lds-replay``: LDS over random subsets that drop ``drop_fraction`` of the training set (the headline;
  MAGIC's small-fraction regime), with the ``sweep`` fractions as further columns;
- ``loo-replay``: leave-one-out, each removed point's weight set to 0.

Both score the first ``n_queries`` queries and run on the first ``first_base_models`` base models (each replay is a
full training run: the track is sized apart from the seed-averaged one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from scipy.stats import chi2
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
    mean_over_blocks,
    pack_groups,
    predict_group_removals,
    unpack_groups,
)
from bench.groundtruth.loo import check_removals, plan_removals
from bench.groundtruth.retraining import check_at_least, check_lr_factor, check_warm_epochs, warm_steps
from bench.records import Fact, fact
from bench.registry import registered
from bench.seeding import rng
from estimators.base import GROUP, REPLAY, SINGLE
from tasks.base import RecordedRun, RetrainSpec, Split, Task, TaskData, TrainedModel

#: The runs a replay protocol can replay: θ̂'s own training from scratch, or a warm fine-tune from θ̂.
RECIPES = ("scratch", "warm")


def check_replay(config: LdsReplayConfig | LooReplayConfig) -> None:
    check_at_least("n_queries", config.n_queries, 0, "0 scores every query")
    check_at_least("first_base_models", config.first_base_models, 0, "0 runs on every base model")
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}. Valid recipes: {', '.join(RECIPES)}")
    check_warm_epochs(config.warm_epochs)
    check_lr_factor("warm_lr_factor", config.warm_lr_factor)


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
    first_base_models: int = 1
    recipe: str = "scratch"
    warm_epochs: float = 1.0
    warm_lr_factor: float = 0.1

    def __post_init__(self) -> None:
        check_fraction("drop_fraction", self.drop_fraction)
        for value in self.sweep:
            check_fraction("every sweep fraction", value)
        if self.drop_fraction in self.sweep or len(set(self.sweep)) != len(self.sweep):
            raise ValueError(f"sweep fractions must be distinct and differ from drop_fraction = {self.drop_fraction}, "
                             f"got {list(self.sweep)}")
        check_at_least("n_subsets", self.n_subsets, 3, "a rank correlation across subsets")
        check_replay(self)


@dataclass(frozen=True)
class LooReplayConfig:
    """``n_removed`` points, each replayed with its weight 0."""

    n_removed: int = 12
    n_queries: int = 16
    first_base_models: int = 1
    recipe: str = "scratch"
    warm_epochs: float = 1.0
    warm_lr_factor: float = 0.1

    def __post_init__(self) -> None:
        check_at_least("n_removed", self.n_removed, 2, "a correlation across removals needs two")
        check_replay(self)


#: The weight change of the smoothness probe: one point's weight 1 → 1 − PROBE in the first stack.
PROBE = 1e-3


def replay_effects(task: Task, data: TaskData, base: TrainedModel, removals: list[np.ndarray], queries: Split, *,
                   spec: RetrainSpec | None, progress: bool, desc: str) -> tuple[np.ndarray, dict[str, float]]:
    """``[Q, R]`` query-loss changes when the points of each removal get weight 0 in the replayed run (θ̂'s
    own for ``spec`` None, else the warm run ``spec`` names), each against a control replay (all weights 1) on
    the same stacked trainer, and the replays' diagnostics. The first stack also carries the smoothness probe
    (training point 0's weight at 1 − PROBE and at 0); one lone control measures the stacked kernels' floor."""
    model = task.build_model()
    probe_down, probe_out = np.ones(len(data.train)), np.ones(len(data.train))
    probe_down[0], probe_out[0] = 1 - PROBE, 0.0
    rows = [np.ones(len(data.train)), probe_down, probe_out]
    rows += [_without(len(data.train), removed) for removed in removals]
    losses, bar = [], tqdm(total=len(rows) + 1, desc=desc, unit="replay", disable=not progress, leave=False)
    for first in range(0, len(rows), task.retrain_batch):
        chunk = torch.as_tensor(np.stack(rows[first : first + task.retrain_batch]), dtype=torch.float32)
        losses += _query_losses(task, model, task.replay_weighted(data, chunk, base, spec), queries)
        bar.update(len(chunk))
    lone = _query_losses(task, model, task.replay_weighted(data, torch.ones(1, len(data.train)), base, spec), queries)
    bar.update(1)
    bar.close()
    control = losses[0]
    effects = np.stack(losses[3:], axis=1) - control[:, None]
    linear = PROBE * (losses[2] - control)  # the probe's first-order prediction from point 0's removal
    return effects, {"deterministic": 1.0, "exact_retraining": 0.0, "seeds": 1.0,
                     "replay_steps": float(task.recorded_run(data, base, spec).run.steps),
                     "replay_models": float(len(rows) + 1), "warm": float(spec is not None),
                     "control_vs_lone_rms": _rms(control - lone[0]), "effect_rms": _rms(effects),
                     "probe_rms": _rms(losses[1] - control), "probe_linear_rms": _rms(linear)}


def replay_noise(diagnostics: dict[str, float]) -> float:
    """The variance of one replay's arithmetic noise in a query loss: half the float32 floor's square (the
    control computed twice, on the stacked trainer and alone, whose kernels round differently; pooled over
    queries). The smoothness probe is no such measure: it compares a derivative with a secant over [0, 1]."""
    return diagnostics["control_vs_lone_rms"] ** 2 / 2


def _without(n: int, removed: np.ndarray) -> np.ndarray:
    weights = np.ones(n)
    weights[np.asarray(removed, dtype=np.int64)] = 0.0
    return weights


def _query_losses(task: Task, model: torch.nn.Module, trained: list, queries: Split) -> list[np.ndarray]:
    with torch.no_grad():
        return [task.per_example_loss(model, params, queries).cpu().double().numpy() for params in trained]


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(values) ** 2)))


class _ReplayScores:
    """A REPLAY estimator seen as a SINGLE one: ``score`` predicts the protocol's replayed run."""

    capabilities = frozenset({SINGLE})

    def __init__(self, estimator, recorded: RecordedRun):
        self.estimator, self.recorded = estimator, recorded

    def score(self, queries: Split, train_idx: torch.Tensor) -> torch.Tensor:
        return self.estimator.score_replay(queries, train_idx, self.recorded)


class ReplayProtocol(ScoreMatrixProtocol):
    """A truth from θ̂'s replayed run: no seeds, a ceiling from the float32 floor; estimators score the first
    ``n_queries`` queries."""

    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP, REPLAY})

    @classmethod
    def check_against(cls, config: LdsReplayConfig | LooReplayConfig, task: TaskShape) -> None:
        if task.convex:
            raise ValueError(f"{cls.name}: {task.name} is convex (solved to its optimum, not trained by a recorded "
                             "SGD run): use 'lds' or 'loo', whose retraining is exact already")

    def replay_spec(self, task: Task, data: TaskData) -> RetrainSpec | None:
        """None: θ̂'s own run from scratch; else the warm run from θ̂ (``warm_epochs`` at ``warm_lr_factor``)."""
        if self.config.recipe == "scratch":
            return None
        return RetrainSpec("warm", 0, warm_steps(task, len(data.train), self.config.warm_epochs),
                           self.config.warm_lr_factor)

    def replaying(self, ev: Evaluation) -> Evaluation:
        """``ev`` on the first ``n_queries`` queries, a REPLAY estimator scoring the run this protocol replays."""
        ev = replace(ev, queries=self.query_split(ev.queries))
        if ev.estimator is None or REPLAY not in ev.estimator.capabilities:
            return ev
        recorded = ev.task.recorded_run(ev.data, ev.base, self.replay_spec(ev.task, ev.data))
        return replace(ev, estimator=_ReplayScores(ev.estimator, recorded))

    def query_split(self, queries: Split) -> Split:
        count = self.config.n_queries or len(queries)
        return queries.subset(torch.arange(min(count, len(queries))))

    def noise_ceiling(self, truth: GroundTruth, settings: Settings) -> dict[str, object]:
        """The ceiling of an estimator that does not reproduce the trainer's rounding (:func:`replay_noise`),
        per query and block as the headline is; its 95% interval: the two-way bootstrap's lower bound at the
        noise's upper χ² bound (Q queries' floors), its upper bound at the lower; informative as elsewhere."""
        gt = truth.diagnostics
        if "control_vs_lone_rms" not in gt:
            return {}
        noise, n = replay_noise(gt), truth.actual.shape[0]

        def at(noise_var: float) -> Callable[[np.ndarray, list[np.ndarray]], np.ndarray]:
            return lambda rows, blocks: mean_over_blocks(
                [metrics.replay_ceiling(noise_var, metrics.take(truth.actual, rows, b)) for b in blocks])

        value = float(np.nanmean(at(noise)(np.arange(n), self.blocks(truth))))
        worst, best = n * noise / chi2.ppf(0.025, n), n * noise / chi2.ppf(0.975, n)
        low = self._interval(at(worst), truth, settings, float(np.nanmean(at(worst)(np.arange(n), self.blocks(truth)))))[0]
        high = self._interval(at(best), truth, settings, float(np.nanmean(at(best)(np.arange(n), self.blocks(truth)))))[1]
        return {f"ceiling_{self.headline}": value, f"ceiling_{self.headline}_ci": [max(0.0, low), high],
                "replay_noise_rms": float(np.sqrt(noise)), "informative": bool(low >= metrics.INFORMATIVE_CEILING)}

    def ceiling_of(self, truth: GroundTruth) -> float | None:
        return truth.diagnostics.get(f"ceiling_{self.headline}")

    def facts(self, truth: GroundTruth) -> list[Fact]:
        gt = truth.diagnostics
        run = (f"a warm run from θ̂ ({self.config.warm_epochs:g} epoch at {self.config.warm_lr_factor:g}× the rate, "
               f"{int(gt['replay_steps'])} SGD steps)" if gt.get("warm") else
               f"θ̂'s own run from scratch ({int(gt['replay_steps'])} SGD steps from its initialisation)")
        return [*super().facts(truth),
                fact("every retrain replays {} with its batches and the removed points' weights set to 0, against a "
                     "control replay with every weight 1: {} replays in all", run, int(gt["replay_models"])),
                fact("smoothness probe: one training point's weight 1 → {} moves the query losses by RMS {}; the "
                     "linear response (that fraction of the point's removal effect) would move them by RMS {}",
                     f"{1 - PROBE:g}", f"{gt['probe_rms']:.2e}", f"{gt['probe_linear_rms']:.2e}"),
                fact("float32 floor: the control trained on the stacked trainer differs from the same run trained "
                     "alone by RMS {} in query loss; the columns' effects have RMS {}",
                     f"{gt['control_vs_lone_rms']:.2e}", f"{gt['effect_rms']:.2e}")]


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
                                              spec=self.replay_spec(task, data), progress=progress,
                                              desc=f"lds-replay replays [{task.name}]")
        diagnostics.update(drop_fraction=self.config.drop_fraction, n_subsets=float(self.config.n_subsets))
        return GroundTruth(self.name, np.array([], dtype=np.int64), effects, diagnostics, None, pack_groups(removed))

    def blocks(self, truth: GroundTruth) -> list[np.ndarray]:
        return [np.arange(self.config.n_subsets)]

    def predict(self, ev: Evaluation) -> np.ndarray:
        return predict_group_removals(self.replaying(ev), unpack_groups(ev.truth.extra))

    def add_columns(self, result: CellResult, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> None:
        m = self.config.n_subsets
        for i, fraction in enumerate(self.config.sweep, start=1):
            block = slice(i * m, (i + 1) * m)
            result.add(sweep_metric(fraction), metrics.rowwise("spearman", predicted[:, block], truth.actual[:, block]))

    def facts(self, truth: GroundTruth) -> list[Fact]:
        text, values = "headline LDS at drop fraction {} ({} subsets)", [f"{100 * self.config.drop_fraction:g}%",
                                                                          self.config.n_subsets]
        if self.config.sweep:
            text += "; sweep columns at {} ({} subsets each)"
            values += [", ".join(f"{100 * f:g}%" for f in self.config.sweep), self.config.n_subsets]
        return [fact(text, *values), *super().facts(truth)]


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
                                              self.query_split(data.queries), spec=self.replay_spec(task, data),
                                              progress=progress, desc=f"loo-replay replays [{task.name}]")
        return GroundTruth(self.name, removed, effects, diagnostics)

    def predict(self, ev: Evaluation) -> np.ndarray:
        index = torch.as_tensor(ev.truth.train_idx, dtype=torch.long, device=ev.data.train.targets.device)
        ev = self.replaying(ev)
        return checked(ev.estimator.score(ev.queries, index), ev.truth.actual.shape)


def sweep_metric(fraction: float) -> str:
    """The metric name of the LDS at one sweep fraction (``lds_drop_0.05``)."""
    return f"lds_drop_{fraction:g}"



@dataclass(frozen=True)
class LdsReplayWarmConfig(LdsReplayConfig):
    recipe: str = "warm"


@dataclass(frozen=True)
class LooReplayWarmConfig(LooReplayConfig):
    recipe: str = "warm"


@registered("lds-replay-warm")
class LdsReplayWarm(LdsReplay):
    """``lds-replay`` on the warm fine-tune from θ̂ (``recipe = "warm"``): a short run, cheap to replay."""

    Config: ClassVar[type] = LdsReplayWarmConfig


@registered("loo-replay-warm")
class LooReplayWarm(LooReplay):
    """``loo-replay`` on the warm fine-tune from θ̂ (``recipe = "warm"``)."""

    Config: ClassVar[type] = LooReplayWarmConfig
