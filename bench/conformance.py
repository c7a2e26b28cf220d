"""``ifbench check-estimator``: conformance checks, chosen by what the estimator declares, on a tiny convex task.

The task (``toy-logreg``: 60 points, 3 classes, 4 features) is retrained exactly
without every training point, without a few groups and without one set, so each
declared capability is checked against its closed-form answer in seconds:

- ``single``: shape, dtype and finiteness; a fresh instance gives the same scores;
  a subset of columns gives those columns; mean per-query Pearson with exact
  leave-one-out ≥ :data:`MIN_AGREEMENT` (baselines exempt);
- ``group``: the same for ``score_groups`` against exact group removals;
- ``parameter-update``: finite, known parameter names, and the update's cosine
  with the exact Δθ = θ_R − θ̂ over the coordinates it moves ≥ :data:`MIN_AGREEMENT`;
- ``replay`` alone (``magic``): on a tiny recorded SGD run instead (:mod:`bench.conformance_replay`);
- ``self-influence``: shape, finiteness, and positive for ≥ :data:`MIN_POSITIVE` of the
  points (the exact rise of a point's own loss when it is removed is positive for all),
  its Spearman with that rise reported.

(sklearn's ``check_estimator`` is the model: checks generated per declared tag.)
An exception anywhere becomes a failed check naming the step, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch

from bench import metrics
from bench.context import fit_context
from bench.groundtruth.base import validate_scores
from estimators.base import GROUP, PARAMETER_UPDATE, REPLAY, SELF_INFLUENCE, SINGLE, Estimator, FitContext
from tasks.logreg import ToyLogReg

#: A sign-and-sanity bar, not a quality bar (the leaderboard measures quality): random scores give
#: |r| < 0.1 here, a flipped sign gives r < 0, and methods that do not target leave-one-out by design
#: (TracIn, gradient cosine, GIF moving 5% of the parameters) land between 0.4 and 0.7.
MIN_AGREEMENT = 0.25
#: Self-influence is checked on every SELF_STRIDE-th training point (an iterative solver pays one solve each).
SELF_STRIDE = 4
#: Share of points whose self-influence must be positive (the exact rise is positive for all of them).
MIN_POSITIVE = 0.9
SIGN_HINT = "; a negative value suggests the sign convention is flipped: predict loss(θ₋z) − loss(θ̂)"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ToyProblem:
    """The toy task at θ̂ and its exact answers: ``actual [Q, n]`` leave-one-out query effects, ``group_actual
    [Q, G]`` for ``groups``, ``update_actual`` (θ_R − θ̂ for removing ``update_removed``), ``self_actual [n]``."""

    task: ToyLogReg
    ctx: FitContext
    queries: Any
    train_idx: torch.Tensor
    actual: np.ndarray
    groups: tuple[torch.Tensor, ...] = ()
    group_actual: np.ndarray | None = None
    update_removed: torch.Tensor | None = None
    update_actual: dict[str, torch.Tensor] | None = None
    self_actual: np.ndarray | None = None


def toy_problem(seed: int = 0) -> ToyProblem:
    """The toy task trained to ‖∇J‖ ≤ 1e-12 and its exact answers (see :class:`ToyProblem`), plus the
    checkpoints of an SGD run on the same objective, for TracIn."""
    task = ToyLogReg(ToyLogReg.presets["default"], seed=seed)
    data = task.load_data()
    base = task.train(data)
    n = len(data.train)
    train_idx = torch.arange(n)
    groups = tuple(torch.sort(g).values for g in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(6))
    model = task.build_model()
    with torch.no_grad():
        base_loss = task.per_example_loss(model, base.params, data.queries)
        retrained = task.retrain_without(data, base, [i[None] for i in train_idx])
        actual = torch.stack([task.per_example_loss(model, r.params, data.queries) - base_loss for r in retrained], 1)
        own = task.per_example_loss(model, base.params, data.train)
        self_actual = torch.stack([task.per_example_loss(model, r.params, data.train.subset(i[None]))[0]
                                   for r, i in zip(retrained, train_idx, strict=True)]) - own
        by_group = task.retrain_without(data, base, list(groups))
        group_actual = torch.stack([task.per_example_loss(model, r.params, data.queries) - base_loss for r in by_group], 1)
    update = {k: by_group[0].params[k] - base.params[k] for k in base.params}
    return ToyProblem(task, fit_context(task, data, base, seed), data.queries, train_idx, actual.numpy(), groups,
                      group_actual.numpy(), groups[0], update, self_actual.numpy())


#: The steps of a check, in order (``step`` callbacks receive them as they start).
STEPS = ("toy task and its exact answers", "fit", "single scores", "group scores", "parameter update",
         "self-influence", "fit and score a fresh instance")


def _agreement(name: str, value: float, baseline: bool, what: str) -> Check:
    if baseline:
        return Check(name, True, f"baseline: {what} {value:.3f}, not required")
    passed = bool(np.isfinite(value) and value >= MIN_AGREEMENT)
    hint = SIGN_HINT if not passed and value < 0 else ""
    return Check(name, passed, f"{what} {value:.3f} (needs ≥ {MIN_AGREEMENT}{hint})")


def _single(estimator: Estimator, problem: ToyProblem, baseline: bool) -> list[Check]:
    scores = estimator.score(problem.queries, problem.train_idx)
    problem_text = validate_scores(scores, problem.actual.shape)
    checks = [Check("shape, dtype, finite", problem_text is None,
                    problem_text or f"float32 tensor {tuple(scores.shape)}, all finite")]
    if problem_text:
        return checks
    subset = problem.train_idx[::3]
    part = estimator.score(problem.queries, subset)
    consistent = tuple(part.shape) == (len(problem.queries), len(subset)) and torch.allclose(
        part, scores[:, ::3], rtol=1e-4, atol=1e-6)
    checks.append(Check("column subset", consistent, "scoring a subset of columns gives those columns" if consistent
                        else "scores for a subset of training points differ from the full matrix's columns"))
    pearson = float(np.nanmean(metrics.per_query(scores.numpy(), problem.actual)["pearson"]))
    checks.append(_agreement("agreement with exact LOO", pearson, baseline, "mean per-query Pearson"))
    return checks


def _group(estimator: Estimator, problem: ToyProblem, baseline: bool) -> list[Check]:
    scores = estimator.score_groups(problem.queries, list(problem.groups))
    problem_text = validate_scores(scores, problem.group_actual.shape)
    if problem_text:
        return [Check("group scores: shape, dtype, finite", False, problem_text.replace("score()", "score_groups()"))]
    pearson = float(np.nanmean(metrics.rowwise("pearson", scores.numpy(), problem.group_actual)))
    return [Check("group scores: shape, dtype, finite", True, f"float32 tensor {tuple(scores.shape)}, all finite"),
            _agreement("group scores vs exact group removal", pearson, baseline, "mean per-query Pearson")]


def _update(estimator: Estimator, problem: ToyProblem, baseline: bool) -> list[Check]:
    delta = estimator.update(problem.update_removed)
    unknown = sorted(set(delta) - set(problem.update_actual))
    if unknown or not all(torch.isfinite(v).all() for v in delta.values()):
        why = f"unknown parameters {unknown}" if unknown else "non-finite values"
        return [Check("parameter update: names, finite", False, f"update() returned {why}")]
    predicted = torch.cat([delta[k].double().flatten() for k in sorted(delta)])
    actual = torch.cat([problem.update_actual[k].double().flatten() for k in sorted(delta)])
    moved = predicted != 0
    if not moved.any():
        return [Check("parameter update: names, finite", True, "known names, finite"),
                Check("update vs exact retraining", baseline, "the update moves no parameter")]
    cosine = float(torch.nn.functional.cosine_similarity(predicted[moved], actual[moved], dim=0))
    return [Check("parameter update: names, finite", True, f"{int(moved.sum())} of {len(moved)} coordinates moved"),
            _agreement("update vs exact retraining", cosine, baseline, "cosine with θ_R − θ̂ on the moved coordinates")]


def _self(estimator: Estimator, problem: ToyProblem, baseline: bool) -> list[Check]:
    """Removing a point raises its own loss (the exact rise is > 0 for every point here), so a conforming
    self-influence is positive almost everywhere; how it ranks against the exact rise is reported, not required
    (TracIn's Σ η_k ‖∇ℓ_k‖² measures a point's training history, not its leverage at θ̂)."""
    idx = problem.train_idx[::SELF_STRIDE]
    values = estimator.self_influence(idx)
    problem_text = validate_scores(values, (len(idx),))
    if problem_text:
        return [Check("self-influence: shape, dtype, finite", False,
                      problem_text.replace("score()", "self_influence()"))]
    positive = float((values > 0).double().mean())
    rho = float(scipy.stats.spearmanr(values.numpy(), problem.self_actual[idx.numpy()]).statistic)
    passed = baseline or positive >= MIN_POSITIVE
    hint = "" if passed else "; mostly ≤ 0 suggests the sign convention is flipped: predict loss(θ₋z, z) − loss(θ̂, z)"
    return [Check("self-influence: shape, dtype, finite", True, f"float32 tensor {(len(idx),)}, all finite"),
            Check("self-influence sign", passed, f"{100 * positive:.0f}% of points positive (needs ≥ "
                  f"{100 * MIN_POSITIVE:.0f}%{hint}); Spearman with the exact rise {rho:.3f}")]


def _first_answer(estimator: Estimator, problem: ToyProblem) -> torch.Tensor:
    """The answer of the estimator's first declared capability, flattened (for the repeatability check)."""
    caps = estimator.capabilities
    if SINGLE in caps:
        return estimator.score(problem.queries, problem.train_idx).flatten()
    if GROUP in caps:
        return estimator.score_groups(problem.queries, list(problem.groups)).flatten()
    if SELF_INFLUENCE in caps:
        return estimator.self_influence(problem.train_idx[::SELF_STRIDE])
    return torch.cat([v.flatten() for _, v in sorted(estimator.update(problem.update_removed).items())])


_BY_CAPABILITY: tuple[tuple[str, str, Callable[[Estimator, ToyProblem, bool], list[Check]]], ...] = (
    (SINGLE, "single scores", _single), (GROUP, "group scores", _group),
    (PARAMETER_UPDATE, "parameter update", _update), (SELF_INFLUENCE, "self-influence", _self))


def _guarded(name: str, run: Callable[[], list[Check]]) -> list[Check]:
    try:
        return run()
    except Exception as err:
        return [Check(name, False, f"{type(err).__name__}: {err}")]


def _repeatable(cls: type[Estimator], config: Any, problem: ToyProblem, first: Estimator) -> Check:
    """A fresh instance, fitted again, gives the same answer as the first (for its first capability)."""
    again = cls(config)
    again.fit(problem.ctx)
    a, b = _first_answer(first, problem), _first_answer(again, problem)
    same = tuple(a.shape) == tuple(b.shape) and torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    return Check("deterministic", same, "a fresh instance gives the same answer" if same else
                 f"max difference {float((a - b).abs().max()):.3g} between two fresh instances")


def check_estimator(cls: type[Estimator], config: Any = None, step: Callable[[str], None] | None = None) -> list[Check]:
    """Run the checks of every capability ``cls`` declares (with ``config``, default its Config() with
    ``cls.check_options``); every returned check says what it verified. ``step(name)`` is told when each of
    :data:`STEPS` starts (for progress)."""
    if config is None and cls.check_options:
        config = cls.Config(**cls.check_options)
    started = step or (lambda name: None)
    if REPLAY in cls.capabilities and not cls.capabilities & {entry[0] for entry in _BY_CAPABILITY}:
        from bench.conformance_replay import replay_checks  # a tiny SGD run: only estimators that replay one

        started(STEPS[0])  # the CLI's bar counts STEPS: a tiny recorded run stands in for the toy task
        checks = _guarded("fit", lambda: replay_checks(cls, config, _agreement, Check))
        started(STEPS[-1])
        return checks
    started(STEPS[0])
    problem = toy_problem()
    started(STEPS[1])
    estimator = None

    def fit() -> list[Check]:
        nonlocal estimator
        estimator = cls(config)
        estimator.fit(problem.ctx)
        return [Check("fit", True, "ran on toy-logreg")]

    checks = _guarded("fit", fit)
    if estimator is None or not checks[0].passed:
        return checks
    declared = [entry for entry in _BY_CAPABILITY if entry[0] in cls.capabilities]
    if not declared:
        return [*checks, Check("capabilities", False, f"declares none of {', '.join(c for c, *_ in _BY_CAPABILITY)}")]
    for _, name, run in _BY_CAPABILITY:
        started(name)
        if any(entry[1] == name for entry in declared):
            checks += _guarded(name, lambda run=run: run(estimator, problem, cls.is_baseline))
    started(STEPS[-1])
    checks.append(_guarded("deterministic", lambda: [_repeatable(cls, config, problem, estimator)])[0])
    return checks
