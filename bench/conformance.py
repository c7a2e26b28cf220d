"""``ifbench check-estimator``: a fast conformance check on a tiny convex task.

The task (``toy-logreg``: 60 points, 3 classes, 4 features) is retrained
exactly without every training point, so an estimator's scores can be compared
with the closed-form truth in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench import metrics
from bench.context import fit_context
from bench.groundtruth.base import validate_scores
from estimators.base import SINGLE, Estimator, FitContext
from tasks.logreg import ToyLogReg

#: A sign-and-sanity bar, not a quality bar (the leaderboard measures quality): random scores give
#: |r| < 0.1 here, a flipped sign gives r < 0, and methods that do not target leave-one-out by design
#: (TracIn, gradient cosine, GIF moving 5% of the parameters) land between 0.4 and 0.7.
MIN_PEARSON = 0.25


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ToyProblem:
    task: ToyLogReg
    ctx: FitContext
    queries: Any
    train_idx: torch.Tensor
    actual: np.ndarray


def toy_problem(seed: int = 0) -> ToyProblem:
    """The toy task trained to ‖∇J‖ ≤ 1e-12 and its exact leave-one-out effects for all points
    (plus the checkpoints of an SGD run on the same objective, for TracIn)."""
    task = ToyLogReg(ToyLogReg.presets["default"], seed=seed)
    data = task.load_data()
    base = task.train(data)
    train_idx = torch.arange(len(data.train))
    model = task.build_model()
    with torch.no_grad():
        base_loss = task.per_example_loss(model, base.params, data.queries)
        retrained = task.retrain_without(data, base, [i[None] for i in train_idx])
        actual = torch.stack([task.per_example_loss(model, r.params, data.queries) - base_loss for r in retrained], 1)
    ctx = fit_context(task, data, base, seed)
    return ToyProblem(task, ctx, data.queries, train_idx, actual.numpy())


#: The steps of a check, in order (``step`` callbacks receive them as they start).
STEPS = ("toy task and its exact leave-one-out effects", "fit", "score", "fit and score a fresh instance",
         "score a subset of columns")


def check_estimator(cls: type[Estimator], config: Any = None, step: Callable[[str], None] | None = None) -> list[Check]:
    """Run the contract checks; every returned check says what it verified. ``step(name)`` is told when each
    of :data:`STEPS` starts (for progress)."""
    checks: list[Check] = []
    if SINGLE not in cls.capabilities:
        return [Check("single scores", True, "not declared: nothing to check for single-point scores")]
    started = step or (lambda name: None)
    started(STEPS[0])
    problem = toy_problem()
    try:
        estimator = cls(config)
        started(STEPS[1])
        estimator.fit(problem.ctx)
        started(STEPS[2])
        scores = estimator.score(problem.queries, problem.train_idx)
    except Exception as err:
        return [Check("fit and score", False, f"{type(err).__name__}: {err}")]
    checks.append(Check("fit and score", True, "ran on toy-logreg"))
    problem_text = validate_scores(scores, problem.actual.shape)
    checks.append(Check("shape, dtype, finite", problem_text is None,
                        problem_text or f"float tensor {tuple(scores.shape)}, all finite"))
    if problem_text:
        return checks
    checks.append(Check("float32", scores.dtype == torch.float32, f"dtype {scores.dtype}"))
    started(STEPS[3])
    again = cls(config)
    again.fit(problem.ctx)
    repeat = again.score(problem.queries, problem.train_idx)
    same = torch.allclose(scores, repeat, rtol=1e-5, atol=1e-7)
    checks.append(Check("deterministic", same, "a fresh instance gives the same scores" if same else
                        f"max difference {float((scores - repeat).abs().max()):.3g} between two fresh instances"))
    started(STEPS[4])
    subset = problem.train_idx[::3]
    part = estimator.score(problem.queries, subset)
    consistent = part.shape == (len(problem.queries), len(subset)) and torch.allclose(part, scores[:, ::3], rtol=1e-4, atol=1e-6)
    checks.append(Check("column subset", consistent, "scoring a subset of columns gives those columns" if consistent
                        else "scores for a subset of training points differ from the full matrix's columns"))
    pearson = float(np.nanmean(metrics.per_query(scores.numpy(), problem.actual)["pearson"]))
    if cls.is_baseline:
        checks.append(Check("agreement with exact LOO", True, f"baseline: mean Pearson {pearson:.3f}, not required"))
    else:
        passed = pearson >= MIN_PEARSON
        hint = "" if passed or pearson >= 0 else ("; a negative value suggests the sign convention is flipped: "
                                                   "scores must predict loss(θ₋z) − loss(θ̂)")
        checks.append(Check("agreement with exact LOO", passed,
                            f"mean per-query Pearson {pearson:.3f} (needs ≥ {MIN_PEARSON}{hint})"))
    return checks
