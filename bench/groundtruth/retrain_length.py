"""Agreement as a function of retraining length (Schioppa et al., NeurIPS 2023).

Leave-one-out effects are measured after warm-started retraining from θ̂ for each
of several lengths T (in SGD steps, against a same-seed control run of the same
length), for the same removed points. The estimator's single scores are
compared with each T separately; the headline is the mean over T.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from bench import metrics
from bench.groundtruth.base import CellResult, Evaluation, GroundTruth, Protocol, Settings, checked
from bench.groundtruth.loo import base_reference, plan_removals, retrain_effects
from bench.registry import registered
from tasks.base import RetrainSpec, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class RetrainLengthConfig:
    """``steps``: the retraining lengths T swept; ``seeds`` for the noise ceiling."""

    n_removed: int = 30
    steps: tuple[int, ...] = (25, 100, 400)
    seeds: int = 2
    lr_factor: float = 0.1
    chunk: int = 10


def _label(steps: int) -> str:
    return f"pearson@T={steps}"


@registered("retrain-length")
class RetrainLength(Protocol):
    """Leave-one-out after T warm-started SGD steps, for several T."""

    Config: ClassVar[type] = RetrainLengthConfig
    headline: ClassVar[str] = "pearson"
    column_noun: ClassVar[str] = "(removed point, T) pairs"

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(_label(t) for t in self.config.steps)

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        cfg = self.config
        if not cfg.steps or min(cfg.steps) < 1:
            raise ValueError(f"retrain-length: steps must be positive step counts, got {list(cfg.steps)}")
        removed = plan_removals(len(data.train), cfg.n_removed, self.seed)
        blocks, diagnostics = [], {}
        for steps in cfg.steps:
            specs = [RetrainSpec("warm", s, steps, cfg.lr_factor) for s in range(cfg.seeds)]
            deltas, diagnostics = retrain_effects(task, data, base, [torch.tensor([i]) for i in removed], specs,
                                                  base_reference, chunk=cfg.chunk, progress=progress,
                                                  desc=f"retrain-length T={steps} [{task.name}]")
            blocks.append(deltas)
        stacked = np.concatenate(blocks, axis=2)  # [S, Q, T·R], T-major
        extra = {"steps": np.array(cfg.steps), "removed": removed}
        return GroundTruth(self.name, np.tile(removed, len(cfg.steps)), stacked[0], diagnostics,
                           stacked[1:] if cfg.seeds > 1 else None, extra)

    def predict(self, ev: Evaluation) -> np.ndarray:
        removed = ev.truth.extra["removed"]
        index = torch.as_tensor(removed, dtype=torch.long, device=ev.data.train.targets.device)
        scores = checked(ev.estimator.score(ev.queries, index), (len(ev.queries), len(removed)))
        return np.tile(scores, (1, len(ev.truth.extra["steps"])))

    def measure(self, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> CellResult:
        result = CellResult(predicted=predicted, actual=truth.actual)
        width = len(truth.extra["removed"])
        per_length = []
        for block, steps in enumerate(truth.extra["steps"].tolist()):
            columns = slice(block * width, (block + 1) * width)
            values = metrics.per_query(predicted[:, columns], truth.actual[:, columns], settings.top_k)["pearson"]
            result.add(_label(steps), values, settings)
            per_length.append(values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a query undefined at every T stays NaN
            result.add("pearson", np.nanmean(np.stack(per_length), axis=0), settings)
        return result
