"""Run a planned suite (:mod:`bench.planning`): train (cached) → ground truth (cached) → cells → records.

A cell whose estimator raises, or returns a malformed or non-finite score
matrix, is recorded as ``failed`` with its error, and the run goes on. Finished
cells are skipped on a re-run, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import inspect
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench import environment, metrics
from bench.cache import ArtifactCache, in_order, load_or_none, pack_trained, pack_truth, unpack_trained, unpack_truth
from bench.config import ConfigError
from bench.context import fit_context, head_view_context
from bench.executors import Executor, InProcess, make_executor
from bench.groundtruth.base import Evaluation, EvaluationError, GroundTruth, Protocol, Settings
from bench.hashing import stable_hash
from bench.planning import Plan, PlannedComponent, PlannedTask
from bench.profile import profiled
from bench.seeding import derive_seed
from bench.store import ResultsStore
from estimators.base import Estimator, NotApplicable
from tasks.base import HeadView, Params, Split, Task, TaskData, TrainedModel

log = logging.getLogger(__name__)

NOT_APPLICABLE = "not-applicable"


@dataclass
class RunSummary:
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)


class Runner:
    """Executes a :class:`Plan` into a results directory."""

    def __init__(self, plan: Plan, results_dir: Path, *, progress: bool = True, retry_failed: bool = False,
                 plugins: Sequence[str] = ()):
        self.plan, self.suite, self.plugins = plan, plan.suite, tuple(plugins)
        self.results_dir = Path(results_dir)
        self.store = ResultsStore(self.results_dir)
        self.cache = ArtifactCache(self.results_dir / "cache")
        self.progress, self.retry_failed = progress, retry_failed
        self.device = torch.device(self.suite.device)
        #: where ground truth's retrains run (set for the length of :meth:`run`)
        self.executor: Executor = InProcess()
        #: head-view features by (model, inputs): shared by the estimators of a job (see :meth:`_view_split`)
        self._features: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def run(self) -> RunSummary:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
        torch.set_num_threads(self.suite.threads)
        summary = RunSummary()
        finished = {"ok", NOT_APPLICABLE} | (set() if self.retry_failed else {"failed"})
        done = {key: rec for key, rec in self.store.latest().items() if rec.get("status") in finished}
        with make_executor(self.suite.workers, self.suite.scheduler, self.plugins) as self.executor:
            for planned in self.plan.tasks:
                self._run_task(planned, done, summary)
        return summary

    # -- task level ----------------------------------------------------------
    def _run_task(self, planned: PlannedTask, done: dict[str, Any], summary: RunSummary) -> None:
        """Every cell of the task, once per base model (independently trained θ̂ on the same data, loaded once)."""
        loaded: list[TaskData] = []

        def data_of(task: Task) -> TaskData:
            if not loaded:
                loaded.append(task.load_data())
            return loaded[0]

        for base_model in range(planned.spec.base_models):
            self._run_base_model(planned, base_model, data_of, done, summary)

    def _run_base_model(self, planned: PlannedTask, base_model: int, data_of: Callable[[Task], TaskData],
                        done: dict[str, Any], summary: RunSummary) -> None:
        suite, name = self.suite, planned.spec.name
        task_seed = derive_seed(suite.seed, "task", name)
        task = planned.cls(planned.config, seed=task_seed, device=self.device, base_model=base_model)
        task_key = stable_hash("task", name, planned.cls.version, planned.config, task_seed, self.device.type,
                               suite.threads, *(("base model", base_model) if base_model else ()))
        protocols = list(planned.protocols)
        cells = [(p, e) for p in protocols for e in self.plan.estimators if e.runs_on(name)]
        predictions = {(p.name, e.name): self._prediction_key(task_key, p, e) for p, e in cells}
        keys = {pair: self._cell_key(key) for pair, key in predictions.items()}
        pending = [(p, e) for p, e in cells if keys[p.name, e.name] not in done]
        summary.skipped += len(cells) - len(pending)
        label = name if planned.spec.base_models == 1 else f"{name} base model {base_model + 1}/{planned.spec.base_models}"
        if not pending:
            log.info("%s: all %d cells already finished", label, len(cells))
            return
        data = data_of(task)
        base = self._trained_base(task, data, task_key)
        truths: dict[str, GroundTruth | str] = {}
        for protocol_plan in protocols:
            if any(q.name == protocol_plan.name for q, _ in pending):
                try:
                    truths[protocol_plan.name] = self._ground_truth(task, data, base, task_key, protocol_plan)
                except Exception as err:  # recorded in every cell of this protocol; the run goes on
                    log.error("ground truth %s/%s failed: %s", label, protocol_plan.name, err)
                    truths[protocol_plan.name] = f"ground truth failed: {_describe(err)}"
        bar = tqdm(total=len(pending), desc=label, unit="cell", disable=not self.progress)
        job = CellJob(self.plan, self.results_dir, task, data, base, planned, truths, tuple(pending), keys, predictions)
        remaining = list(pending)
        while remaining:  # a worker that dies takes its estimator's unfinished cells of this task with it
            job = dataclasses.replace(job, pending=tuple(remaining))
            for message in (self._isolated(job) if self.suite.isolate else job.messages()):
                if message[0] == "start":
                    bar.set_postfix_str("/".join(message[1]))
                elif message[0] == "record":
                    self._keep(message[2], summary, planned)
                    remaining.remove(_pair(message[1], remaining))
                    bar.update(1)
                elif message[0] == "died":
                    for cell in self._lost_cells(message[1], remaining):
                        record = self._base_record(planned, base_model, cell[0], cell[1], keys[cell[0].name, cell[1].name])
                        record["error"] = f"{message[2]} ({_where(message[1], cell)}; the run went on)"
                        self._keep(record, summary, planned)
                        remaining.remove(cell)
                        bar.update(1)
        bar.close()

    def _isolated(self, job: CellJob) -> Iterator[tuple]:
        from bench.isolation import CellLimits, relay

        return relay(job, self.plugins, CellLimits(self.suite.cell_timeout_s, self.suite.cell_memory_mb))

    @staticmethod
    def _lost_cells(in_flight: tuple[str, str] | None, remaining: list[tuple[PlannedComponent, PlannedComponent]]
                    ) -> list[tuple[PlannedComponent, PlannedComponent]]:
        """The cell a worker died in and its estimator's other unfinished cells (which would fit it again);
        all remaining cells if it died outside any cell."""
        if in_flight is None:
            return list(remaining)
        return [cell for cell in remaining if cell[1].name == in_flight[1]]

    def _keep(self, record: dict[str, Any], summary: RunSummary, planned: PlannedTask) -> None:
        self.store.append(record)
        summary.ran += 1
        if record["status"] == "failed":
            summary.failed += 1
            summary.failures.append(f"{planned.spec.name}/{record['protocol']}/{record['estimator']}: {record['error']}")

    def cell_messages(self, job: CellJob) -> Iterator[tuple]:
        """Estimator-major (each estimator freed before the next is profiled): ``("start", cell)`` before a
        cell and ``("record", cell, record)`` after; a cell is ``(protocol name, estimator name)``."""
        torch.set_num_threads(self.suite.threads)
        for est in self.plan.estimators:
            todo = [p for p, e in job.pending if e.name == est.name]
            if not todo:
                continue
            fitted: dict[str, Any] = {}
            for protocol_plan in todo:
                cell = (protocol_plan.name, est.name)
                yield ("start", cell)
                yield ("record", cell, self._run_cell(job.task, job.data, job.base, job.planned, protocol_plan, est,
                                                     job.truths[protocol_plan.name], fitted, job.keys[cell],
                                                     job.predictions[cell]))
            del fitted
            _release_memory(self.device)

    def _prediction_key(self, task_key: str, protocol: PlannedComponent, estimator: PlannedComponent) -> str:
        """What an estimator's prediction depends on: the task, the ground truth's columns, the estimator."""
        return stable_hash(task_key, self._protocol_key_parts(protocol), estimator.name, estimator.config,
                           estimator_fingerprint(estimator.cls))

    def _cell_key(self, prediction_key: str) -> str:
        """A finished cell: the prediction plus how it is judged (metric settings and definitions)."""
        return stable_hash(prediction_key, self.suite.top_k, self.suite.bootstrap_resamples, metrics.VERSION)

    def _protocol_key_parts(self, protocol: PlannedComponent) -> tuple:
        return (protocol.name, protocol.cls.version, protocol.config, derive_seed(self.suite.seed, "protocol", protocol.name))

    def _trained_base(self, task: Task, data: TaskData, task_key: str) -> TrainedModel:
        """θ̂ of the task's base model: from the cache, else trained (and cached)."""
        cached = load_or_none(self.cache.load_model, task_key)
        if cached is not None:
            return self._unpack(cached, task)
        log.info("training %s (cache key %s)", task.name, task_key)
        with profiled(self.device) as prof:
            base = task.train(data)
        base.diagnostics["train_seconds"] = prof.seconds
        self.cache.save_model(task_key, *pack_trained(base, task.name))
        return base

    def _unpack(self, cached: tuple[dict[str, torch.Tensor], dict[str, Any]], task: Task) -> TrainedModel:
        """A cached model on the run's device, its parameters in the model's order (the cache records the
        order; for caches written before it did, the task's model is built to find it)."""
        trained = unpack_trained(*cached, device=self.device)
        if "order" not in cached[1]:
            trained.params = in_order(trained.params, _model_order(task))
        return trained

    def _protocol(self, protocol_plan: PlannedComponent) -> Protocol:
        return protocol_plan.cls(protocol_plan.config, seed=derive_seed(self.suite.seed, "protocol", protocol_plan.name))

    def _ground_truth(self, task: Task, data: TaskData, base: TrainedModel, task_key: str,
                      protocol_plan: PlannedComponent) -> GroundTruth:
        """The cached ground truth (or a fresh one, then cached), with its noise ceiling judged anew each time
        (like the metrics: a change in how the ceiling is computed needs no retraining)."""
        key = stable_hash(task_key, self._protocol_key_parts(protocol_plan))
        protocol = self._protocol(protocol_plan)
        truth = self._cached_truth(task, key, protocol_plan.name)
        if truth is None:
            with profiled(self.device) as prof:
                truth = protocol.compute(task, data, base, progress=self.progress, executor=self.executor)
            truth = dataclasses.replace(truth, diagnostics={**truth.diagnostics, "seconds": prof.seconds,
                                                                "retrain_workers": float(self.executor.workers)})
            if truth.model is not None:  # the model first: a ground truth on disk implies its model is there
                self.cache.save_model(f"{key}-model", *pack_trained(truth.model, task.name))
            self.cache.save_arrays(key, *pack_truth(truth))
        settings = Settings(self.suite.top_k, self.suite.bootstrap_resamples, derive_seed(self.suite.seed, "ceiling", key))
        return dataclasses.replace(truth, diagnostics={**truth.diagnostics, **protocol.noise_ceiling(truth, settings)})

    def _cached_truth(self, task: Task, key: str, name: str) -> GroundTruth | None:
        cached = load_or_none(self.cache.load_arrays, key)
        if cached is None:
            return None
        model = load_or_none(self.cache.load_model, f"{key}-model") if cached[1].get("has_model") else None
        if cached[1].get("has_model") and model is None:
            return None  # its model is missing or corrupt: compute both again
        return unpack_truth(name, *cached, self._unpack(model, task) if model is not None else None)

    # -- cell level ----------------------------------------------------------
    def _fit(self, est: PlannedComponent, task: Task, data: TaskData, base: TrainedModel, planned: PlannedTask,
             fitted: dict[str, Fitted], fit_key: str) -> Fitted:
        """Fit once per (estimator, model fitted on); later protocols on the same model reuse it."""
        if fit_key in fitted:
            return fitted[fit_key]
        estimator, error, queries, lift = None, None, data.queries, _identity
        seed = derive_seed(self.suite.seed, "estimator", est.name, planned.spec.name)
        try:  # the task's frozen features, like its data, are computed once and not charged to the estimator
            view = self._head_view(task, base, est)
            if view is not None:
                train, queries = self._view_split(view, base, data.train), self._view_split(view, base, data.queries)
        except Exception as err:
            view, error = None, f"head view failed: {_describe(err)}"
        with profiled(self.device) as prof:
            try:
                if error is None:
                    if view is None:
                        ctx = fit_context(task, data, base, seed)
                    else:  # same influence on the head's parameters, over features computed once
                        ctx = head_view_context(task, view, train, seed)
                        lift = functools.partial(_prefixed, view.prefix)
                    estimator = est.cls(est.config)
                    estimator.fit(ctx)
            except NotApplicable as err:
                error, estimator = f"{NOT_APPLICABLE}: {err}", None
            except Exception as err:  # a crashing estimator becomes a failed cell
                error, estimator = _describe(err), None
        fitted[fit_key] = Fitted(estimator, prof, error, queries, lift, data, base)
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

    def _base_record(self, planned: PlannedTask, base_model: int, protocol_plan: PlannedComponent,
                     est: PlannedComponent, cell_key: str) -> dict[str, Any]:
        """A cell's identity and settings, as a failed record until the cell completes it."""
        return {
            "cell_key": cell_key, "suite": self.suite.name, "task": planned.spec.name, "preset": planned.spec.preset,
            "base_model": base_model, "base_models": planned.spec.base_models,
            "protocol": protocol_plan.name, "estimator": est.name, "status": "failed", "error": None,
            **({"variant_of": est.cls.name} if est.name != getattr(est.cls, "name", est.name) else {}),
            "metrics": {}, "ci": {},
            "config_hash": stable_hash(planned.config, protocol_plan.config, est.config, self.suite.seed),
            "estimator_config": _plain(est.config), "task_config": _plain(planned.config),
            "protocol_config": _plain(protocol_plan.config), "seed": self.suite.seed, "threads": self.suite.threads,
            "top_k": self.suite.top_k, "headline": protocol_plan.cls.headline, "column_noun": protocol_plan.cls.column_noun,
            "device": environment.device_description(self.suite.device), "git_commit": environment.git_commit(),
            "versions": environment.versions(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _run_cell(self, task: Task, data: TaskData, base: TrainedModel, planned: PlannedTask,
                  protocol_plan: PlannedComponent, est: PlannedComponent, truth: GroundTruth | str,
                  fitted: dict[str, Any], cell_key: str, prediction_key: str) -> dict[str, Any]:
        record = {**self._base_record(planned, task.base_model, protocol_plan, est, cell_key),
                  "task_diagnostics": base.diagnostics}
        if isinstance(truth, str):
            record["error"] = truth
            return record
        record.update(n_queries=int(truth.actual.shape[0]), n_columns=int(truth.actual.shape[1]),
                      groundtruth_diagnostics=truth.diagnostics, informative=bool(truth.diagnostics.get("informative", True)))
        protocol = self._protocol(protocol_plan)
        record["columns"] = list(protocol.columns)
        record["metric_specs"] = protocol.metric_specs(self.suite.top_k)
        record["ceiling"] = protocol.ceiling_of(truth)
        record["facts"] = protocol.facts(truth)
        if not protocol.needs & est.cls.capabilities:
            record.update(status=NOT_APPLICABLE, reason="capability",
                          error=f"{protocol_plan.name} needs {' or '.join(sorted(protocol.needs))}; "
                          f"{est.name} provides {', '.join(sorted(est.cls.capabilities))}")
            return record
        settings = Settings(self.suite.top_k, self.suite.bootstrap_resamples, derive_seed(self.suite.seed, "bootstrap", cell_key))
        cached = self.store.load_prediction(prediction_key) if protocol.caches_predictions else None
        if cached is not None:  # only the judging changed (metrics): no refit, the recorded cost stands
            prediction, saved = cached
            evaluation = Evaluation(None, data.queries, truth, task, data, base, _identity, settings)
            record.update(profile=saved["profile"], estimator_diagnostics=saved["estimator_diagnostics"],
                          prediction_reused=True)
            return self._judged(record, protocol, prediction, evaluation, cell_key)
        if protocol.fits_on_own_model:
            fit = self._fit(est, task, protocol.fit_data(data, truth), truth.model, planned, fitted, protocol_plan.name)
        else:
            fit = self._fit(est, task, data, base, planned, fitted, "base")
        fit_prof = fit.profile
        profile = {"fit_s": fit_prof.seconds, "fit_peak_mem_mb": fit_prof.peak_rss_mb, "fit_peak_cuda_mb": fit_prof.peak_cuda_mb}
        record["profile"] = profile
        if fit.estimator is None:
            if fit.error.startswith(NOT_APPLICABLE):
                record.update(status=NOT_APPLICABLE, reason="estimator", error=fit.error.removeprefix(f"{NOT_APPLICABLE}: "))
            else:
                record["error"] = f"fit failed: {fit.error}"
            return record
        evaluation = Evaluation(fit.estimator, fit.queries, truth, task, fit.data, fit.base, fit.lift, settings)
        prediction, error = None, None
        with profiled(self.device) as prof:  # the estimator's own scoring work, without the metrics
            try:
                prediction = protocol.predict(evaluation)
            except EvaluationError as err:
                error = str(err)
            except Exception as err:
                error = f"score failed: {_describe(err)}"
        profile.update(score_s=prof.seconds, score_peak_mem_mb=prof.peak_rss_mb, score_peak_cuda_mb=prof.peak_cuda_mb,
                       peak_mem_mb=max(prof.peak_rss_mb, fit_prof.peak_rss_mb), rss_method=prof.rss_method,
                       own_mem_mb=_own_memory(fit_prof, prof))
        if prof.peak_cuda_mb is not None:
            profile["peak_cuda_mb"] = max(prof.peak_cuda_mb, fit_prof.peak_cuda_mb or 0.0)
        record["estimator_diagnostics"] = fit.estimator.diagnostics()
        if error is not None:
            record["error"] = error
            return record
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
            record["error"] = f"judging failed: {_describe(err)}"
            return record
        record.update(metrics=result.metrics, ci=result.ci, n_valid_queries=result.n_valid, status="ok",
                      metrics_s=time.perf_counter() - started)
        if result.details:
            record["details"] = result.details
        if result.predicted is not None:
            self.store.save_artifact(cell_key, result.predicted.astype(np.float32), result.actual.astype(np.float32))
        return record


@dataclass(frozen=True)
class CellJob:
    """A task's pending cells with everything they need: runs in-process or, pickled, in a worker."""

    plan: Plan
    results_dir: Path
    task: Task
    data: TaskData
    base: TrainedModel
    planned: PlannedTask
    truths: dict[str, GroundTruth | str]
    pending: tuple[tuple[PlannedComponent, PlannedComponent], ...]
    keys: dict[tuple[str, str], str]
    predictions: dict[tuple[str, str], str]

    def messages(self) -> Iterator[tuple]:
        return Runner(self.plan, self.results_dir, progress=False).cell_messages(self)


def _where(in_flight: tuple[str, str] | None, cell: tuple[PlannedComponent, PlannedComponent]) -> str:
    if in_flight is None:
        return "outside any cell"
    return "in this cell" if in_flight == (cell[0].name, cell[1].name) else f"in its cell {'/'.join(in_flight)}"


def _pair(cell: tuple[str, str] | None, remaining: list[tuple[PlannedComponent, PlannedComponent]]
          ) -> tuple[PlannedComponent, PlannedComponent] | None:
    """The pending cell named ``(protocol, estimator)``."""
    return next((pair for pair in remaining if cell == (pair[0].name, pair[1].name)), None)


@dataclass(frozen=True)
class Fitted:
    """An estimator fitted for a task (None if fitting failed or did not apply), and how to talk to it."""

    estimator: Estimator | None
    profile: Any
    error: str | None
    queries: Split
    lift: Callable[[Params], Params]
    data: TaskData
    base: TrainedModel


def _own_memory(fit: Any, score: Any) -> float | None:
    """What the estimator added to the process: its peak over fit and score above the RSS before its fit."""
    if fit.baseline_rss_mb is None:
        return None
    return max(0.0, max(fit.peak_rss_mb, score.peak_rss_mb) - fit.baseline_rss_mb)


def estimator_fingerprint(cls: type[Estimator]) -> str:
    """The estimator's ``version``; for a plug-in (defined outside the ``estimators`` package) also a hash of
    the source file that defines it, so editing the plug-in re-runs its cells."""
    if cls.__module__.split(".")[0] == "estimators":
        return f"v{cls.version}"
    try:
        source = inspect.getsourcefile(cls)
    except TypeError:  # defined interactively: no file to hash
        source = None
    return f"v{cls.version}-{hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]}" if source else f"v{cls.version}"


def _model_order(task: Task) -> list[str]:
    """The task model's parameter names in its own order (caches written before the order was recorded)."""
    return [name for name, _ in task.build_model().named_parameters()]


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


def _describe(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def _plain(config: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(config) if is_dataclass(config) else {}
