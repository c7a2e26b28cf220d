"""Retraining throughput: warm retrains per second, one model at a time vs trained together in stacks.

Each configuration trains ``steps`` SGD steps of the task's warm recipe from the same start (the rate
depends on shapes, not values), repeated ``repeats`` times interleaved so that machine noise falls on all
alike; the median is reported. A warm retrain is one epoch over the kept points (loo-warm's default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from bench.executors import LocalProcesses, RetrainChunk, RetrainProblem
from bench.groundtruth.retraining import warm_steps
from tasks.base import Params, RetrainSpec, TaskData, TrainedModel
from tasks.deep import SgdTask
from tasks.sgd import run_sgd, run_sgd_stacked

#: models trained one after another to time the lone rate (a single short run is too noisy a clock)
LONE_MODELS = 4
#: stacks each worker trains per timed repeat (so that every worker is busy for most of the time)
WORKER_STACKS = 2


@dataclass(frozen=True)
class Throughput:
    """One configuration: ``models`` trained together (``stacked``) or one after another."""

    task: str
    device: str
    threads: int
    stacked: bool
    models: int
    seconds: float  # median wall time of ``steps`` steps of all ``models``
    steps: int
    retrain_steps: int  # steps of one warm retrain (one epoch)
    workers: int = 1  # > 1: stacks of the task's retrain_batch spread over this many worker processes

    @property
    def how(self) -> str:
        if self.workers > 1:
            return f"{self.workers} workers × 1 thread, stacks of {self.models // (WORKER_STACKS * self.workers)}"
        return "stacked" if self.stacked else "one at a time"

    @property
    def retrains_per_second(self) -> float:
        return self.models * self.steps / self.seconds / self.retrain_steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(task: SgdTask, stacks: Sequence[int], *, steps: int = 10, repeats: int = 3, workers: int = 1,
            progress: bool = True) -> list[Throughput]:
    """The lone rate (one model, :func:`run_sgd`), the stacked rate for each size in ``stacks`` and, with
    ``workers`` > 1, the rate of stacks of ``task.retrain_batch`` spread over that many worker processes of
    one thread each (through the executor ground truth uses: warm retrains of ``steps`` steps)."""
    data = task.load_data()
    model, start, recipe = task.build_model(), task.trainable(task.initial_params(task.seed)), task.recipe
    lr = 0.1 * recipe.lr

    def lone() -> None:
        for i in range(LONE_MODELS):
            run_sgd(model, start, data.train, task.loss, recipe, seed=1, exclude=torch.tensor([i]), max_steps=steps,
                    constant_lr=lr)

    def stacked(size: int) -> None:
        run_sgd_stacked(task.stacked_forward(), start, data.train, task.loss, recipe, seed=1,
                        excludes=[torch.tensor([i]) for i in range(size)], max_steps=steps, constant_lr=lr)

    threads = torch.get_num_threads()
    runs: dict[Throughput, Callable[[], None]] = {}

    def row(stacked_: bool, models: int, workers_: int = 1) -> Throughput:
        return Throughput(task.name, task.device.type, 1 if workers_ > 1 else threads, stacked_, models, 0.0,
                          steps, retrain_steps, workers_)

    retrain_steps = warm_steps(task, len(data.train) - 1, 1.0)
    runs[row(False, LONE_MODELS)] = lone
    for size in stacks:
        runs[row(True, size)] = functools.partial(stacked, size)
    with contextlib.ExitStack() as cleanup:
        if workers > 1:
            spread = cleanup.enter_context(_Spread(task, data, start, steps, workers))
            runs[row(True, spread.models, workers)] = spread
            spread()  # warm-up: the workers' start (spawn, imports, reading the problem) is not part of the rate
        lone()  # warm-up: first-call allocations and kernel choices are not part of the rate
        times: dict[Throughput, list[float]] = {key: [] for key in runs}
        for _ in tqdm(range(repeats), desc=f"throughput [{task.name}]", disable=not progress, leave=False):
            for key, run in runs.items():
                _synchronize(task.device)
                began = time.perf_counter()
                run()
                _synchronize(task.device)
                times[key].append(time.perf_counter() - began)
    return [dataclasses.replace(key, seconds=statistics.median(times[key])) for key in runs]


class _Spread:
    """Warm retrains of ``steps`` steps in stacks of ``task.retrain_batch``, :data:`WORKER_STACKS` stacks per
    worker, through the executor ground truth uses (a pool of one-thread worker processes)."""

    def __init__(self, task: SgdTask, data: TaskData, start: Params, steps: int, workers: int):
        self.pool = LocalProcesses(workers)
        self.problem = RetrainProblem(task, data, TrainedModel(start), threads=1)
        size, spec = task.retrain_batch, RetrainSpec("warm", 1, steps, 0.1)
        self.chunks = [RetrainChunk((0, c * size), spec, tuple(torch.tensor([c * size + i]) for i in range(size)))
                       for c in range(WORKER_STACKS * workers)]
        self.models = len(self.chunks) * size

    def __call__(self) -> None:
        for _ in self.pool.run(self.problem, self.chunks):
            pass

    def __enter__(self) -> _Spread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()


def markdown(rows: Sequence[Throughput]) -> str:
    """A table: retrains per second and the ratio to one model at a time on the same task."""
    lines = ["| task | device | threads | how | models | warm retrains / s | × one at a time |",
             "|---|---|---|---|---:|---:|---:|"]
    lone = {row.task: row.retrains_per_second for row in rows if not row.stacked}
    for row in rows:
        lines.append(f"| {row.task} | {row.device} | {row.threads} | {row.how} | {row.models} | "
                     f"{row.retrains_per_second:.2f} | {row.retrains_per_second / lone[row.task]:.2f} |")
    return "\n".join(lines) + "\n"
