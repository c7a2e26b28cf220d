"""Leave-one-out ground truth: remove one training point at a time and retrain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.groundtruth.base import GroundTruth, Protocol
from bench.registry import registered
from bench.seeding import rng
from tasks.base import Task, TaskData, TrainedModel


@dataclass(frozen=True)
class LooConfig:
    """``n_removed`` training points, sampled uniformly with the protocol's seed; ``chunk`` retrains per call."""

    n_removed: int = 100
    chunk: int = 25


def plan_removals(n_train: int, n_removed: int, seed: int) -> np.ndarray:
    """Sorted, distinct training indices to leave out, chosen from the seed alone."""
    if not 0 < n_removed <= n_train:
        raise ValueError(f"loo: n_removed must be in 1..{n_train} (the training-set size), got {n_removed}")
    return np.sort(rng(seed, "loo", "removals").choice(n_train, size=n_removed, replace=False))


@registered("loo")
class LeaveOneOut(Protocol):
    """Retrain without each sampled point (the task's recipe: warm start or from scratch)."""

    Config: ClassVar[type] = LooConfig

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        removed = plan_removals(len(data.train), self.config.n_removed, self.seed)
        model = task.build_model()
        queries = data.queries
        with torch.no_grad():
            base_loss = task.per_example_loss(model, base.params, queries)
        columns, grad_norms = [], []
        bar = tqdm(total=len(removed), desc=f"loo retrains [{task.name}]", unit="retrain", disable=not progress, leave=False)
        for start in range(0, len(removed), self.config.chunk):
            chunk = removed[start : start + self.config.chunk]
            for result in task.retrain_without(data, base, [torch.tensor([i]) for i in chunk]):
                with torch.no_grad():
                    columns.append((task.per_example_loss(model, result.params, queries) - base_loss).cpu().numpy())
                grad_norms.append(result.diagnostics.get("grad_norm", float("nan")))
            bar.update(len(chunk))
        bar.close()
        return GroundTruth(
            protocol=self.name,
            train_idx=removed,
            actual=np.stack(columns, axis=1).astype(np.float64),
            diagnostics={"max_retrain_grad_norm": float(np.nanmax(grad_norms)) if grad_norms else float("nan")},
        )
