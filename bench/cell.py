"""One cell: fit an estimator, predict, judge against the ground truth, and build its record.

The parent process (:mod:`bench.runner`) plans the cells and writes the records;
this module runs them, in that process or, pickled as a :class:`CellJob`, in a
worker (:mod:`bench.isolation`). A cell whose estimator raises, or returns a malformed or non-finite score matrix, comes back as a
``failed`` record with its error and cause (:mod:`bench.failures`); so does a
fault of the harness inside the cell (a disk that fills while a prediction is
saved), named with its cell, and the run goes on.
"""

from __future__ import annotations

import functools
import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import environment
from bench.context import fit_context, head_view_context
from bench.failures import Failure, cause_of
from bench.groundtruth.base import Evaluation, EvaluationError, GroundTruth, Protocol, Settings
from bench.hashing import stable_hash
from bench.phase_cost import profiled
from bench.planning import Plan, PlannedComponent, PlannedTask
from bench.seeding import derive_seed
from bench.store import ResultsStore
from estimators.base import Estimator, NotApplicable, OverLimit
from tasks.base import HeadView, Params, Split, Task, TaskData, TrainedModel

NOT_APPLICABLE = "not-applicable"

Cell = tuple[PlannedComponent, PlannedComponent]


@dataclass(frozen=True)
class CellJob:
    """A task's pending cells with everything they need: runs in-process or, pickled, in a worker.
    ``truths`` holds each protocol's ground truth, or the :class:`Failure` that computing it ended in."""

    plan: Plan
    results_dir: Path
    task: Task
    data: TaskData
    base: TrainedModel
    planned: PlannedTask
    truths: dict[str, GroundTruth | Failure]
    pending: tuple[Cell, ...]
    keys: dict[tuple[str, str], str]
    predictions: dict[tuple[str, str], str]

    def messages(self) -> Iterator[tuple]:
        return CellRunner(self.plan, self.results_dir).messages(self)


@dataclass(frozen=True)
class Fitted:
    """An estimator fitted for a task (None if fitting failed or did not apply), and how to talk to it."""

    estimator: Estimator | None
    profile: Any
    failure: Failure | None
    queries: Split
    lift: Callable[[Params], Params]
    data: TaskData
    base: TrainedModel


def base_record(plan: Plan, planned: PlannedTask, base_model: int, protocol_plan: PlannedComponent,
                est: PlannedComponent, cell_key: str) -> dict[str, Any]:
    """A cell's identity and settings, as a failed record until the cell completes it."""
    suite = plan.suite
    return {
        "cell_key": cell_key, "suite": suite.name, "task": planned.spec.name, "preset": planned.spec.preset,
        "base_model": base_model,
        "base_models": sum(protocol_plan.covers(b) for b in range(planned.spec.base_models)),
        "protocol": protocol_plan.name, "estimator": est.name, "status": "failed", "error": None,
        **({"variant_of": est.cls.name} if est.name != getattr(est.cls, "name", est.name) else {}),
        "metrics": {}, "ci": {},
        "config_hash": stable_hash(planned.config, protocol_plan.config, est.config, suite.seed),
        "estimator_config": _plain(est.config), "task_config": _plain(planned.config),
        "protocol_config": _plain(protocol_plan.config), "seed": suite.seed, "threads": suite.threads,
        "top_k": suite.top_k, "headline": protocol_plan.cls.headline, "column_noun": protocol_plan.cls.column_noun,
        "device": environment.device_description(suite.device), "git_commit": environment.git_commit(),
        "versions": environment.versions(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def failed(record: dict[str, Any], failure: Failure, prefix: str = "") -> dict[str, Any]:
    """``record`` as failed with ``failure`` (its message after ``prefix``, and its cause)."""
    record.update(status="failed", error=prefix + failure.error, **failure.fields)
    return record


class CellRunner:
    """Runs a :class:`CellJob`'s cells, estimator-major, yielding ``("start", cell)`` before each and
    ``("record", cell, record)`` after it; a cell is ``(protocol name, estimator name)``."""

    def __init__(self, plan: Plan, results_dir: Path):
        self.plan, self.suite = plan, plan.suite
        self.store = ResultsStore(results_dir)
        self.device = torch.device(self.suite.device)
        #: head-view features by (model, inputs): shared by the estimators of a job (see :meth:`_view_split`)
        self._features: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def messages(self, job: CellJob) -> Iterator[tuple]:
        torch.set_num_threads(self.suite.threads)
        for est in self.plan.estimators:
            todo = [p for p, e in job.pending if e.name == est.name]
            if not todo:
                continue
            fitted: dict[str, Fitted] = {}
            for protocol_plan in todo:
                cell = (protocol_plan.name, est.name)
                yield ("start", cell)
                yield ("record", cell, self._guarded(job, protocol_plan, est, fitted))
            del fitted
            _release_memory(self.device)

    def _guarded(self, job: CellJob, protocol_plan: PlannedComponent, est: PlannedComponent,
                 fitted: dict[str, Fitted]) -> dict[str, Any]:
        """The cell's record; a fault of the harness inside it (not the estimator's) fails this cell alone."""
        cell = (protocol_plan.name, est.name)
        try:
            return self._run_cell(job, protocol_plan, est, fitted)
        except Exception as err:
            record = base_record(self.plan, job.planned, job.task.base_model, protocol_plan, est, job.keys[cell])
            return failed({**record, "task_diagnostics": job.base.diagnostics}, Failure.of(err),
                          f"cell {job.planned.spec.name}/{'/'.join(cell)}: ")

    def _fit(self, est: PlannedComponent, task: Task, data: TaskData, base: TrainedModel, planned: PlannedTask,
             fitted: dict[str, Fitted], fit_key: str) -> Fitted:
        """Fit once per (estimator, model fitted on); later protocols on the same model reuse it."""
        if fit_key in fitted:
            return fitted[fit_key]
        estimator, failure, queries, lift = None, None, data.queries, _identity
        seed = derive_seed(self.suite.seed, "estimator", est.name, planned.spec.name)
        try:  # the task's frozen features, like its data, are computed once and not charged to the estimator
            view = self._head_view(task, base, est)
            if view is not None:
                train, queries = self._view_split(view, base, data.train), self._view_split(view, base, data.queries)
        except Exception as err:
            view, failure = None, Failure.of(err, "fit failed: head view failed: ")
        with profiled(self.device) as prof:
            try:
                if failure is None:
                    if view is None:
                        ctx = fit_context(task, data, base, seed)
                    else:  # same influence on the head's parameters, over features computed once
                        ctx = head_view_context(task, view, train, seed)
                        lift = functools.partial(_prefixed, view.prefix)
                    estimator = est.cls(est.config)
                    estimator.fit(ctx)
            except NotApplicable as err:
                limit = {"limit": err.limit} if isinstance(err, OverLimit) else {}
                failure, estimator = Failure(f"{NOT_APPLICABLE}: {err}", {**cause_of(err), **limit}), None
            except Exception as err:  # a crashing estimator becomes a failed cell
                failure, estimator = Failure.of(err, "fit failed: "), None
        fitted[fit_key] = Fitted(estimator, prof, failure, queries, lift, data, base)
        return fitted[fit_key]

    def _view_split(self, view: HeadView, base: TrainedModel, split: Split) -> Split:
        """``view.split(split)``, its features computed once per (model, inputs) for every estimator of the job."""
        key = (id(base), id(split.inputs))
        if key not in self._features:
            self._features[key] = (base, split.inputs, view.split(split).inputs)  # the first two keep the ids alive
        return Split(self._features[key][2], split.targets)

    @staticmethod
    def _head_view(task: Task, base: TrainedModel, est: PlannedComponent) -> HeadView | None:
        """The task's head view, if this estimator may use it (θ̂ only, default parameter subset)."""
        if not est.cls.runs_on_head_view(est.config):
            return None
        view = task.head_view(base.params)
        return view if view is not None and task.influence_parameters == (view.prefix,) else None

    def _described(self, job: CellJob, protocol_plan: PlannedComponent, est: PlannedComponent,
                   truth: GroundTruth) -> tuple[dict[str, Any], Protocol]:
        """The cell's record with what its ground truth is (sizes, metrics, ceiling, facts), and its protocol."""
        cell = (protocol_plan.name, est.name)
        record = {**base_record(self.plan, job.planned, job.task.base_model, protocol_plan, est, job.keys[cell]),
                  "task_diagnostics": job.base.diagnostics}
        record.update(n_queries=int(truth.actual.shape[0]), n_columns=int(truth.actual.shape[1]),
                      groundtruth_diagnostics=truth.diagnostics, informative=bool(truth.diagnostics.get("informative", True)))
        protocol = protocol_plan.cls(protocol_plan.config, seed=derive_seed(self.suite.seed, "protocol", protocol_plan.name))
        record.update(columns=list(protocol.columns), metric_specs=protocol.metric_specs(self.suite.top_k),
                      ceiling=protocol.ceiling_of(truth), facts=protocol.facts(truth))
        return record, protocol

    def _run_cell(self, job: CellJob, protocol_plan: PlannedComponent, est: PlannedComponent,
                  fitted: dict[str, Fitted]) -> dict[str, Any]:
        cell = (protocol_plan.name, est.name)
        truth, cell_key, prediction_key = job.truths[protocol_plan.name], job.keys[cell], job.predictions[cell]
        if isinstance(truth, Failure):
            record = base_record(self.plan, job.planned, job.task.base_model, protocol_plan, est, cell_key)
            return failed({**record, "task_diagnostics": job.base.diagnostics}, truth, "ground truth failed: ")
        record, protocol = self._described(job, protocol_plan, est, truth)
        if not protocol.needs & est.cls.capabilities:
            record.update(status=NOT_APPLICABLE, reason="capability",
                          error=f"{protocol_plan.name} needs {' or '.join(sorted(protocol.needs))}; "
                          f"{est.name} provides {', '.join(sorted(est.cls.capabilities))}")
            return record
        settings = Settings(self.suite.top_k, self.suite.bootstrap_resamples, derive_seed(self.suite.seed, "bootstrap", cell_key))
        cached = self.store.load_prediction(prediction_key) if protocol.caches_predictions else None
        if cached is not None:  # only the judging changed (metrics): no refit, the recorded cost stands
            prediction, saved = cached
            evaluation = Evaluation(None, job.data.queries, truth, job.task, job.data, job.base, _identity, settings)
            record.update(profile=saved["profile"], estimator_diagnostics=saved["estimator_diagnostics"],
                          prediction_reused=True)
            return self._judged(record, protocol, prediction, evaluation, cell_key)
        if protocol.fits_on_own_model:
            fit = self._fit(est, job.task, protocol.fit_data(job.data, truth), truth.model, job.planned, fitted,
                            protocol_plan.name)
        else:
            fit = self._fit(est, job.task, job.data, job.base, job.planned, fitted, "base")
        return self._scored(record, protocol, fit, job.task, truth, settings, prediction_key, cell_key)

    def _scored(self, record: dict[str, Any], protocol: Protocol, fit: Fitted, task: Task, truth: GroundTruth,
                settings: Settings, prediction_key: str, cell_key: str) -> dict[str, Any]:
        """``record`` completed from a fitted estimator: its prediction timed, saved and judged."""
        fit_prof = fit.profile
        profile = {"fit_s": fit_prof.seconds, "fit_peak_mem_mb": fit_prof.peak_rss_mb, "fit_peak_cuda_mb": fit_prof.peak_cuda_mb}
        record["profile"] = profile
        if fit.estimator is None:
            if fit.failure.error.startswith(NOT_APPLICABLE):
                record.update(status=NOT_APPLICABLE, reason="limit" if "limit" in fit.failure.fields else "estimator",
                              error=fit.failure.error.removeprefix(f"{NOT_APPLICABLE}: "))
                record.update({k: v for k, v in fit.failure.fields.items() if k in ("missing_module", "limit")})
                return record
            return failed(record, fit.failure)
        evaluation = Evaluation(fit.estimator, fit.queries, truth, task, fit.data, fit.base, fit.lift, settings)
        prediction, failure = None, None
        with profiled(self.device) as prof:  # the estimator's own scoring work, without the metrics
            try:
                prediction = protocol.predict(evaluation)
            except EvaluationError as err:
                failure = Failure(str(err))
            except Exception as err:
                failure = Failure.of(err, "score failed: ")
        profile.update(score_s=prof.seconds, score_peak_mem_mb=prof.peak_rss_mb, score_peak_cuda_mb=prof.peak_cuda_mb,
                       peak_mem_mb=max(prof.peak_rss_mb, fit_prof.peak_rss_mb), rss_method=prof.rss_method,
                       own_mem_mb=_own_memory(fit_prof, prof))
        if prof.peak_cuda_mb is not None:
            profile["peak_cuda_mb"] = max(prof.peak_cuda_mb, fit_prof.peak_cuda_mb or 0.0)
        record["estimator_diagnostics"] = fit.estimator.diagnostics()
        if failure is not None:
            return failed(record, failure)
        if protocol.caches_predictions:
            self.store.save_prediction(prediction_key, prediction, {"profile": profile,
                                                                    "estimator_diagnostics": record["estimator_diagnostics"]})
        return self._judged(record, protocol, prediction, evaluation, cell_key)

    def _judged(self, record: dict[str, Any], protocol: Protocol, prediction: Any, evaluation: Evaluation,
                cell_key: str) -> dict[str, Any]:
        """``record`` completed with the protocol's metrics of ``prediction`` (and the seconds they took)."""
        started = time.perf_counter()
        try:
            result = protocol.judge(prediction, evaluation)
        except Exception as err:
            return failed(record, Failure.of(err, "judging failed: "))
        record.update(metrics=result.metrics, ci=result.ci, n_valid_queries=result.n_valid, status="ok",
                      metrics_s=time.perf_counter() - started)
        if result.details:
            record["details"] = result.details
        if result.per_query:
            record["per_query"] = {name: [round(v, 6) if math.isfinite(v) else None for v in values]
                                   for name, values in result.per_query.items()}
        if result.predicted is not None:
            self.store.save_artifact(cell_key, result.predicted.astype(np.float32), result.actual.astype(np.float32))
        return record


def _own_memory(fit: Any, score: Any) -> float | None:
    """What the estimator added to the process: its peak over fit and score above the RSS before its fit."""
    if fit.baseline_rss_mb is None:
        return None
    return max(0.0, max(fit.peak_rss_mb, score.peak_rss_mb) - fit.baseline_rss_mb)


def _identity(update: Params) -> Params:
    return update


def _prefixed(prefix: str, update: Params) -> Params:
    """A head view's parameter names back in the whole model's namespace."""
    return {f"{prefix}.{name}": value for name, value in update.items()}


def _release_memory(device: torch.device) -> None:
    """Free the last estimator's memory so the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _plain(config: Any) -> dict[str, Any]:
    return asdict(config) if is_dataclass(config) else {}
