"""Low-rank influence by Arnoldi iteration (Schioppa, Zablotskaia, Vilar & Sokolov, AAAI 2022).

Arnoldi iteration on ``H = (1/n) Σ ∇²ℓ_i + l2·I`` (matrix-free, full-data Hessian-vector products) finds its
``rank`` largest eigenpairs (λ_i, v_i); influence then inverts H on that subspace only:

    H⁻¹ ≈ Σ_i v_i v_iᵀ / λ_i,   scores[q, j] = (1/n) Σ_i (v_i·g_q)(v_i·g_{z_j}) / λ_i

(the paper's projection onto the top eigenspace: directions of small curvature, which an exact inverse
amplifies most, are dropped). With ``rank`` = P and a Krylov space that spans everything, it is exact IF.

``gradients = "layers"`` works on the Linear/Conv2d layers among the chosen parameters (norms left out): per-example
gradients from batched backward passes, training points scored ``column_chunk`` at a time, so no ``[n, P]`` matrix
is formed (memory O(Q·P + column_chunk·P + iterations·P)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import FlatLoss, hvp_operator
from estimators.base import FitContext
from estimators.influence import InverseHvpInfluence
from estimators.layers import GRADIENTS, LayerGradientSource, layer_gradient_source
from estimators.options import at_least, one_of
from estimators.solvers import arnoldi_eigenpairs
from tasks.base import Split


@dataclass(frozen=True)
class ArnoldiConfig:
    """``iterations`` Arnoldi steps (one full-data HVP each) and the ``rank`` top eigenpairs kept; ``gradients``:
    ``"vmap"`` (per-example gradients of every chosen parameter) or ``"layers"`` (see the module docstring)."""

    iterations: int = 200
    rank: int = 50
    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    hvp_chunk: int = 2048
    gradients: str = "vmap"
    column_chunk: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= self.iterations:
            raise ValueError(f"arnoldi needs 1 ≤ rank ≤ iterations, got rank={self.rank}, iterations={self.iterations}")
        at_least(0, damping=self.damping)
        at_least(1, grad_chunk=self.grad_chunk, hvp_chunk=self.hvp_chunk, column_chunk=self.column_chunk)
        one_of("gradients", self.gradients, GRADIENTS)


@registered("arnoldi")
class ArnoldiInfluence(InverseHvpInfluence):
    """Influence through H's top-``rank`` eigenpairs, found by Arnoldi iteration on HVPs."""

    Config: ClassVar[type] = ArnoldiConfig
    source: LayerGradientSource | None = None

    def make_flat(self, ctx: FitContext) -> FlatLoss:
        if self.config.gradients != "layers":
            return super().make_flat(ctx)
        names = tuple(self.config.parameters or ctx.default_parameters)
        self.source = layer_gradient_source(ctx.model, ctx.params, names, ctx.loss, self.config.grad_chunk)
        return FlatLoss.of(ctx.model, self.source.params, ctx.loss, self.source.names)  # the source's flat order

    def prepare(self, ctx: FitContext) -> None:
        cfg = self.config
        matvec = hvp_operator(self.flat, ctx.train, self.l2, chunk=cfg.hvp_chunk)
        iterations = min(cfg.iterations, self.flat.size)
        self._values, self._vectors = arnoldi_eigenpairs(matvec, self.flat.size, like=self.flat.theta(),
                                                         iterations=iterations, rank=cfg.rank, seed=ctx.seed)
        if not bool((self._values > 0).all()):
            raise ValueError(f"arnoldi found a non-positive eigenvalue ({float(self._values.min()):.3g}) among the top "
                             f"{len(self._values)}: the Hessian is not positive definite there; add damping")
        self._info.update(rank=float(len(self._values)), top_eigenvalue=float(self._values[0]),
                          smallest_kept_eigenvalue=float(self._values[-1]))

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        """Σ_i v_i (v_i·v) / λ_i for each row of ``vectors [B, P]``."""
        return ((vectors @ self._vectors.T) / self._values) @ self._vectors

    def grads(self, split: Split) -> Tensor:
        if self.source is None:
            return super().grads(split)
        return self.source(split.in_dtype(self.flat.theta().dtype))

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        if self.source is None:
            return super().score(queries, train_idx)
        solved = self.s_test(queries)
        parts = [solved @ grads.T for _, grads in self.source.chunks(self.ctx.train, train_idx, self.config.column_chunk)]
        return (torch.cat(parts, 1) / self.ctx.n_train).float()

    def self_influence(self, train_idx: Tensor) -> Tensor:
        if self.source is None:
            return super().self_influence(train_idx)
        parts = [(self.inverse_hvp(grads) * grads).sum(1)
                 for _, grads in self.source.chunks(self.ctx.train, train_idx, self.config.column_chunk)]
        return (torch.cat(parts) / self.ctx.n_train).float()
