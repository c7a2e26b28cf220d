"""Run a suite: train (cached) → ground truth (cached) → every estimator cell → records.

Every name and option is validated before any work or any write. A cell whose
estimator raises, or returns a malformed or non-finite score matrix, is recorded
as ``failed`` with its error, and the run goes on. Finished cells are skipped
on a re-run, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench import environment, metrics
from bench.cache import ArtifactCache, load_or_none, pack_trained, unpack_trained
from bench.catalog import Registries
from bench.config import ComponentSpec, ConfigError, SuiteConfig, make_config
from bench.groundtruth.base import GroundTruth, Protocol
from bench.hashing import stable_hash
from bench.profile import profiled
from bench.seeding import derive_seed
from bench.store import ResultsStore
from estimators.base import SINGLE, Estimator, FitContext, NotApplicable
from tasks.base import HeadView, Task, TaskData, TrainedModel

log = logging.getLogger(__name__)

NOT_APPLICABLE = "not-applicable"


@dataclass(frozen=True)
class PlannedTask:
    spec: ComponentSpec
    cls: type[Task]
    config: Any


@dataclass(frozen=True)
class PlannedComponent:
    name: str
    cls: type
    config: Any


@dataclass(frozen=True)
class Plan:
    """A validated suite: classes resolved and option dataclasses built."""

    suite: SuiteConfig
    tasks: tuple[PlannedTask, ...]
    protocols: tuple[PlannedComponent, ...]
    estimators: tuple[PlannedComponent, ...]


@dataclass
class RunSummary:
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)


def plan_suite(suite: SuiteConfig, registries: Registries) -> Plan:
    """Resolve every name and option; raises RegistryError / ConfigError before any work."""
    registries.tasks.check(s.name for s in suite.tasks)
    registries.protocols.check(s.name for s in suite.protocols)
    suite_protocols = [s.name for s in suite.protocols]
    for spec in suite.tasks:
        for name in spec.protocols:
            if name not in suite_protocols:
                raise ConfigError(f"task {spec.name!r} lists protocol {name!r}, which the suite does not run "
                                  f"(suite protocols: {', '.join(suite_protocols)})")
    names = registries.estimators.names() if "all" in suite.estimators else list(dict.fromkeys(suite.estimators))
    registries.estimators.check(names)
    for name, _ in suite.estimator_options:
        if name not in names:
            raise ConfigError(f"[estimator_options.{name}] names an estimator this run does not include ({', '.join(names)})")
    tasks = []
    for spec in suite.tasks:
        cls = registries.tasks.get(spec.name)
        if spec.preset not in cls.presets:
            raise ConfigError(f"unknown preset {spec.preset!r} for task {spec.name!r}. Valid presets: {', '.join(cls.presets)}")
        config = make_config(cls.Config, spec.options_dict(), f"task {spec.name}", base=cls.presets[spec.preset])
        tasks.append(PlannedTask(spec, cls, config))
    protocols = []
    for spec in suite.protocols:
        cls = registries.protocols.get(spec.name)
        protocols.append(PlannedComponent(spec.name, cls, make_config(cls.Config, spec.options_dict(), f"protocol {spec.name}")))
    estimators = []
    for name in names:
        cls = registries.estimators.get(name)
        estimators.append(PlannedComponent(name, cls, make_config(cls.Config, suite.options_for(name), f"estimator {name}")))
    return Plan(suite, tuple(tasks), tuple(protocols), tuple(estimators))


class Runner:
    """Executes a :class:`Plan` into a results directory."""

    def __init__(self, plan: Plan, results_dir: Path, *, progress: bool = True, retry_failed: bool = False):
        self.plan, self.suite = plan, plan.suite
        self.results_dir = Path(results_dir)
        self.store = ResultsStore(self.results_dir)
        self.cache = ArtifactCache(self.results_dir / "cache")
        self.progress, self.retry_failed = progress, retry_failed
        self.device = torch.device(self.suite.device)

    def run(self) -> RunSummary:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
        torch.set_num_threads(self.suite.threads)
        summary = RunSummary()
        done = {key: rec for key, rec in self.store.latest().items()
                if rec.get("status") == "ok" or (rec.get("status") == "failed" and not self.retry_failed)}
        for planned in self.plan.tasks:
            self._run_task(planned, done, summary)
        return summary

    # -- task level ----------------------------------------------------------
    def _run_task(self, planned: PlannedTask, done: dict[str, Any], summary: RunSummary) -> None:
        suite = self.suite
        task_seed = derive_seed(suite.seed, "task", planned.spec.name)
        task = planned.cls(planned.config, seed=task_seed, device=self.device)
        task_key = stable_hash("task", planned.spec.name, planned.cls.version, planned.config, task_seed,
                               self.device.type, suite.threads)
        protocols = [p for p in self.plan.protocols if not planned.spec.protocols or p.name in planned.spec.protocols]
        cells = [(p, e) for p in protocols for e in self.plan.estimators]
        keys = {(p.name, e.name): self._cell_key(task_key, p, e) for p, e in cells}
        pending = [(p, e) for p, e in cells if keys[p.name, e.name] not in done]
        summary.skipped += len(cells) - len(pending)
        if not pending:
            log.info("%s: all %d cells already finished", planned.spec.name, len(cells))
            return
        data = task.load_data()
        base = self._base_model(task, data, task_key)
        truths: dict[str, GroundTruth | str] = {}
        for protocol_plan in protocols:
            if any(q.name == protocol_plan.name for q, _ in pending):
                try:
                    truths[protocol_plan.name] = self._ground_truth(task, data, base, task_key, protocol_plan)
                except Exception as err:  # recorded in every cell of this protocol; the run goes on
                    log.error("ground truth %s/%s failed: %s", planned.spec.name, protocol_plan.name, err)
                    truths[protocol_plan.name] = f"ground truth failed: {_describe(err)}"
        bar = tqdm(total=len(pending), desc=f"{planned.spec.name}", unit="cell", disable=not self.progress)
        for est in self.plan.estimators:  # estimator-major: each is freed before the next is profiled
            todo = [p for p, e in pending if e.name == est.name]
            if not todo:
                continue
            fitted: dict[str, Any] = {}
            for protocol_plan in todo:
                bar.set_postfix_str(f"{protocol_plan.name}/{est.name}")
                record = self._run_cell(task, data, base, planned, protocol_plan, est, truths[protocol_plan.name],
                                        fitted, keys[protocol_plan.name, est.name])
                self.store.append(record)
                summary.ran += 1
                if record["status"] != "ok":
                    summary.failed += 1
                    summary.failures.append(f"{planned.spec.name}/{protocol_plan.name}/{est.name}: {record['error']}")
                bar.update(1)
            del fitted
            _release_memory(self.device)
        bar.close()

    def _cell_key(self, task_key: str, protocol: PlannedComponent, estimator: PlannedComponent) -> str:
        return stable_hash(task_key, self._protocol_key_parts(protocol), estimator.name, estimator.config,
                           self.suite.top_k, self.suite.bootstrap_resamples)

    def _protocol_key_parts(self, protocol: PlannedComponent) -> tuple:
        return (protocol.name, protocol.cls.version, protocol.config, derive_seed(self.suite.seed, "protocol", protocol.name))

    def _base_model(self, task: Task, data: TaskData, task_key: str) -> TrainedModel:
        cached = load_or_none(self.cache.load_model, task_key)
        if cached is not None:
            return unpack_trained(*cached, device=self.device)
        log.info("training %s (cache key %s)", task.name, task_key)
        with profiled(self.device) as prof:
            base = task.train(data)
        base.diagnostics["train_seconds"] = prof.seconds
        self.cache.save_model(task_key, *pack_trained(base, task.name))
        return base

    def _ground_truth(self, task: Task, data: TaskData, base: TrainedModel, task_key: str,
                      protocol_plan: PlannedComponent) -> GroundTruth:
        key = stable_hash(task_key, self._protocol_key_parts(protocol_plan))
        cached = load_or_none(self.cache.load_arrays, key)
        if cached is not None:
            arrays, meta = cached
            return GroundTruth(protocol_plan.name, arrays["train_idx"], arrays["actual"], meta["diagnostics"],
                               arrays.get("replicates"))
        protocol_seed = derive_seed(self.suite.seed, "protocol", protocol_plan.name)
        protocol: Protocol = protocol_plan.cls(protocol_plan.config, seed=protocol_seed)
        with profiled(self.device) as prof:
            truth = protocol.compute(task, data, base, progress=self.progress)
        diagnostics = {**truth.diagnostics, "seconds": prof.seconds, **self._noise_ceiling(truth, key)}
        arrays = {"train_idx": truth.train_idx, "actual": truth.actual}
        if truth.replicates is not None:
            arrays["replicates"] = truth.replicates
        self.cache.save_arrays(key, arrays, {"diagnostics": diagnostics})
        return GroundTruth(truth.protocol, truth.train_idx, truth.actual, diagnostics, truth.replicates)

    def _noise_ceiling(self, truth: GroundTruth, key: str) -> dict[str, Any]:
        """Metrics of each seed replicate against the ground truth, averaged over replicates, per query."""
        if truth.replicates is None or len(truth.replicates) == 0:
            return {}
        per_replicate = [metrics.per_query(rep, truth.actual, self.suite.top_k) for rep in truth.replicates]
        ceiling: dict[str, Any] = {}
        for name in metrics.METRICS:
            values = np.mean([values[name] for values in per_replicate], axis=0)
            summary = metrics.summarise(values, resamples=self.suite.bootstrap_resamples,
                                        seed=derive_seed(self.suite.seed, "ceiling", key))
            ceiling[f"ceiling_{name}"] = summary.mean
            ceiling[f"ceiling_{name}_ci"] = [summary.low, summary.high]
        return ceiling

    # -- cell level ----------------------------------------------------------
    def _fit(self, est: PlannedComponent, task: Task, data: TaskData, base: TrainedModel, planned: PlannedTask,
             fitted: dict[str, Any]) -> tuple[Estimator | None, Any, str | None, Any]:
        if est.name in fitted:
            return fitted[est.name]
        estimator, error, queries = None, None, data.queries
        seed = derive_seed(self.suite.seed, "estimator", est.name, planned.spec.name)
        with profiled(self.device) as prof:
            try:
                view = self._head_view(task, base, est)
                if view is None:
                    ctx = FitContext(
                        model=task.build_model(), params=base.params, loss=task.loss, l2=task.l2, train=data.train,
                        seed=seed, checkpoints=base.checkpoints, exact_hessian=lambda: task.exact_hessian(base.params, data),
                        default_parameters=task.influence_parameters,
                    )
                else:  # same influence on the head's parameters, over features computed once
                    ctx = FitContext(model=view.module, params=view.params, loss=task.loss, l2=task.l2,
                                     train=view.split(data.train), seed=seed)
                    queries = view.split(data.queries)
                estimator = est.cls(est.config)
                estimator.fit(ctx)
            except NotApplicable as err:
                error, estimator = f"{NOT_APPLICABLE}: {err}", None
            except Exception as err:  # a crashing estimator becomes a failed cell
                error = _describe(err)
                estimator = None
        fitted[est.name] = (estimator, prof, error, queries)
        return fitted[est.name]

    @staticmethod
    def _head_view(task: Task, base: TrainedModel, est: PlannedComponent) -> HeadView | None:
        """The task's head view, if this estimator may use it (θ̂ only, default parameter subset)."""
        if not est.cls.uses_head_view or getattr(est.config, "parameters", ()):
            return None
        view = task.head_view(base.params)
        return view if view is not None and task.influence_parameters == (view.prefix,) else None

    def _run_cell(self, task: Task, data: TaskData, base: TrainedModel, planned: PlannedTask,
                  protocol_plan: PlannedComponent, est: PlannedComponent, truth: GroundTruth | str,
                  fitted: dict[str, Any], cell_key: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "cell_key": cell_key, "suite": self.suite.name, "task": planned.spec.name, "preset": planned.spec.preset,
            "protocol": protocol_plan.name, "estimator": est.name, "status": "failed", "error": None,
            "metrics": {}, "ci": {},
            "config_hash": stable_hash(planned.config, protocol_plan.config, est.config, self.suite.seed),
            "estimator_config": _plain(est.config), "task_config": _plain(planned.config),
            "protocol_config": _plain(protocol_plan.config), "seed": self.suite.seed, "threads": self.suite.threads,
            "top_k": self.suite.top_k,
            "device": environment.device_description(self.suite.device), "git_commit": environment.git_commit(),
            "versions": environment.versions(), "task_diagnostics": base.diagnostics,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if isinstance(truth, str):
            record["error"] = truth
            return record
        record.update(n_queries=int(truth.actual.shape[0]), n_columns=int(truth.actual.shape[1]),
                      groundtruth_diagnostics=truth.diagnostics)
        if SINGLE not in est.cls.capabilities:
            record.update(status=NOT_APPLICABLE, error=f"{est.name} does not provide single-point scores")
            return record
        estimator, fit_prof, error, queries = self._fit(est, task, data, base, planned, fitted)
        profile = {"fit_s": fit_prof.seconds, "fit_peak_mem_mb": fit_prof.peak_rss_mb, "fit_peak_cuda_mb": fit_prof.peak_cuda_mb}
        record["profile"] = profile
        if estimator is None:
            if error.startswith(NOT_APPLICABLE):
                record.update(status=NOT_APPLICABLE, error=error.removeprefix(f"{NOT_APPLICABLE}: "))
            else:
                record["error"] = f"fit failed: {error}"
            return record
        train_idx = torch.as_tensor(truth.train_idx, dtype=torch.long, device=self.device)
        with profiled(self.device) as prof:
            try:
                scores = estimator.score(queries, train_idx)
            except Exception as err:
                scores, error = None, _describe(err)
        profile.update(score_s=prof.seconds, score_peak_mem_mb=prof.peak_rss_mb, score_peak_cuda_mb=prof.peak_cuda_mb,
                       peak_mem_mb=max(prof.peak_rss_mb, fit_prof.peak_rss_mb), rss_method=prof.rss_method)
        if prof.peak_cuda_mb is not None:
            profile["peak_cuda_mb"] = max(prof.peak_cuda_mb, fit_prof.peak_cuda_mb or 0.0)
        record["estimator_diagnostics"] = estimator.diagnostics()
        if scores is None:
            record["error"] = f"score failed: {error}"
            return record
        problem = validate_scores(scores, truth.actual.shape)
        if problem:
            record["error"] = problem
            return record
        predicted = scores.detach().cpu().numpy().astype(np.float64)
        per_query = metrics.per_query(predicted, truth.actual, self.suite.top_k)
        for name, values in per_query.items():
            summary = metrics.summarise(values, resamples=self.suite.bootstrap_resamples,
                                        seed=derive_seed(self.suite.seed, "bootstrap", cell_key))
            record["metrics"][name] = summary.mean
            record["ci"][name] = [summary.low, summary.high]
            record.setdefault("n_valid_queries", {})[name] = summary.n_valid
        self.store.save_artifact(cell_key, predicted.astype(np.float32), truth.actual.astype(np.float32))
        record["status"] = "ok"
        return record


def _release_memory(device: torch.device) -> None:
    """Free the last estimator's memory so the next one's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def validate_scores(scores: Any, shape: tuple[int, int]) -> str | None:
    """Why a score matrix is unusable, or None if it is fine."""
    if not isinstance(scores, torch.Tensor):
        return f"score() must return a torch.Tensor, got {type(scores).__name__}"
    if tuple(scores.shape) != tuple(shape):
        return f"score() returned shape {tuple(scores.shape)}, expected {tuple(shape)} (n_query, n_train_idx)"
    if not torch.is_floating_point(scores):
        return f"score() returned dtype {scores.dtype}, expected a floating dtype (float32)"
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        return f"score() returned {bad} non-finite values (NaN or inf) out of {scores.numel()}"
    return None


def _describe(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def _plain(config: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(config) if is_dataclass(config) else {}
