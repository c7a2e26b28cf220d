"""Reference floors: estimators any useful method must beat."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from bench.seeding import torch_generator
from estimators.base import Estimator, FitContext
from tasks.base import Split


@registered("random")
class RandomScores(Estimator):
    """Independent standard-normal scores, seeded: the chance level (correlation ≈ 0)."""

    is_baseline: ClassVar[bool] = True

    def fit(self, ctx: FitContext) -> None:
        self.seed = ctx.seed

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        generator = torch_generator(self.seed, "random-scores", len(queries), len(train_idx))
        return torch.randn(len(queries), len(train_idx), generator=generator, dtype=torch.float32)
