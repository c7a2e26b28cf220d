"""Leave-one-out ground truth: remove one training point at a time and retrain.

Three registered variants, named in results:

- ``loo``: exact retraining to the unique optimum (convex tasks only);
- ``loo-warm``: from θ̂ for ``warm_steps`` SGD steps without the point (Koh &
  Liang's protocol for their CNN). Δ is measured against a control run of the
  same steps and seed *with* the point, so drift from continued training cancels;
- ``loo-scratch``: the full recipe from scratch with the same seed and data order
  minus the point; Δ is measured against the base model of that seed.

Non-convex variants repeat everything for ``seeds`` retraining seeds; seed 0
is the one whose θ̂ estimators see, the others are replicates that give the
noise ceiling (the metric between two ground truths differing only in seed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.groundtruth.base import GroundTruth, Protocol
from bench.registry import registered
from bench.seeding import rng
from tasks.base import Params, RetrainSpec, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class LooConfig:
    """``n_removed`` points sampled with the protocol's seed; ``seeds`` retraining seeds (non-convex)."""

    n_removed: int = 100
    chunk: int = 25
    seeds: int = 2
    warm_steps: int = 100
    warm_lr_factor: float = 0.1


def plan_removals(n_train: int, n_removed: int, seed: int) -> np.ndarray:
    """Sorted, distinct training indices to leave out, chosen from the seed alone."""
    if not 2 <= n_removed <= n_train:
        raise ValueError(f"loo: n_removed must be in 2..{n_train} (correlations need two removals; at most the "
                         f"training-set size), got {n_removed}")
    return np.sort(rng(seed, "loo", "removals").choice(n_train, size=n_removed, replace=False))


class LeaveOneOutBase(Protocol):
    Config: ClassVar[type] = LooConfig
    mode: ClassVar[str]

    def check_task(self, task: Task) -> None:
        """Raise ValueError if this variant cannot run on ``task``."""

    def n_seeds(self, task: Task) -> int:
        return 1 if task.convex else self.config.seeds

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        self.check_task(task)
        removed = plan_removals(len(data.train), self.config.n_removed, self.seed)
        specs = [RetrainSpec(self.mode, s, self.config.warm_steps, self.config.warm_lr_factor) for s in range(self.n_seeds(task))]
        deltas, diagnostics = retrain_effects(task, data, base, [torch.tensor([i]) for i in removed], specs,
                                              base_reference, chunk=self.config.chunk, progress=progress,
                                              desc=f"{self.name} retrains [{task.name}]")
        return GroundTruth(self.name, removed, deltas[0], diagnostics, deltas[1:] if len(specs) > 1 else None)


Reference = Callable[[Task, TaskData, TrainedModel, RetrainSpec], Params]


def retrain_effects(task: Task, data: TaskData, base: TrainedModel, removals: Sequence[Tensor], specs: Sequence[RetrainSpec],
                    reference: Reference, *, chunk: int = 25, progress: bool = True,
                    desc: str = "retrains") -> tuple[np.ndarray, dict[str, float]]:
    """``[len(specs), Q, len(removals)]`` query-loss changes: retrained without each removal, under each
    spec, minus the loss at ``reference(spec)`` (θ̂, or a same-seed control run)."""
    model, queries = task.build_model(), data.queries
    deltas = np.zeros((len(specs), len(queries), len(removals)))
    grad_norms: list[float] = []
    bar = tqdm(total=len(specs) * len(removals), desc=desc, unit="retrain", disable=not progress, leave=False)
    for s, spec in enumerate(specs):
        reference_params = reference(task, data, base, spec)  # may train: outside no_grad
        with torch.no_grad():
            reference_loss = task.per_example_loss(model, reference_params, queries)
        for start in range(0, len(removals), chunk):
            part = list(removals[start : start + chunk])
            for j, result in enumerate(task.retrain_without(data, base, part, spec)):
                with torch.no_grad():
                    deltas[s, :, start + j] = (task.per_example_loss(model, result.params, queries) - reference_loss).cpu()
                if "grad_norm" in result.diagnostics:
                    grad_norms.append(result.diagnostics["grad_norm"])
            bar.update(len(part))
    bar.close()
    diagnostics = {"seeds": float(len({spec.seed for spec in specs}))}
    if grad_norms:
        diagnostics["max_retrain_grad_norm"] = max(grad_norms)
    return deltas, diagnostics


def base_reference(task: Task, data: TaskData, base: TrainedModel, spec: RetrainSpec) -> Params:
    """The parameters Δ is measured against: θ̂ (exact), the same-seed control run (warm), or the
    base model of the replicate's seed (scratch)."""
    if spec.mode == "exact" or (task.convex and spec.mode == "scratch"):  # a convex task's scratch retrain is exact
        return base.params
    if spec.mode == "warm":
        return task.retrain_without(data, base, [torch.tensor([], dtype=torch.long)], spec)[0].params
    return base.params if spec.seed == 0 else task.train(data, seed=task.replicate_seed(spec.seed)).params


@registered("loo")
class LeaveOneOut(LeaveOneOutBase):
    """Exact leave-one-out: retrain to the unique optimum (convex tasks)."""

    mode: ClassVar[str] = "exact"

    def check_task(self, task: Task) -> None:
        if not task.convex:
            raise ValueError(f"protocol 'loo' retrains exactly and needs a convex task; {task.name} is not: "
                             "use 'loo-warm' or 'loo-scratch'")


@registered("loo-warm")
class LeaveOneOutWarm(LeaveOneOutBase):
    """Warm-started from θ̂ for T SGD steps without the point, against a same-seed control."""

    mode: ClassVar[str] = "warm"


@registered("loo-scratch")
class LeaveOneOutScratch(LeaveOneOutBase):
    """Retrained from scratch with the same seed and data order minus the point."""

    mode: ClassVar[str] = "scratch"
