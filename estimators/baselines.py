"""Reference floors: estimators any useful method must beat."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.func import functional_call

from bench.registry import registered
from bench.seeding import torch_generator
from estimators.base import SELF_INFLUENCE, Estimator, FitContext
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


@registered("loss")
class TrainingLoss(Estimator):
    """Self-influence baseline: a training point's own loss at θ̂ (high loss, likely mislabelled).

    The ranking any mislabel detector must beat; it predicts nothing about other points.
    """

    is_baseline: ClassVar[bool] = True
    uses_head_view: ClassVar[bool] = True  # deep tasks: the head over cached features gives the same loss
    capabilities: ClassVar[frozenset[str]] = frozenset({SELF_INFLUENCE})

    def fit(self, ctx: FitContext) -> None:
        self.ctx = ctx

    @torch.no_grad()
    def self_influence(self, train_idx: Tensor, chunk: int = 1024) -> Tensor:
        """``[len(train_idx)]`` per-example training loss ℓ(z, θ̂)."""
        ctx, parts = self.ctx, []
        for idx in train_idx.split(chunk):
            batch = ctx.train.subset(idx)
            parts.append(ctx.loss(functional_call(ctx.model, ctx.params, (batch.inputs,)), batch.targets))
        return torch.cat(parts).float()
