"""Batched solvers for H x = v, shared by the estimators and the convex tasks' retraining.

Every solver takes a matrix-free operator ``matvec: [B, P] -> [B, P]`` that
applies a symmetric positive-definite H to each row, and right-hand sides
``v: [B, P]``; it returns ``x: [B, P]`` with ``H x ≈ v`` row by row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


class SolverDivergedError(RuntimeError):
    """An iterative solver produced non-finite or exploding iterates."""


@dataclass(frozen=True)
class SolveInfo:
    """How a solve ended: iterations run and the worst relative residual ‖Hx − v‖/‖v‖."""

    iterations: int
    relative_residual: float


def conjugate_gradient(
    matvec: MatVec,
    v: Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    precondition: MatVec | None = None,
) -> tuple[Tensor, SolveInfo]:
    """(Preconditioned) conjugate gradients, one independent system per row of ``v``.

    Stops when every row has ‖r‖ ≤ tol·‖v‖. Rows already converged are frozen.
    """
    x = torch.zeros_like(v)
    residual = v.clone()
    v_norm = v.norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    z = precondition(residual) if precondition else residual
    direction = z.clone()
    rz = (residual * z).sum(1)
    for iteration in range(1, max_iter + 1):
        active = residual.norm(dim=1) > tol * v_norm
        if not bool(active.any()):
            return x, SolveInfo(iteration - 1, float((residual.norm(dim=1) / v_norm).max()))
        h_dir = matvec(direction)
        curvature = (direction * h_dir).sum(1)
        if bool((curvature[active] <= 0).any()) or not bool(torch.isfinite(curvature).all()):
            raise SolverDivergedError(
                f"conjugate gradient met non-positive curvature at iteration {iteration}: "
                "the operator is not positive definite (add damping)"
            )
        alpha = torch.where(active, rz / curvature.where(active, torch.ones_like(curvature)), torch.zeros_like(rz))
        x = x + alpha[:, None] * direction
        residual = residual - alpha[:, None] * h_dir
        z = precondition(residual) if precondition else residual
        rz_new = (residual * z).sum(1)
        beta = torch.where(active, rz_new / rz.where(active, torch.ones_like(rz)), torch.zeros_like(rz))
        direction = torch.where(active[:, None], z + beta[:, None] * direction, direction)
        rz = torch.where(active, rz_new, rz)
    return x, SolveInfo(max_iter, float((residual.norm(dim=1) / v_norm).max()))


def top_eigenvalue(matvec: MatVec, dim: int, *, like: Tensor, iterations: int = 50, seed: int = 0) -> float:
    """Largest eigenvalue of a PSD operator by power iteration (a slight underestimate)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vec = torch.randn(1, dim, generator=generator, dtype=like.dtype).to(like.device)
    vec = vec / vec.norm()
    value = 0.0
    for _ in range(iterations):
        image = matvec(vec)
        value = float((vec * image).sum())
        vec = image / image.norm().clamp_min(torch.finfo(like.dtype).tiny)
    return value


def arnoldi_eigenpairs(matvec: MatVec, dim: int, *, like: Tensor, iterations: int, rank: int,
                       seed: int = 0) -> tuple[Tensor, Tensor]:
    """The ``rank`` largest eigenpairs of a symmetric operator from ``iterations`` Arnoldi steps (Schioppa et al.
    2022): an orthonormal Krylov basis Q ``[k, dim]`` from a seeded random start (Gram–Schmidt applied twice per
    step), the small matrix T = Q H Qᵀ ``[k, k]`` and its eigendecomposition T = U Λ Uᵀ. Returns eigenvalues
    ``[r]`` (descending) and eigenvectors ``[r, dim]`` (orthonormal rows Uᵀ Q), r = min(rank, k). The iteration
    stops early when the Krylov space is invariant (then the pairs are exact up to rounding)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(dim, generator=generator, dtype=like.dtype).to(like.device)
    basis = [start / start.norm()]
    projected = torch.zeros(iterations + 1, iterations, dtype=like.dtype)
    for j in range(iterations):
        image = matvec(basis[j][None])[0]
        scale = float(image.norm())
        for _ in range(2):  # twice is enough (Giraud et al.) to keep Q orthonormal in floating point
            for i, vector in enumerate(basis):
                overlap = vector @ image
                projected[i, j] += float(overlap)
                image = image - overlap * vector
        norm = float(image.norm())
        projected[j + 1, j] = norm
        if j + 1 == iterations or norm <= 1e-10 * max(scale, torch.finfo(like.dtype).tiny):
            break
        basis.append(image / norm)
    k = len(basis)
    small = projected[:k, :k]
    values, vectors = torch.linalg.eigh((small + small.T) / 2)
    top = torch.argsort(values, descending=True)[: min(rank, k)]
    return values[top].to(like.device), vectors[:, top].T.to(like.device) @ torch.stack(basis)


def lissa(
    batch_matvec: Callable[[Tensor, int], Tensor],
    v: Tensor,
    *,
    scale: float,
    damping: float = 0.0,
    depth: int = 5000,
    repeats: int = 1,
    explode_factor: float = 1e6,
) -> Tensor:
    """LiSSA (Agarwal et al. 2017, as used by Koh & Liang): stochastic Neumann series for H⁻¹v.

    h₀ = v;  h_{j+1} = v + (1 − damping)·h_j − H_j h_j / scale;  estimate h_J / scale,
    averaged over ``repeats``. ``batch_matvec(h, step)`` applies a mini-batch
    Hessian. The fixed point is (H + damping·scale·I)⁻¹ v; it converges only
    if ``scale`` exceeds the top eigenvalue of H (roughly), else iterates blow
    up, which raises :class:`SolverDivergedError` naming the remedy.
    """
    if scale <= 0 or depth < 1 or repeats < 1 or not 0.0 <= damping < 1.0:
        raise ValueError(f"invalid LiSSA settings: scale={scale}, depth={depth}, repeats={repeats}, damping={damping}")
    total = torch.zeros_like(v)
    limit = explode_factor * float(v.norm(dim=1).max()) * depth
    step = 0
    for _ in range(repeats):
        estimate = v.clone()
        for j in range(depth):
            estimate = v + (1.0 - damping) * estimate - batch_matvec(estimate, step) / scale
            step += 1
            if j % 50 == 0 or j == depth - 1:
                size = float(estimate.norm(dim=1).max())
                if not size < limit:  # also catches NaN
                    raise SolverDivergedError(
                        f"LiSSA diverged at step {j} (‖h‖ = {size:.3g}): scale={scale:g} is below the top "
                        "Hessian eigenvalue; raise 'scale' (or use scale = 0 for automatic) or add damping"
                    )
        total += estimate / scale
    return total / repeats


def cholesky_solve(hessian: Tensor, v: Tensor) -> Tensor:
    """Exact H⁻¹v for every row of ``v`` through one Cholesky factorisation of ``hessian [P, P]``."""
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        raise SolverDivergedError(f"Hessian is not positive definite (Cholesky failed at column {int(info)}): add damping")
    return torch.cholesky_solve(v.T, factor).T
