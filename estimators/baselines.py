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
        self.seed, self.n_train = ctx.seed, ctx.n_train

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        """One fixed draw per (query row, training point), whichever columns are asked for."""
        generator = torch_generator(self.seed, "random-scores", len(queries))
        full = torch.randn(len(queries), self.n_train, generator=generator, dtype=torch.float32)
        return full[:, train_idx.cpu()]
