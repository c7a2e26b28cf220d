"""Gradient-similarity estimators: TracInCP (Pruthi et al., NeurIPS 2020), grad-dot and grad-cos.

TracInCP(z, z_q) = Σ_k η_k ∇ℓ(θ_k, z)·∇ℓ(θ_k, z_q) over saved checkpoints θ_k,
η_k the learning rate in force there. A positive value marks z as a proponent
of z_q (training on z lowered z_q's loss), so removing z raises z_q's loss:
the sign already follows the suite's convention. TracIn is not scaled by 1/n;
correlations do not depend on scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import per_example_grads, select_parameters
from estimators.base import SELF_INFLUENCE, SINGLE, Estimator, FitContext, NotApplicable
from tasks.base import Params, Split


@dataclass(frozen=True)
class Stage:
    """Gradients at one parameter point, weighted: ``grads(split) → [len(split), P]``."""

    weight: float
    grads: Callable[[Split], Tensor]


def gradient_stage(ctx: FitContext, params: Params, names: tuple[str, ...], weight: float, chunk: int) -> Stage:
    """Per-example gradients at ``params`` on ``names``; through the task's head view at ``params`` when
    ``names`` are exactly the head (identical gradients, the trunk run once per split)."""
    flat, feed = ctx.flat_at(params, names)
    return Stage(weight, lambda split: per_example_grads(flat, feed(split), chunk=chunk))


class GradientSimilarity(Estimator):
    """scores[q, j] = Σ_stages weight · sim(g_q, g_{z_j}); subclasses choose the stages and ``sim``."""

    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, SELF_INFLUENCE})
    normalise: ClassVar[bool] = False

    version: ClassVar[str] = "2"  # 2: records n_parameters

    def fit(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.names = tuple(self.config.parameters or ctx.default_parameters)
        self.n_parameters = sum(ctx.params[n].numel() for n in select_parameters(ctx.params, self.names))
        self.stages = self.make_stages(ctx)

    def make_stages(self, ctx: FitContext) -> list[Stage]:
        raise NotImplementedError

    def _unit(self, grads: Tensor) -> Tensor:
        return grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-12) if self.normalise else grads

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        total = None
        for stage in self.stages:
            query_grads = self._unit(stage.grads(queries))
            part = torch.cat([query_grads @ self._unit(stage.grads(self.ctx.train.subset(cols))).T
                              for cols in train_idx.split(self.config.column_chunk)], dim=1)
            total = stage.weight * part if total is None else total + stage.weight * part
        return total.float()

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """Σ_k η_k ‖∇ℓ(θ_k, z)‖² (TracIn's self-influence, used to find mislabelled points)."""
        total = torch.zeros(len(train_idx), dtype=torch.float64)
        for stage in self.stages:
            for cols, out in zip(train_idx.split(self.config.column_chunk), total.split(self.config.column_chunk), strict=True):
                out += stage.weight * self._unit(stage.grads(self.ctx.train.subset(cols))).pow(2).sum(1).double().cpu()
        return total.float()

    def diagnostics(self) -> dict[str, float]:
        return {"stages": float(len(self.stages)), "n_parameters": float(self.n_parameters)}


@dataclass(frozen=True)
class TracInConfig:
    """``checkpoints``: which saved checkpoints to trace (Python indices, negative from the end; empty:
    all). ``parameters``: names or dotted prefixes (empty: the task's default subset; ``["*"]``: every parameter)."""

    checkpoints: tuple[int, ...] = ()
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    column_chunk: int = 1024


@registered("tracin")
class TracIn(GradientSimilarity):
    """TracInCP: learning-rate-weighted gradient dot products summed over training checkpoints."""

    Config: ClassVar[type] = TracInConfig

    def make_stages(self, ctx: FitContext) -> list[Stage]:
        if not ctx.checkpoints:
            raise NotApplicable("the task saved no training checkpoints to trace")
        chosen = self.config.checkpoints or tuple(range(len(ctx.checkpoints)))
        bad = [i for i in chosen if not -len(ctx.checkpoints) <= i < len(ctx.checkpoints)]
        if bad:
            raise ValueError(f"tracin: checkpoints {bad} out of range; the task saved {len(ctx.checkpoints)} "
                             f"(steps {[c.step for c in ctx.checkpoints]})")
        return [gradient_stage(ctx, ctx.checkpoints[i].params, self.names, ctx.checkpoints[i].learning_rate,
                               self.config.grad_chunk) for i in chosen]


@dataclass(frozen=True)
class GradDotConfig:
    """``parameters``: names or dotted prefixes (empty: the task's default subset; ``["*"]``: every parameter)."""

    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    column_chunk: int = 1024


@registered("grad-dot")
class GradDot(GradientSimilarity):
    """g_qᵀ g_z at θ̂ (TracIn at the final parameters, unweighted): influence with H = I."""

    Config: ClassVar[type] = GradDotConfig
    uses_head_view: ClassVar[bool] = True

    def make_stages(self, ctx: FitContext) -> list[Stage]:
        return [gradient_stage(ctx, ctx.params, self.names, 1.0, self.config.grad_chunk)]


@registered("grad-cos")
class GradCos(GradDot):
    """cos(g_q, g_z) at θ̂: gradient similarity without the gradient-norm factor."""

    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})  # a point's cosine with itself is always 1
    normalise: ClassVar[bool] = True
