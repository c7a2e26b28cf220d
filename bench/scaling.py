"""``ifbench profile``: how an estimator's cost grows with the training-set size n, the queries Q and the
parameter count P.

Three sweeps, each point measured ``repeats`` times (fresh estimator, fit then score every training point for
the queries) and reported by its median: n and Q on mnist-logreg (P = 7,850 fixed) and P on mnist-resnet's
whole network at several widths (n fixed; estimators with a ``parameters`` option are given every parameter).
Each sweep point runs its estimators in a spawned worker (:mod:`bench.isolation`): one past
``point_timeout_s`` is stopped and noted, and ends its sweep along that axis, as does a point slower than
``axis_stop_s`` (larger points would be slower still); repeats stop once a point has taken ``point_budget_s``.
Points are saved as they finish, and a re-run resumes.
Per estimator and axis a log–log line ``time ∝ xᵃ`` is fitted (scipy's ``linregress``; 95% interval from
its standard error and Student's t), and the line is followed to named reference scales, marked
*extrapolated* (:mod:`bench.scaling_report`, which also renders the section). Memory is the estimator's own
increment over the resident size before its fit.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.context import fit_context
from bench.phase_cost import profiled
from bench.scaling_report import AXES as AXES
from bench.scaling_report import P_AXIS_CONDITION as P_AXIS_CONDITION
from bench.scaling_report import PROFILE_FILE as PROFILE_FILE
from bench.scaling_report import Point as Point
from bench.scaling_report import SweepConfig as SweepConfig
from bench.scaling_report import figure as figure
from bench.scaling_report import fit_slope as fit_slope
from bench.scaling_report import fits as fits
from bench.scaling_report import load as load
from bench.scaling_report import render as render
from bench.scaling_report import resumable as resumable
from bench.scaling_report import save as save
from estimators.autodiff import ALL_PARAMETERS, FlatLoss, hvp_operator
from estimators.base import SINGLE, FitContext, NotApplicable
from estimators.solvers import arnoldi_eigenpairs
from tasks.logreg import MnistLogReg
from tasks.resnet import MnistResNet

#: Lanczos (Arnoldi) steps that estimate the Hessian's extreme eigenvalues for the ridge
RIDGE_ITERATIONS = 40


def _sweep_tasks(axis: str, config: SweepConfig, seed: int) -> list[tuple[Any, int]]:
    """The tasks along an axis, smallest first, each with its width (0 off the P axis)."""
    if axis in ("n", "Q"):
        base = MnistLogReg.presets["default"]
        sizes = ([(n, config.queries) for n in config.n_train] if axis == "n"
                 else [(config.n_train_for_queries, q) for q in config.n_queries])
        return [(MnistLogReg(dataclasses.replace(base, n_train=n, n_test=500, n_queries=q), seed=seed), 0)
                for n, q in sizes]
    base = MnistResNet.presets["smoke"]
    return [(MnistResNet(dataclasses.replace(base, n_train=config.n_train_for_widths, n_test=200,
                                             n_queries=config.queries, width=width), seed=seed), width)
            for width in config.widths]


def _options(cls: type, axis: str) -> Any:
    """The estimator's default options; on the P axis, every parameter where it has a ``parameters`` option."""
    config = cls.Config()
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if axis == "P" and "parameters" in fields:
        config = dataclasses.replace(config, parameters=(ALL_PARAMETERS,))
    return config


def convexifying_ridge(ctx: FitContext, *, iterations: int = RIDGE_ITERATIONS) -> float:
    """λ ≥ 0 to add to the objective's l2 so that its Hessian H at θ̂, over every parameter, is positive definite
    with condition number ≲ :data:`P_AXIS_CONDITION`: λ = 2·max(0, −μ_min) + μ_max / P_AXIS_CONDITION, with
    μ_min, μ_max the extreme Ritz values of ``iterations`` Lanczos steps on full-data HVPs. Ritz values lie
    inside H's spectrum and the extreme ones converge first, so μ_min overestimates λ_min(H) by little;
    doubling the shift covers that."""
    flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss)
    values, _ = arnoldi_eigenpairs(hvp_operator(flat, ctx.train, ctx.l2), flat.size, like=flat.theta(),
                                   iterations=min(iterations, flat.size), rank=flat.size, seed=ctx.seed)
    low, high = float(values.min()), float(values.max())
    return 2.0 * max(0.0, -low) + max(high, 0.0) / P_AXIS_CONDITION


@dataclass(frozen=True)
class PointJob:
    """One sweep point's estimators, measured one after another (in-process or, pickled, in a worker)."""

    task: Any
    data: Any
    base: Any
    estimators: tuple[tuple[str, type], ...]
    axis: str
    width: int
    config: SweepConfig
    seed: int
    threads: int
    ridge: float = 0.0

    def messages(self) -> Iterator[tuple]:
        torch.set_num_threads(self.threads)
        ctx = fit_context(self.task, self.data, self.base, self.seed)
        ctx = dataclasses.replace(ctx, l2=ctx.l2 + self.ridge)
        train_idx = torch.arange(len(self.data.train), device=self.task.device)
        for name, cls in self.estimators:
            yield ("start", (self.axis, name))
            point = _measure(name, cls, _options(cls, self.axis), ctx, self.data.queries, train_idx,
                             self.axis, _total(self.base), self.config)
            yield ("record", (self.axis, name), dataclasses.replace(point, width=self.width, ridge=self.ridge))


def _total(base: Any) -> int:
    return sum(p.numel() for p in base.params.values())


def sweep(estimators: Sequence[tuple[str, type]], axes: Sequence[str], config: SweepConfig, *, seed: int = 0,
          progress: bool = True, done: Sequence[Point] = (), on_point: Callable[[list[Point]], None] | None = None,
          isolate: bool = True, plugins: Sequence[str] = ()) -> list[Point]:
    """Measure every (estimator, axis, point) not in ``done``; a point that fails, does not apply or is stopped
    is kept with its note. ``on_point(points)`` sees the list after every new point (to save it)."""
    points = list(done)
    measured = {p.where for p in points}

    def keep(point: Point) -> None:
        points.append(point)
        measured.add(point.where)
        if on_point is not None:
            on_point(points)

    for axis in axes:
        tasks = _sweep_tasks(axis, config, seed)
        bar = tqdm(total=len(tasks) * len(estimators), desc=f"profile {axis}", disable=not progress, leave=False)
        for task, width in tasks:
            n_train, n_queries = task.config.n_train, task.config.n_queries
            todo = []
            for name, cls in estimators:
                where = (name, axis, n_train, n_queries, width)
                if where in measured:
                    continue
                stopped = _stopped_below(points, name, axis, config)
                shared = _measured_on_the_other_logreg_axis(points, name, axis, n_train, n_queries)
                if SINGLE not in cls.capabilities or stopped:
                    keep(Point(name, axis, n_train, 0, note=stopped or "no single scores", n_queries=n_queries,
                               width=width))
                elif shared is not None:  # the same task and sizes: measured once, on both axes
                    keep(dataclasses.replace(shared, axis=axis))
                else:
                    todo.append((name, cls))
            bar.update(len(estimators) - len(todo))
            if not todo:
                continue
            _run_point(task, width, axis, todo, config, seed, plugins=plugins, isolate=isolate, bar=bar, keep=keep)
        bar.close()
    return points


def _run_point(task: Any, width: int, axis: str, todo: list[tuple[str, type]], config: SweepConfig, seed: int, *,
               plugins: Sequence[str], isolate: bool, bar: Any, keep: Callable[[Point], None]) -> None:
    """Measure ``todo``'s estimators at one sweep point (a worker stopped on one goes on with the rest in a
    fresh one); each point, measured or stopped, is passed to ``keep``."""
    from bench.isolation import CellLimits, relay, run_all

    data = task.load_data()
    base = task.train(data)
    ridge = convexifying_ridge(fit_context(task, data, base, seed)) if axis == "P" else 0.0
    n_train, n_queries = task.config.n_train, task.config.n_queries
    limits = CellLimits(config.point_timeout_s, config.point_memory_mb, timeout_option="point_timeout_s",
                        memory_option="point_memory_mb")
    stopped = Point("", axis, n_train, _total(base), n_queries=n_queries, width=width, ridge=ridge)
    run_all(todo, functools.partial(PointJob, task, data, base, axis=axis, width=width, config=config, seed=seed,
                                    threads=torch.get_num_threads(), ridge=ridge),
            (lambda job: relay(job, plugins, limits)) if isolate else (lambda job: job.messages()),
            started=lambda cell: bar.set_postfix_str(f"{cell[1]} at n={n_train} Q={n_queries} width={width or '–'}"),
            kept=functools.partial(_kept, keep, todo, bar), lost=functools.partial(_lost, keep, todo, bar, stopped))


def _kept(keep: Callable[[Point], None], todo: list, bar: Any, cell: tuple[str, str], point: Point) -> list:
    """A measured point kept; its estimator is done at this size."""
    keep(point)
    bar.update(1)
    return [item for item in todo if item[0] == cell[1]]


def _lost(keep: Callable[[Point], None], todo: list, bar: Any, template: Point, cell: tuple[str, str] | None,
          reason: str, fields: dict[str, Any]) -> list:
    """The point a worker died in kept as stopped, with the reason; the others go on in a fresh worker."""
    name = cell[1] if cell else todo[0][0]
    keep(dataclasses.replace(template, estimator=name, note=f"stopped: {reason}"))
    bar.update(1)
    return [item for item in todo if item[0] == name]


def _measured_on_the_other_logreg_axis(points: Sequence[Point], name: str, axis: str, n_train: int,
                                       n_queries: int) -> Point | None:
    """The n and Q axes share one point (n = ``n_train_for_queries`` with ``queries`` queries): its measurement."""
    if axis not in ("n", "Q"):
        return None
    return next((p for p in points if p.estimator == name and p.axis in ("n", "Q") and p.axis != axis
                 and (p.n_train, p.n_queries) == (n_train, n_queries) and p.seconds is not None), None)


def _stopped_below(points: Sequence[Point], name: str, axis: str, config: SweepConfig) -> str:
    """Why the estimator's sweep along ``axis`` ended at a smaller point ("" if it goes on)."""
    for point in points:
        if point.estimator == name and point.axis == axis:
            if point.note.startswith("stopped") or point.note.startswith("over the"):
                return "stopped at the time limit at a smaller size"
            if (point.seconds or 0.0) > config.axis_stop_s:
                return f"slower than axis_stop_s = {config.axis_stop_s:g} s at a smaller size"
    return ""


def _measure(name: str, cls: type, options: Any, ctx: Any, queries: Any, train_idx: torch.Tensor, axis: str,
             total: int, config: SweepConfig) -> Point:
    fits, scores, memory, size = [], [], [], total
    where = {"n_queries": len(queries)}
    for _ in range(config.repeats):
        if sum(fits) + sum(scores) > config.point_budget_s:
            break
        estimator = cls(options)
        try:
            with profiled(ctx.device) as fit:
                estimator.fit(ctx)
            with profiled(ctx.device) as score:
                estimator.score(queries, train_idx)
        except NotApplicable as err:
            return Point(name, axis, len(ctx.train), total, note=f"not applicable: {err}", **where)
        except Exception as err:  # recorded, the sweep goes on
            return Point(name, axis, len(ctx.train), total, note=f"failed: {type(err).__name__}: {err}"[:200], **where)
        fits.append(fit.seconds)
        scores.append(score.seconds)
        if fit.baseline_rss_mb is not None:
            memory.append(max(0.0, max(fit.peak_rss_mb, score.peak_rss_mb) - fit.baseline_rss_mb))
        size = int(estimator.diagnostics().get("n_parameters", total))
        del estimator
    return Point(name, axis, len(ctx.train), size, statistics.median(fits), statistics.median(scores),
                 statistics.median(memory) if memory else None, repeats=len(fits), **where)
