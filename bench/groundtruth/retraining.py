"""Retraining shared by every protocol: plan specs, run the retrains, measure query-loss changes.

Warm-started retrains are sized in epochs over the kept points (≥ 1, so every
training point is visited and no removal is structurally invisible); the batch
order of replicate s comes from the task's seed (and so from the suite's ``--seed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.executors import Executor, InProcess, RetrainChunk, RetrainProblem
from tasks.base import Params, RetrainSpec, Task, TaskData, TrainedModel, retrain_at_lengths

RETRAIN_MODES = ("warm", "scratch")

def warm_steps(task: Task, n_kept: int, epochs: float) -> int:
    """SGD steps in ``epochs`` passes over ``n_kept`` points with the task's own batch size."""
    return max(1, round(epochs * task.steps_per_epoch(n_kept)))


def check_warm_epochs(epochs: float) -> None:
    """Warm retrains shorter than one epoch never see some removed points (their effect is exactly 0)."""
    if not epochs >= 1:
        raise ValueError(f"warm retrains must last at least 1 epoch (every removed point visited), got {epochs}")


def check_lr_factor(name: str, value: float) -> None:
    """A warm retrain's learning-rate factor: finite and > 0 (it multiplies the recipe's rate)."""
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number (a factor on the recipe's learning rate), got {value!r}")


def check_class(name: str, value: int) -> None:
    """A class index, or −1 for the protocol's own choice."""
    if value < -1:
        raise ValueError(f"{name} must be a class index ≥ 0, or -1 for the protocol's choice, got {value}")


def check_at_least(name: str, value: int, minimum: int, why: str = "") -> None:
    """Refuse a count below ``minimum`` (at planning, before any work)."""
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}{f' ({why})' if why else ''}, got {value}")


def check_retrain_mode(retrain: str) -> None:
    if retrain not in RETRAIN_MODES:
        raise ValueError(f"unknown retrain mode {retrain!r}. Valid: {', '.join(RETRAIN_MODES)}")


def retrain_specs(task: Task, retrain: str, seeds: int, lr_factor: float, *, n_kept: int,
                  epochs: float) -> list[RetrainSpec]:
    """One spec per retraining seed (a convex task retrains exactly, once); warm retrains last ``epochs``
    passes over ``n_kept`` points."""
    check_retrain_mode(retrain)
    if task.convex:
        return [RetrainSpec("exact")]
    steps = warm_steps(task, n_kept, epochs) if retrain == "warm" else 0
    return [RetrainSpec(retrain, s, steps, lr_factor) for s in range(seeds)]


def retrain_effects(task: Task, data: TaskData, base: TrainedModel, removals: Sequence[Tensor], specs: Sequence[RetrainSpec],
                    *, progress: bool = True, desc: str = "retrains",
                    executor: Executor | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """``[len(specs), Q, L·len(removals)]`` query-loss changes: retrained without each removal, under each
    spec, minus the loss at its :func:`reference_params` (θ̂, or a same-seed control run of each length). With
    snapshots, each spec yields ``L = len(spec.lengths)`` retraining lengths (the same L for every spec),
    length-major: columns ``[l·R, (l+1)·R)`` are the removals after the l-th length. Removals go to the task
    ``task.retrain_batch`` at a time (a stack trained together, see :meth:`Task.retrain_without`), each such
    chunk to ``executor`` (default: this process); the result does not depend on which executor ran it."""
    executor = executor or InProcess()
    model, queries = task.build_model(), data.queries
    lengths = {len(spec.lengths) for spec in specs}
    if len(lengths) != 1:
        raise ValueError(f"every spec of one ground truth must yield as many retraining lengths, got {sorted(lengths)}")
    n_lengths, width = lengths.pop(), len(removals)
    deltas = np.zeros((len(specs), len(queries), n_lengths * width))
    reference_losses = []  # per spec: [L, Q]
    for spec in specs:
        references = reference_params(task, data, base, spec)  # may train: outside no_grad
        with torch.no_grad():
            reference_losses.append(np.stack([task.per_example_loss(model, params, queries).cpu().numpy()
                                              for params in references]))
    chunks = [RetrainChunk((s, start), spec, tuple(removals[start : start + task.retrain_batch]))
              for s, spec in enumerate(specs) for start in range(0, len(removals), task.retrain_batch)]
    problem = RetrainProblem(task, data, base, torch.get_num_threads(), task.retrain_state(data, base, specs))
    grad_norms: dict[tuple[int, int], tuple[float, ...]] = {}
    bar = tqdm(total=len(specs) * len(removals), desc=desc, unit="retrain", disable=not progress, leave=False)
    for result in executor.run(problem, chunks):
        s, start = result.key
        count = result.losses.shape[1]
        for length, losses in enumerate(result.losses):
            first = length * width + start
            deltas[s, :, first : first + count] = (losses - reference_losses[s][length]).T
        grad_norms[result.key] = result.grad_norms
        bar.update(count)
    bar.close()
    diagnostics: dict[str, float] = {"seeds": float(len({spec.seed for spec in specs})),
                                     "exact_retraining": float(task.convex)}
    norms = [norm for key in sorted(grad_norms) for norm in grad_norms[key]]
    if norms:
        diagnostics["max_retrain_grad_norm"] = max(norms)
    return deltas, diagnostics


def reference_params(task: Task, data: TaskData, base: TrainedModel, spec: RetrainSpec) -> list[Params]:
    """The parameters Δ is measured against, one per retraining length of ``spec``: θ̂ (exact), the
    same-seed control run removing nothing (warm; its snapshots give the shorter lengths), or the base
    model of the replicate's seed (scratch)."""
    if spec.mode == "exact" or (task.convex and spec.mode == "scratch"):  # a convex task's scratch retrain is exact
        return [base.params]
    if spec.mode == "warm":
        _, by_length = retrain_at_lengths(task, data, base, [torch.tensor([], dtype=torch.long)], spec)
        return [params for (params,) in by_length]
    return [base.params if spec.seed == 0 else task.train(data, seed=task.replicate_seed(spec.seed)).params]
