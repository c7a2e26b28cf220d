"""Classic influence functions (Koh & Liang, ICML 2017) with exact, CG and LiSSA solvers.

Removing z changes the query loss by about ``+(1/n) g_qᵀ H⁻¹ g_z`` with
``H = (1/n) Σ ∇²ℓ_i + l2·I`` (+ optional extra damping) and ``g = ∇θ ℓ(·, θ̂)``.
Each query's ``s_test = H⁻¹ g_q`` is solved once, then dotted with every ``g_z``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from bench.seeding import torch_generator
from estimators.autodiff import FlatLoss, full_hessian, hvp_operator, per_example_grads
from estimators.base import Estimator, FitContext, NotApplicable
from estimators.solvers import SolverDivergedError, conjugate_gradient, lissa, top_eigenvalue
from tasks.base import Split


class InverseHvpInfluence(Estimator):
    """Shared scoring: scores[q, j] = g_qᵀ H⁻¹ g_{z_j} / n. Subclasses supply ``inverse_hvp``."""

    uses_head_view: ClassVar[bool] = True

    def fit(self, ctx: FitContext) -> None:
        self.ctx = ctx
        names = self.config.parameters or ctx.default_parameters or None
        self.flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss, names)
        self.l2 = ctx.l2 + self.config.damping
        self._info: dict[str, float] = {"n_parameters": float(self.flat.size)}
        self.prepare(ctx)

    def prepare(self, ctx: FitContext) -> None:
        """Query-independent work (factorisations, scale estimates)."""

    @abstractmethod
    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        """H⁻¹ v for each row of ``vectors [B, P]``."""

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        chunk = self.config.grad_chunk
        query_grads = per_example_grads(self.flat, queries, chunk=chunk)
        s_test = self.inverse_hvp(query_grads)
        train_grads = per_example_grads(self.flat, self.ctx.train.subset(train_idx), chunk=chunk)
        return (s_test @ train_grads.T / self.ctx.n_train).float()

    def diagnostics(self) -> dict[str, float]:
        return dict(self._info)


@dataclass(frozen=True)
class ExactConfig:
    """``parameters``: names to restrict to (empty: all). ``damping`` adds to the task's l2."""

    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    max_parameters: int = 12_000


@registered("if-exact")
class ExactInfluence(InverseHvpInfluence):
    """Explicit Hessian, Cholesky-factored once (small models only: P² memory)."""

    Config: ClassVar[type] = ExactConfig

    def prepare(self, ctx: FitContext) -> None:
        if self.flat.size > self.config.max_parameters:
            raise NotApplicable(f"{self.flat.size:,} parameters exceed max_parameters={self.config.max_parameters:,} "
                                "for an explicit Hessian; restrict 'parameters' or use if-cg")
        use_fast_path = ctx.exact_hessian is not None and self.flat.names == tuple(ctx.params)
        hessian = ctx.exact_hessian() if use_fast_path else full_hessian(self.flat, ctx.train, ctx.l2)
        if self.config.damping:
            hessian = hessian + self.config.damping * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) != 0:
            raise SolverDivergedError(f"Hessian is not positive definite (column {int(info)}): add damping")
        self.factor = factor
        self._info["closed_form_hessian"] = float(use_fast_path)

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        return torch.cholesky_solve(vectors.T, self.factor).T


@dataclass(frozen=True)
class CgConfig:
    """Conjugate gradients on full-data Hessian-vector products, all queries batched."""

    tol: float = 1e-5
    max_iter: int = 1000
    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    hvp_chunk: int = 2048


@registered("if-cg")
class CgInfluence(InverseHvpInfluence):
    """s_test by conjugate gradients (Martens 2010; Koh & Liang's default for big models)."""

    Config: ClassVar[type] = CgConfig

    def prepare(self, ctx: FitContext) -> None:
        self.matvec = hvp_operator(self.flat, ctx.train, self.l2, chunk=self.config.hvp_chunk)

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        solution, info = conjugate_gradient(self.matvec, vectors, tol=self.config.tol, max_iter=self.config.max_iter)
        self._info.update(cg_iterations=float(info.iterations), cg_relative_residual=info.relative_residual)
        return solution


@dataclass(frozen=True)
class LissaConfig:
    """LiSSA settings. ``scale = 0`` picks 1.25 × the top Hessian eigenvalue (power iteration)."""

    depth: int = 2000
    repeats: int = 1
    batch_size: int = 256
    scale: float = 0.0
    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    auto_retries: int = 3


@registered("if-lissa")
class LissaInfluence(InverseHvpInfluence):
    """s_test by LiSSA's stochastic Neumann series on mini-batch Hessians.

    Here ``damping`` is LiSSA's own (1 − damping) factor, which regularises H by
    damping·scale; the task's l2 is always part of the Hessian.
    """

    Config: ClassVar[type] = LissaConfig

    def fit(self, ctx: FitContext) -> None:
        if not 0.0 <= self.config.damping < 1.0:
            raise ValueError(f"if-lissa damping must be in [0, 1), got {self.config.damping}")
        super().fit(ctx)

    def prepare(self, ctx: FitContext) -> None:
        self.l2 = ctx.l2  # LiSSA's damping enters through the recursion, not the Hessian
        if self.config.scale > 0:
            self.scale, self.auto = self.config.scale, False
        else:
            top = top_eigenvalue(hvp_operator(self.flat, ctx.train, self.l2), self.flat.size,
                                 like=self.flat.theta(), iterations=30, seed=ctx.seed)
            self.scale, self.auto = 1.25 * top, True
        self._info["top_eigenvalue_scale"] = self.scale

    def _batch_matvec(self) -> Callable[[Tensor, int], Tensor]:
        generator = torch_generator(self.ctx.seed, "lissa-batches")
        n, size = self.ctx.n_train, min(self.config.batch_size, self.ctx.n_train)

        def batch_matvec(vectors: Tensor, step: int) -> Tensor:
            idx = torch.randperm(n, generator=generator)[:size]
            return hvp_operator(self.flat, self.ctx.train.subset(idx), self.l2)(vectors)

        return batch_matvec

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        cfg = self.config
        for attempt in range(cfg.auto_retries + 1):
            try:
                result = lissa(self._batch_matvec(), vectors, scale=self.scale, damping=cfg.damping,
                               depth=cfg.depth, repeats=cfg.repeats)
                self._info.update(scale=self.scale, divergence_restarts=float(attempt))
                return result
            except SolverDivergedError:
                if not self.auto or attempt == cfg.auto_retries:
                    raise
                self.scale *= 2.0
        raise AssertionError("unreachable")
