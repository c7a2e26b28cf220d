"""The ground-truth protocol contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tasks.base import Task, TaskData, TrainedModel


@dataclass(frozen=True)
class GroundTruth:
    """Actual effects of removals: ``actual[q, j]`` = loss(θ₋ⱼ, z_q) − loss(θ̂, z_q).

    ``train_idx [R]`` names the removed training point of column j (the columns
    estimators are asked to score). Same sign convention as the estimators.
    ``replicates`` give the noise ceiling: how well a ground truth that differs
    only in retraining seed predicts this one.
    """

    protocol: str
    train_idx: np.ndarray
    actual: np.ndarray
    diagnostics: dict[str, float] = field(default_factory=dict)
    #: ``[S, Q, R]`` the same effects under other retraining seeds (None: deterministic ground truth).
    replicates: np.ndarray | None = None


class Protocol(ABC):
    """A way of producing ground truth by retraining."""

    name: ClassVar[str]
    Config: ClassVar[type]
    version: ClassVar[str] = "1"

    def __init__(self, config: Any, *, seed: int):
        self.config = config
        self.seed = seed

    @abstractmethod
    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        """Plan the retrains (never from any estimator's scores), run them, measure."""
