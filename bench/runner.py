"""Run a planned suite (:mod:`bench.planning`): train (cached) → ground truth (cached) → cells → records.

This is the parent's side: it plans each task's cells, trains or loads θ̂ and the
ground truths, hands the pending cells to :mod:`bench.cell` (in this process or
an isolated worker) and appends the records. Finished cells are skipped on a
re-run, so an interrupted run resumes where it stopped; cells that failed on a
fault of the environment are run again (:func:`bench.failures.retry_reason`).
Every record names the digests of the θ̂ and ground truth it was judged against;
a cached file whose content differs from what a folder's finished cells were
judged against is computed again, and if it still differs the run refuses
(:class:`MixedTruthError`) rather than mix two truths in one table.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench import keys
from bench.cache import (
    ArtifactCache,
    in_order,
    load_or_none,
    model_digest,
    pack_trained,
    pack_truth,
    truth_digest,
    unpack_trained,
    unpack_truth,
)
from bench.cell import NOT_APPLICABLE, Cell, CellJob, base_record
from bench.config import ConfigError
from bench.executors import Executor, InProcess, make_executor
from bench.failures import Failure, retry_reason
from bench.groundtruth.base import GroundTruth, Protocol, Settings
from bench.heartbeat import heartbeat, refreshing
from bench.isolation import exit_code, run_all
from bench.phase_cost import profiled
from bench.planning import Plan, PlannedComponent, PlannedTask
from bench.records import Record
from bench.seeding import derive_seed
from bench.store import ResultsStore
from tasks.base import Task, TaskData, TrainedModel

log = logging.getLogger(__name__)

class MixedTruthError(RuntimeError):
    """A cached θ̂ or ground truth differs from what a folder's finished cells were judged against, even after
    computing it again: the run stops rather than judge new cells against another truth than their neighbours."""


class PublishedTruthDiffers(RuntimeError):
    """Scoring against a published leaderboard (``--against``): a truth's own model retrained here differs from
    the published one, so that truth does not hold on this machine; its cells are recorded as failed."""


@dataclass
class RunSummary:
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    #: cells of the plan skipped because they had failed before (``--retry-failed`` runs them again)
    failed_before: int = 0
    #: finished cells run again by this command, and why (an environment fault, a package that imports now)
    retried: list[str] = field(default_factory=list)


@dataclass
class Judged:
    """What one base model's cells are judged against: the keys and digests of θ̂ and of each protocol's
    ground truth (``truths[protocol] = (truth key, digest)``), written into every record."""

    task_key: str
    base_digest: str
    truths: dict[str, tuple[str, str]] = field(default_factory=dict)

    def fields(self, protocol: str) -> dict[str, str | None]:
        truth_key, truth_digest = self.truths.get(protocol, (None, None))
        return {"task_key": self.task_key, "base_digest": self.base_digest, "truth_key": truth_key,
                "truth_digest": truth_digest}


def folder_digests(records: list[Record]) -> dict[str, set[str]]:
    """Every digest the folder's records name, by the cache key of what it digests (a θ̂'s task key, a ground
    truth's key), whatever estimator, plan or cell key the records belong to (records from before digests
    name none)."""
    found: dict[str, set[str]] = {}
    for record in records:
        for key, digest in ((record.task_key, record.base_digest), (record.truth_key, record.truth_digest)):
            if key and digest:
                found.setdefault(key, set()).add(digest)
    return found


class Runner:
    """Executes a :class:`Plan` into a results directory."""

    def __init__(self, plan: Plan, results_dir: Path, *, progress: bool = True, retry_failed: bool = False,
                 plugins: tuple[str, ...] | list[str] = (), published: bool = False):
        self.plan, self.suite, self.plugins = plan, plan.suite, tuple(plugins)
        #: scoring against a published leaderboard: a θ̂ this machine does not reproduce bit for bit is used for
        #: the truths no θ̂ enters, and the θ̂-dependent truths' cells are recorded as failed (not a MixedTruthError)
        self.published = published
        #: task keys whose θ̂, trained here, differs from the one the folder's records name (published mode)
        self.differing: set[str] = set()
        self.results_dir = Path(results_dir)
        self.store = ResultsStore(self.results_dir)
        self.cache = ArtifactCache(self.results_dir / "cache")
        self.progress, self.retry_failed = progress, retry_failed
        self.device = torch.device(self.suite.device)
        #: where ground truth's retrains run (set for the length of :meth:`run`)
        self.executor: Executor = InProcess()
        #: digests the folder's records name, by cache key (set by :meth:`run`)
        self.judged_digests: dict[str, set[str]] = {}
        #: finished cells to run again, and why (set by :meth:`run`)
        self.retry: dict[str, str] = {}

    def run(self) -> RunSummary:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
        torch.set_num_threads(self.suite.threads)
        summary = RunSummary()
        done = self._finished()
        with make_executor(self.suite.workers, self.suite.scheduler, self.plugins) as self.executor:
            for planned in self.plan.tasks:
                self._run_task(planned, done, summary)
        return summary

    def _finished(self) -> dict[str, Record]:
        """The folder's finished cells by key: ok, not applicable and (unless ``retry_failed``) failed ones,
        less those to run again now (:attr:`retry`); also the digests its records name."""
        latest = self.store.latest()
        self.judged_digests = folder_digests(list(latest.values()))
        finished = {"ok", NOT_APPLICABLE} | (set() if self.retry_failed else {"failed"})
        done = {}
        importlib.invalidate_caches()  # a package installed since the last run is found
        for key, record in latest.items():
            if record.status not in finished:
                continue
            why = retry_reason(record.status, record.error, record.extra)
            if why is None:
                done[key] = record
            else:
                self.retry[key] = f"{'/'.join(record.cell)}: {why}"
        return done

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
        task = planned.cls(planned.config, seed=keys.task_seed(suite, name), device=self.device, base_model=base_model)
        task_key = keys.task_key(suite, planned, base_model)
        protocols = [p for p in planned.protocols if p.covers(base_model)]
        cells = [(p, e) for p in protocols for e in self.plan.estimators if e.runs_on(name)]
        predictions = {(p.name, e.name): self._prediction_key(task_key, p, e) for p, e in cells}
        cell_keys = {pair: self._cell_key(key) for pair, key in predictions.items()}
        pending = [(p, e) for p, e in cells if cell_keys[p.name, e.name] not in done]
        judged = [done[key] for key in cell_keys.values() if key in done]
        summary.skipped += len(judged)
        summary.failed_before += sum(record.status == "failed" for record in judged)
        summary.retried += [self.retry[key] for key in cell_keys.values() if key in self.retry]
        label = name if planned.spec.base_models == 1 else f"{name} base model {base_model + 1}/{planned.spec.base_models}"
        if not pending:
            log.info("%s: all %d cells already finished", label, len(cells))
            return
        with heartbeat(f"{label}: loading data", enabled=self.progress):
            data = data_of(task)
        base, stamp = self._trained_base(task, data, task_key, label)
        truths: dict[str, GroundTruth | Failure] = {}
        for protocol_plan in protocols:
            if any(q.name == protocol_plan.name for q, _ in pending):
                if task_key in self.differing and protocol_plan.cls.depends_on_base:
                    truths[protocol_plan.name] = Failure(
                        f"θ̂ of {label} trained here differs from the published one: the published {protocol_plan.name} "
                        "truth was measured around that θ̂ and does not hold for this one (truths trained from "
                        "scratch do)")
                    continue
                try:
                    key = keys.truth_key(suite, planned, base_model, protocol_plan)
                    truth, digest = self._ground_truth(task, data, base, key, protocol_plan, label)
                except MixedTruthError:
                    raise
                except Exception as err:  # recorded in every cell of this protocol; the run goes on
                    log.error("ground truth %s/%s failed: %s", label, protocol_plan.name, err)
                    truths[protocol_plan.name] = Failure.of(err)
                else:
                    truths[protocol_plan.name], stamp.truths[protocol_plan.name] = truth, (key, digest)
        job = CellJob(self.plan, self.results_dir, task, data, base, planned, truths, tuple(pending), cell_keys,
                      predictions)
        self._relay(job, label, stamp, summary)

    def _relay(self, job: CellJob, label: str, stamp: Judged, summary: RunSummary) -> None:
        """Run the job's cells and keep their records; a worker that dies takes its estimator's unfinished
        cells of this task with it (recorded as failed) and the rest go on in a new one."""
        bar = tqdm(total=len(job.pending), desc=label, unit="cell", disable=not self.progress)

        def kept(name: tuple[str, str], record: dict[str, Any]) -> list[Cell]:
            self._keep(record, summary, stamp)
            bar.update(1)
            return [_pair(name, remaining)]

        def lost(in_flight: tuple[str, str] | None, reason: str, fields: dict[str, Any]) -> list[Cell]:
            cells = self._lost_cells(in_flight, remaining)
            for cell in cells:
                record = base_record(self.plan, job.planned, job.task.base_model, cell[0], cell[1],
                                     job.keys[cell[0].name, cell[1].name])
                record["error"] = f"{reason} ({_where(in_flight, cell)}; the run went on)"
                self._keep({**record, **fields}, summary, stamp)
                bar.update(1)
            return cells

        def messages(pending: CellJob) -> Iterator[tuple]:
            with refreshing(bar):
                yield from self._isolated(pending) if self.suite.isolate else _in_process(pending)

        remaining = list(job.pending)
        run_all(remaining, lambda cells: dataclasses.replace(job, pending=cells), messages,
                started=lambda name: bar.set_postfix_str("/".join(name)), kept=kept, lost=lost)
        bar.close()

    def _isolated(self, job: CellJob) -> Iterator[tuple]:
        from bench.isolation import CellLimits, relay

        return relay(job, self.plugins, CellLimits(self.suite.cell_timeout_s, self.suite.cell_memory_mb))

    @staticmethod
    def _lost_cells(in_flight: tuple[str, str] | None, remaining: list[Cell]) -> list[Cell]:
        """The cell a worker died in and its estimator's other unfinished cells (which would fit it again);
        all remaining cells if it died outside any cell."""
        if in_flight is None:
            return list(remaining)
        return [cell for cell in remaining if cell[1].name == in_flight[1]]

    def _keep(self, record: dict[str, Any], summary: RunSummary, stamp: Judged) -> None:
        """Append ``record`` with the keys and digests of the θ̂ and ground truth it was judged against."""
        record = {**record, **stamp.fields(record["protocol"])}
        if record["status"] == "failed":
            record.setdefault("cause", "cell")
        self.store.append(record)
        summary.ran += 1
        if record["status"] == "failed":
            summary.failed += 1
            summary.failures.append(f"{record['task']}/{record['protocol']}/{record['estimator']}: {record['error']}")

    def _prediction_key(self, task_key: str, protocol: PlannedComponent, estimator: PlannedComponent) -> str:
        return keys.prediction_key(self.suite, task_key, protocol, estimator, keys.estimator_fingerprint(estimator.cls))

    def _cell_key(self, prediction_key: str) -> str:
        return keys.cell_key(self.suite, prediction_key)

    def _trained_base(self, task: Task, data: TaskData, task_key: str, label: str) -> tuple[TrainedModel, Judged]:
        """θ̂ of the task's base model (from the cache, else trained and cached) with its stamp. A cached θ̂
        other than the one the folder's records were judged against is trained again."""
        expected = self.judged_digests.get(task_key, set())
        cached = load_or_none(self.cache.load_model, task_key)
        if cached is not None:
            base = self._unpack(cached, task)
            digest = model_digest(base)
            if not expected or digest in expected:
                return base, Judged(task_key, digest)
            log.warning("%s differs from the θ̂ this folder's records were judged against; training it again",
                        self.cache.model_paths(task_key)[0])
        log.info("training %s (cache key %s)", task.name, task_key)
        with profiled(self.device) as prof, heartbeat(f"{label}: training θ̂", enabled=self.progress):
            base = task.train(data)
        base.diagnostics["train_seconds"] = prof.seconds
        digest = model_digest(base)
        if expected and digest not in expected and self.published:
            log.warning("θ̂ of %s trained here differs from the published one (%s vs %s): only truths no θ̂ enters hold",
                        label, digest[:12], ", ".join(sorted(d[:12] for d in expected)))
            self.differing.add(task_key)
        elif expected and digest not in expected:
            raise MixedTruthError(f"θ̂ of {label} trained again differs from the one this folder's records were judged "
                                  f"against ({digest[:12]} vs {', '.join(sorted(d[:12] for d in expected))}): use "
                                  f"another --results folder, or delete {self.store.path} to judge every cell again")
        self.cache.save_model(task_key, *pack_trained(base, task.name))
        return base, Judged(task_key, digest)

    def _unpack(self, cached: tuple[dict[str, torch.Tensor], dict[str, Any]], task: Task) -> TrainedModel:
        """A cached model on the run's device, its parameters in the model's order (the cache records the
        order; for caches written before it did, the task's model is built to find it)."""
        trained = unpack_trained(*cached, device=self.device)
        if "order" not in cached[1]:
            trained.params = in_order(trained.params, _model_order(task))
        return trained

    def _protocol(self, protocol_plan: PlannedComponent) -> Protocol:
        return keys.protocol_instance(self.suite, protocol_plan)

    def _ground_truth(self, task: Task, data: TaskData, base: TrainedModel, key: str,
                      protocol_plan: PlannedComponent, label: str) -> tuple[GroundTruth, str]:
        """The cached ground truth under ``key`` (:func:`bench.keys.truth_key`), or a fresh one, then cached, and
        its digest, with its noise ceiling judged anew each time (like the metrics: a change in how the ceiling
        is computed needs no retraining). A cached truth other than the one the folder's records were judged
        against is computed again."""
        expected = self.judged_digests.get(key, set())
        protocol = self._protocol(protocol_plan)
        truth = self._cached_truth(task, key, protocol_plan.name)
        digest = truth_digest(truth) if truth is not None else None
        if truth is not None and expected and digest not in expected:
            log.warning("%s differs from the ground truth this folder's records were judged against; computing it "
                        "again", self.cache.groundtruth_path(key))
            truth = None
        if truth is None:
            with profiled(self.device) as prof, heartbeat(f"{label}: ground truth {protocol_plan.name}",
                                                          enabled=self.progress):
                truth = protocol.compute(task, data, base, progress=self.progress, executor=self.executor)
            truth = dataclasses.replace(truth, diagnostics={**truth.diagnostics, "seconds": prof.seconds,
                                                                "retrain_workers": float(self.executor.workers)})
            digest = truth_digest(truth)
            if expected and digest not in expected and self.published:
                raise PublishedTruthDiffers(f"the published {protocol_plan.name} truth's model, trained here from the "
                                            "recipe, differs from the published one: this truth does not hold here")
            if expected and digest not in expected:
                raise MixedTruthError(f"ground truth {self.cache.groundtruth_path(key)} computed again differs from the "
                                      "one this folder's records were judged against: use another --results folder, "
                                      f"or delete {self.store.path} to judge every cell again")
            if truth.model is not None:  # the model first: a ground truth on disk implies its model is there
                self.cache.save_model(f"{key}-model", *pack_trained(truth.model, task.name))
            self.cache.save_arrays(key, *pack_truth(truth))
        settings = Settings(self.suite.top_k, self.suite.bootstrap_resamples, derive_seed(self.suite.seed, "ceiling", key))
        truth = dataclasses.replace(truth, diagnostics={**truth.diagnostics, **protocol.noise_ceiling(truth, settings)})
        return truth, digest

    def _cached_truth(self, task: Task, key: str, name: str) -> GroundTruth | None:
        cached = load_or_none(self.cache.load_arrays, key)
        if cached is None:
            return None
        model = load_or_none(self.cache.load_model, f"{key}-model") if cached[1].get("has_model") else None
        if cached[1].get("has_model") and model is None:
            return None  # its model is missing or corrupt: compute both again
        return unpack_truth(name, *cached, self._unpack(model, task) if model is not None else None)


def _in_process(job: CellJob) -> Iterator[tuple]:
    """``job.messages()`` in this process; an estimator's ``sys.exit`` ends its cell as a worker's death would
    (``("died", cell, reason)``), not the run."""
    in_flight = None
    try:
        for message in job.messages():
            in_flight = message[1] if message[0] == "start" else None
            yield message
    except SystemExit as err:
        yield ("died", in_flight, f"the estimator called sys.exit({err.code!r}), which would end the run (exit code "
               f"{exit_code(err)}; --no-isolate runs cells in this process)")


def _where(in_flight: tuple[str, str] | None, cell: tuple[PlannedComponent, PlannedComponent]) -> str:
    if in_flight is None:
        return "outside any cell"
    return "in this cell" if in_flight == (cell[0].name, cell[1].name) else f"in its cell {'/'.join(in_flight)}"


def _pair(cell: tuple[str, str] | None, remaining: list[tuple[PlannedComponent, PlannedComponent]]
          ) -> tuple[PlannedComponent, PlannedComponent] | None:
    """The pending cell named ``(protocol, estimator)``."""
    return next((pair for pair in remaining if cell == (pair[0].name, pair[1].name)), None)


def _model_order(task: Task) -> list[str]:
    """The task model's parameter names in its own order (caches written before the order was recorded)."""
    return [name for name, _ in task.build_model().named_parameters()]


