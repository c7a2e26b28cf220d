"""Retraining throughput: warm retrains per second, one model at a time vs trained together in stacks.

Each configuration trains ``steps`` SGD steps of the task's warm recipe from the same start (the rate
depends on shapes, not values), repeated ``repeats`` times interleaved so that machine noise falls on all
alike; the median is reported. A warm retrain is one epoch over the kept points (loo-warm's default).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from bench.groundtruth.retraining import warm_steps
from tasks.deep import SgdTask
from tasks.sgd import run_sgd, run_sgd_stacked

#: models trained one after another to time the lone rate (a single short run is too noisy a clock)
LONE_MODELS = 4


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

    @property
    def retrains_per_second(self) -> float:
        return self.models * self.steps / self.seconds / self.retrain_steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(task: SgdTask, stacks: Sequence[int], *, steps: int = 10, repeats: int = 3,
            progress: bool = True) -> list[Throughput]:
    """The lone rate (one model, :func:`run_sgd`) and the stacked rate for each size in ``stacks``."""
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

    configs: list[tuple[bool, int]] = [(False, LONE_MODELS)] + [(True, size) for size in stacks]
    times: dict[tuple[bool, int], list[float]] = {config: [] for config in configs}
    lone()  # warm-up: first-call allocations and kernel choices are not part of the rate
    for _ in tqdm(range(repeats), desc=f"throughput [{task.name}]", disable=not progress, leave=False):
        for is_stacked, size in configs:
            _synchronize(task.device)
            began = time.perf_counter()
            stacked(size) if is_stacked else lone()
            _synchronize(task.device)
            times[is_stacked, size].append(time.perf_counter() - began)
    retrain_steps = warm_steps(task, len(data.train) - 1, 1.0)
    return [Throughput(task.name, task.device.type, torch.get_num_threads(), is_stacked, size,
                       statistics.median(times[is_stacked, size]), steps, retrain_steps)
            for is_stacked, size in configs]


def markdown(rows: Sequence[Throughput]) -> str:
    """A table: retrains per second and the ratio to one model at a time on the same task."""
    lines = ["| task | device | threads | how | models | warm retrains / s | × one at a time |",
             "|---|---|---|---|---:|---:|---:|"]
    lone = {row.task: row.retrains_per_second for row in rows if not row.stacked}
    for row in rows:
        how = "stacked" if row.stacked else "one at a time"
        lines.append(f"| {row.task} | {row.device} | {row.threads} | {how} | {row.models} | "
                     f"{row.retrains_per_second:.2f} | {row.retrains_per_second / lone[row.task]:.2f} |")
    return "\n".join(lines) + "\n"
