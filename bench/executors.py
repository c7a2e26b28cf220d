"""Where retrains run: in this process, in N local worker processes, or on a Dask cluster.

Protocols describe their retrains as :class:`RetrainChunk` s (a retraining spec and up to
``task.retrain_batch`` removals, trained together as one stack) and hand them to an :class:`Executor`,
which returns each chunk's query losses in whatever order they finish. A chunk's result depends only on
the chunk and the shared :class:`RetrainProblem` (task, data, θ̂ and the torch thread count every worker
runs with), never on where or when it ran: the in-process, local-process and Dask executors give
bit-identical ground truth (tested).

Workers are *spawned* processes (a forked one would inherit torch's OpenMP pool and hang); plug-in modules
are imported in each before any problem is unpickled, so plug-in tasks resolve there as in the parent.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import pickle
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.config import SCHEDULER_LOCAL, check_scheduler
from bench.isolation import prepare_worker
from tasks.base import RetrainSpec, Task, TaskData, TrainedModel, retrain_at_lengths


@dataclass(frozen=True)
class RetrainProblem:
    """What every chunk of one ground truth shares; ``threads``: torch CPU threads each worker runs with;
    ``shared``: the task's :meth:`~tasks.base.Task.retrain_state`, computed once by the run's process."""

    task: Task
    data: TaskData
    base: TrainedModel
    threads: int
    shared: Any = None


@dataclass(frozen=True)
class RetrainChunk:
    """Retrain once per entry of ``removals`` under ``spec`` (one stack: see :meth:`Task.retrain_without`);
    ``key`` places the result (``(spec index, first removal's position)``)."""

    key: tuple[int, int]
    spec: RetrainSpec
    removals: tuple[Tensor, ...]


@dataclass(frozen=True)
class ChunkResult:
    """``losses [L, len(removals), Q]``: each retrained model's per-query loss (the task's dtype, on the CPU)
    after each of the spec's ``L = len(spec.lengths)`` retraining lengths (1 without snapshots); ``margins``
    (same shape): the task's per-query margin (:meth:`~tasks.base.Task.per_example_measures`) of the same models."""

    key: tuple[int, int]
    losses: np.ndarray
    grad_norms: tuple[float, ...]
    margins: np.ndarray | None = None


def run_chunk(problem: RetrainProblem, chunk: RetrainChunk) -> ChunkResult:
    """Retrain one chunk and measure its query losses (the same function on every executor)."""
    torch.set_num_threads(problem.threads)
    task, data, spec = problem.task, problem.data, chunk.spec
    if problem.shared is not None:
        task.adopt_retrain_state(problem.shared)
    model = task.build_model()
    retrained, by_length = retrain_at_lengths(task, data, problem.base, list(chunk.removals), spec)
    with torch.no_grad():
        measured = [[task.per_example_measures(model, params, data.queries) for params in row] for row in by_length]
    losses = np.stack([np.stack([loss.cpu().numpy() for loss, _ in row]) for row in measured])
    margins = np.stack([np.stack([margin.cpu().numpy() for _, margin in row]) for row in measured])
    norms = tuple(float(r.diagnostics["grad_norm"]) for r in retrained if "grad_norm" in r.diagnostics)
    return ChunkResult(chunk.key, losses, norms, margins)


class Executor(ABC):
    """Runs chunks; ``workers`` is how many run at once (for the record and progress)."""

    workers: int = 1
    description: str = "in process"

    @abstractmethod
    def run(self, problem: RetrainProblem, chunks: Sequence[RetrainChunk]) -> Iterator[ChunkResult]:
        """Every chunk's result, in the order they finish."""

    @abstractmethod
    def close(self) -> None:
        """Release workers (a closed executor is not used again)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess(Executor):
    """One chunk after another in this process (``--workers 1``)."""

    def run(self, problem: RetrainProblem, chunks: Sequence[RetrainChunk]) -> Iterator[ChunkResult]:
        threads = torch.get_num_threads()
        try:
            for chunk in chunks:
                yield run_chunk(problem, chunk)
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        return None


# ---- local worker processes ------------------------------------------------------------------------------

_worker_problem: dict[str, RetrainProblem] = {}  # in a worker: the problem file last read, by path


def _run_from_file(path: str, chunk: RetrainChunk) -> ChunkResult:
    if path not in _worker_problem:
        _worker_problem.clear()
        with open(path, "rb") as file:
            _worker_problem[path] = pickle.load(file)
    return run_chunk(_worker_problem[path], chunk)


class LocalProcesses(Executor):
    """``--workers N``: N spawned processes on this machine, started on first use and kept for the run. Each
    ground truth's shared problem is written once to a temporary file that every worker reads once. A worker
    that dies (killed, out of memory) breaks the pool: it is started afresh and the unfinished chunks run
    again, up to ``retries`` times, then the ground truth fails with the reason."""

    def __init__(self, workers: int, plugins: Sequence[str] = (), *, retries: int = 2):
        if workers < 2:
            raise ValueError(f"LocalProcesses needs ≥ 2 workers, got {workers} (1 is InProcess)")
        self.workers, self.description = workers, f"{workers} local worker processes"
        self.plugins, self.retries = tuple(plugins), retries
        self._pool = self._new_pool()
        self._folder = tempfile.TemporaryDirectory(prefix="ifbench-retrain-")
        self._problems = 0

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=prepare_worker, initargs=(self.plugins,))

    def run(self, problem: RetrainProblem, chunks: Sequence[RetrainChunk]) -> Iterator[ChunkResult]:
        self._problems += 1
        path = Path(self._folder.name) / f"problem-{self._problems}.pkl"
        with path.open("wb") as file:  # streamed: no second in-memory copy of a large shared state
            pickle.dump(problem, file)
        todo, attempt = list(chunks), 0
        try:
            while todo:
                futures = {self._pool.submit(_run_from_file, str(path), chunk): chunk for chunk in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        result = future.result()
                        todo.remove(futures[future])
                        yield result
                except concurrent.futures.process.BrokenProcessPool as err:
                    attempt += 1
                    self._kill()
                    if attempt > self.retries:
                        raise RuntimeError(f"a retrain worker died {attempt} times ({err}); "
                                           f"{len(todo)} of {len(chunks)} retrain chunks unfinished") from None
                    self._pool = self._new_pool()
        finally:
            path.unlink(missing_ok=True)

    def _kill(self) -> None:
        """Stop the pool now: its workers are killed, not waited for (Ctrl-C, a dead worker)."""
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()

    def close(self) -> None:
        self._kill()
        self._folder.cleanup()


# ---- Dask ------------------------------------------------------------------------------------------------


def _same(value: Any) -> Any:
    return value


def _plugin_importer(plugins: Sequence[str]) -> Any:
    """A Dask worker plug-in importing ``plugins`` on every worker, those started later included (a worker
    restarted after a death must resolve plug-in classes too)."""
    from distributed import WorkerPlugin

    class ImportPlugins(WorkerPlugin):
        name = "ifbench-plugins"

        def setup(self, worker: Any) -> None:
            from bench.catalog import default_registries

            default_registries(plugins)

    return ImportPlugins()


class DaskCluster(Executor):
    """``--scheduler local:N`` (a ``LocalCluster`` of N single-threaded worker processes) or
    ``--scheduler tcp://HOST:PORT`` (an existing ``dask.distributed`` cluster whose workers have ifbench and
    the plug-in files installed). A chunk whose worker died is run again on another (Dask's own retry, up to
    its ``distributed.scheduler.allowed-failures``)."""

    def __init__(self, scheduler: str, plugins: Sequence[str] = ()):
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would drown the run's own
        self._cluster = None
        if scheduler.startswith(SCHEDULER_LOCAL):
            self._cluster = LocalCluster(n_workers=int(scheduler[len(SCHEDULER_LOCAL):]), threads_per_worker=1,
                                         processes=True, dashboard_address=None)
            self._client = Client(self._cluster)
        else:
            self._client = Client(scheduler)
        self.workers = max(1, len(self._client.scheduler_info().get("workers", {})))
        self.description = f"Dask at {scheduler} ({self.workers} workers)"
        if plugins:
            self._client.register_plugin(_plugin_importer(tuple(plugins)))

    def run(self, problem: RetrainProblem, chunks: Sequence[RetrainChunk]) -> Iterator[ChunkResult]:
        from distributed import as_completed

        # a task's result, not scattered data: if the workers holding it die, Dask computes it again. Without the
        # task's shared state (mnist-logreg's: a 0.5 GB factor), which would travel through the scheduler: each
        # worker computes it itself, with the same thread count, so to the same bits
        shared = self._client.submit(_same, dataclasses.replace(problem, shared=None), pure=False)
        futures = self._client.map(run_chunk, [shared] * len(chunks), list(chunks), pure=False)
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            self._client.cancel([*futures, shared])

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_executor(workers: int = 1, scheduler: str = "", plugins: Sequence[str] = ()) -> Executor:
    """The executor a run asks for: Dask when ``scheduler`` is set, else ``workers`` local processes."""
    if scheduler:
        check_scheduler(scheduler)
        return DaskCluster(scheduler, plugins)
    return LocalProcesses(workers, plugins) if workers > 1 else InProcess()
