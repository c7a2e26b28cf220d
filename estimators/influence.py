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
from estimators.base import PARAMETER_UPDATE, SELF_INFLUENCE, SINGLE, Estimator, FitContext, OverLimit
from estimators.options import at_least, positive, within
from estimators.solvers import SolverDivergedError, conjugate_gradient, lissa, top_eigenvalue
from tasks.base import Params, Split


def perturbation_gradient(flat: FlatLoss, train: Split, removed: Tensor, new_targets: Tensor | None,
                          chunk: int = 64) -> Tensor:
    """``[P]``: Σ_{z∈removed} ∇ℓ(z) − Σ ∇ℓ(z with its new target): the gradient of the terms that
    leave (and, for a relabelling, join) the objective's sum."""
    group = train.subset(removed)
    shift = per_example_grads(flat, group, chunk=chunk).sum(0)
    if new_targets is not None:
        relabelled = Split(group.inputs, torch.as_tensor(new_targets, device=group.targets.device))
        shift = shift - per_example_grads(flat, relabelled, chunk=chunk).sum(0)
    return shift


class InverseHvpInfluence(Estimator):
    """Shared scoring: scores[q, j] = g_qᵀ H⁻¹ g_{z_j} / n. Subclasses supply ``inverse_hvp``."""

    uses_head_view: ClassVar[bool] = True
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, PARAMETER_UPDATE, SELF_INFLUENCE})

    def fit(self, ctx: FitContext) -> None:
        self.task_dtype = next(iter(ctx.params.values())).dtype
        ctx = ctx.in_precision(getattr(self.config, "dtype", ""))
        self.ctx = ctx
        self.flat = self.make_flat(ctx)
        self.l2 = ctx.l2 + self.config.damping
        self._info: dict[str, float] = {"n_parameters": float(self.flat.size)}
        self.prepare(ctx)

    def make_flat(self, ctx: FitContext) -> FlatLoss:
        """The loss over the chosen parameters (``parameters``, else the task's default subset)."""
        return FlatLoss.of(ctx.model, ctx.params, ctx.loss, self.config.parameters or ctx.default_parameters or None)

    def prepare(self, ctx: FitContext) -> None:
        """Query-independent work (factorisations, scale estimates)."""

    @abstractmethod
    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        """H⁻¹ v for each row of ``vectors [B, P]``."""

    def grads(self, split: Split) -> Tensor:
        """Per-example gradients ``[len(split), P]`` at θ̂ on the chosen parameters."""
        return per_example_grads(self.flat, split.in_dtype(self.flat.theta().dtype), chunk=self.config.grad_chunk)

    def s_test(self, queries: Split) -> Tensor:
        """``H⁻¹ g_q`` for each query: ``[len(queries), P]``. Memoised for the last query set, so protocols
        that share queries (loo, group, lds, ...) solve once per fit; ``s_test_reused`` counts reuses."""
        cached = getattr(self, "_s_test", None)
        if cached is not None and cached[0].shape == queries.inputs.shape and torch.equal(cached[0], queries.inputs) \
                and torch.equal(cached[1], queries.targets):
            self._info["s_test_reused"] = self._info.get("s_test_reused", 0.0) + 1.0
            return cached[2]
        solution = self.inverse_hvp(self.grads(queries))
        self._s_test = (queries.inputs, queries.targets, solution)
        return solution

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        train_grads = self.grads(self.ctx.train.subset(train_idx))
        return (self.s_test(queries) @ train_grads.T / self.ctx.n_train).float()

    def update(self, removed: Tensor, new_targets: Tensor | None = None) -> Params:
        """Δθ = H⁻¹ (Σ_removed g_z − Σ_relabelled g_z') / n on the chosen parameters (Koh & Liang's ε = −1/n)."""
        shift = perturbation_gradient(self.flat, self.ctx.train, removed, new_targets, self.config.grad_chunk)
        step = self.inverse_hvp(shift[None])[0] / self.ctx.n_train
        return {name: value.to(self.task_dtype) for name, value in self.flat.split_vector(step).items()}

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """g_zᵀ H⁻¹ g_z / n: the first-order rise of z's own loss when z is removed."""
        grads = self.grads(self.ctx.train.subset(train_idx))
        return ((self.inverse_hvp(grads) * grads).sum(1) / self.ctx.n_train).float()

    def diagnostics(self) -> dict[str, float]:
        return dict(self._info)


@dataclass(frozen=True)
class ExactConfig:
    """``parameters``: names or dotted prefixes (empty: the task's default subset; ``["*"]``: every parameter).
    ``damping`` adds to the task's l2."""

    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    max_parameters: int = 12_000

    def __post_init__(self) -> None:
        at_least(0, damping=self.damping)
        at_least(1, grad_chunk=self.grad_chunk, max_parameters=self.max_parameters)


@registered("if-exact")
class ExactInfluence(InverseHvpInfluence):
    """Explicit Hessian, Cholesky-factored once (small models only: P² memory)."""

    Config: ClassVar[type] = ExactConfig

    def prepare(self, ctx: FitContext) -> None:
        self._solve = exact_solver(self.flat, ctx, self.config.damping, self.config.max_parameters, self._info)

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        return self._solve(vectors)


def exact_solver(flat: FlatLoss, ctx: FitContext, damping: float, max_parameters: int,
                 info: dict[str, float]) -> Callable[[Tensor], Tensor]:
    """``v [B, P] -> H⁻¹v`` through one Cholesky factorisation of the explicit Hessian (see dense_hessian)."""
    factor = cholesky_factor(dense_hessian(flat, ctx, damping, max_parameters, info))
    return lambda vectors: torch.cholesky_solve(vectors.T, factor).T


def cg_solver(flat: FlatLoss, train: Split, l2: float, *, tol: float, max_iter: int, hvp_chunk: int,
              info: dict[str, float]) -> Callable[[Tensor], Tensor]:
    """``v [B, P] -> H⁻¹v`` by conjugate gradients on HVPs; records iterations and residual in ``info``."""
    matvec = hvp_operator(flat, train, l2, chunk=hvp_chunk)

    def solve(vectors: Tensor) -> Tensor:
        solution, result = conjugate_gradient(matvec, vectors, tol=tol, max_iter=max_iter)
        info.update(cg_iterations=float(result.iterations), cg_relative_residual=result.relative_residual)
        return solution

    return solve


def dense_hessian(flat: FlatLoss, ctx: FitContext, damping: float, max_parameters: int,
                  info: dict[str, float]) -> Tensor:
    """``[P, P]`` Hessian of the objective plus ``damping``·I on ``flat``'s parameters (the task's closed
    form when it has one for all parameters). Raises NotApplicable above ``max_parameters``."""
    if flat.size > max_parameters:
        raise OverLimit(f"{flat.size:,} parameters exceed max_parameters={max_parameters:,} "
                        "for an explicit Hessian; restrict 'parameters' or use an iterative solver",
                        limit=f"max_parameters = {max_parameters:,}")
    model_order = tuple(name for name, _ in ctx.model.named_parameters())  # the closed form's flattening order
    closed_form = None
    if ctx.exact_hessian is not None and flat.names == tuple(ctx.params) == model_order:
        closed_form = ctx.exact_hessian()  # None where the task has no closed form (every non-convex task)
    hessian = closed_form if closed_form is not None else full_hessian(flat, ctx.train, ctx.l2)
    info["closed_form_hessian"] = float(closed_form is not None)
    if damping:
        hessian = hessian + damping * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device)
    return hessian


def cholesky_factor(matrix: Tensor) -> Tensor:
    """Lower Cholesky factor; a clear error when the matrix is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise SolverDivergedError(f"Hessian is not positive definite (column {int(info)}): add damping")
    return factor


#: Precisions an iterative solver may run in; "" is the task's own.
SOLVER_DTYPES = ("float32", "float64", "")


def check_solver_dtype(dtype: str) -> None:
    if dtype not in SOLVER_DTYPES:
        raise ValueError(f"dtype must be one of {SOLVER_DTYPES} ('' = the task's own), got {dtype!r}")


@dataclass(frozen=True)
class CgConfig:
    """Conjugate gradients on full-data Hessian-vector products, all queries batched. ``dtype``: the precision
    gradients and HVPs are computed in ("" = the task's; float32 by default, as the peers do: on mnist-logreg,
    float64 at 1e-5 took 92 iterations and 2.2× the time of float32's 125, whose solutions differ by 2.4e-6)."""

    tol: float = 1e-5
    max_iter: int = 1000
    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    hvp_chunk: int = 2048
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_solver_dtype(self.dtype)
        positive(tol=self.tol)
        at_least(1, max_iter=self.max_iter, grad_chunk=self.grad_chunk, hvp_chunk=self.hvp_chunk)
        at_least(0, damping=self.damping)


@registered("if-cg")
class CgInfluence(InverseHvpInfluence):
    """s_test by conjugate gradients (Martens 2010; Koh & Liang's default for big models)."""

    Config: ClassVar[type] = CgConfig
    version: ClassVar[str] = "2"  # 2: float32 by default

    def prepare(self, ctx: FitContext) -> None:
        cfg = self.config
        self._solve = cg_solver(self.flat, ctx.train, self.l2, tol=cfg.tol, max_iter=cfg.max_iter,
                                hvp_chunk=cfg.hvp_chunk, info=self._info)

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        return self._solve(vectors)


@dataclass(frozen=True)
class LissaConfig:
    """LiSSA settings. ``scale = 0`` picks 1.25 × the top Hessian eigenvalue (power iteration). ``dtype``: as
    for if-cg (float32 by default)."""

    depth: int = 2000
    repeats: int = 1
    batch_size: int = 256
    scale: float = 0.0
    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    auto_retries: int = 3
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_solver_dtype(self.dtype)
        at_least(1, depth=self.depth, repeats=self.repeats, batch_size=self.batch_size, grad_chunk=self.grad_chunk)
        at_least(0, scale=self.scale, auto_retries=self.auto_retries)
        within("damping", self.damping, 0, 1, why="LiSSA multiplies by 1 − damping each step")


def lissa_auto_scale(flat: FlatLoss, train: Split, l2: float, seed: int) -> float:
    """LiSSA's scale when none is given: 1.25 × H's top eigenvalue (30 power iterations, a slight underestimate)."""
    top = top_eigenvalue(hvp_operator(flat, train, l2), flat.size, like=flat.theta(), iterations=30, seed=seed)
    return 1.25 * top


@registered("if-lissa")
class LissaInfluence(InverseHvpInfluence):
    """s_test by LiSSA's stochastic Neumann series on mini-batch Hessians.

    Here ``damping`` is LiSSA's own (1 − damping) factor, which regularises H by
    damping·scale; the task's l2 is always part of the Hessian.
    """

    Config: ClassVar[type] = LissaConfig
    version: ClassVar[str] = "2"  # 2: float32 by default

    def fit(self, ctx: FitContext) -> None:
        if not 0.0 <= self.config.damping < 1.0:
            raise ValueError(f"if-lissa damping must be in [0, 1), got {self.config.damping}")
        super().fit(ctx)

    def prepare(self, ctx: FitContext) -> None:
        self.l2 = ctx.l2  # LiSSA's damping enters through the recursion, not the Hessian
        if self.config.scale > 0:
            self.scale, self.auto = self.config.scale, False
        else:
            self.scale, self.auto = lissa_auto_scale(self.flat, ctx.train, self.l2, ctx.seed), True
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
