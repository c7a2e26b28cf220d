"""Group influence: the first-order sum and Basu, You & Feizi's second-order correction (ICML 2020).

Removing a group U (|U| = m, p = m/n) moves θ̂ by about

    Δθ ≈ c₁ · (1/n) H⁻¹ g_U  +  c₂ · (1/n²) H⁻¹ A_U H⁻¹ g_U,

with g_U = Σ_{z∈U} ∇ℓ(z), A_U = Σ_{z∈U} ∇²ℓ(z) and the query-loss change
g_qᵀ Δθ (positive: the group helped the query). The second term is the
curvature the group takes with it; it grows with the group's size and
coherence. ``normalisation`` sets c₁, c₂:

- "fixed-n" (default; the suite's retraining convention, tasks/base.py: the
  kept points' losses are still divided by n): c₁ = c₂ = 1. Then the terms are
  exactly the first two of the Neumann series of (H − A_U/n)⁻¹ g_U/n.
- "mean" (the paper's, the kept points re-averaged over n − m):
  c₁ = (1 − 2p)/(1 − p)², c₂ = 1/(1 − p)².

On a single point both reduce to classic influence (up to O(1/n)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import hvp_operator
from estimators.base import GROUP, PARAMETER_UPDATE, SINGLE, FitContext
from estimators.influence import InverseHvpInfluence, cg_solver, exact_solver
from estimators.options import at_least, one_of, positive
from tasks.base import Params, Split

GROUP_SOLVERS = ("auto", "cg", "exact")
NORMALISATIONS = ("fixed-n", "mean")


@dataclass(frozen=True)
class GroupConfig:
    """``solver``: "exact" (Cholesky of the explicit Hessian), "cg" (HVPs only), or "auto": exact up to
    ``max_parameters`` parameters, CG above."""

    solver: str = "auto"
    normalisation: str = "fixed-n"
    tol: float = 1e-5
    max_iter: int = 1000
    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    hvp_chunk: int = 2048
    max_parameters: int = 12_000

    def __post_init__(self) -> None:
        one_of("solver", self.solver, GROUP_SOLVERS)
        one_of("normalisation", self.normalisation, NORMALISATIONS)
        positive(tol=self.tol)
        at_least(1, max_iter=self.max_iter, grad_chunk=self.grad_chunk, hvp_chunk=self.hvp_chunk,
                 max_parameters=self.max_parameters)
        at_least(0, damping=self.damping)


class GroupInfluence(InverseHvpInfluence):
    """Shared machinery; ``second_order`` adds Basu et al.'s I′ term."""

    Config: ClassVar[type] = GroupConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP, PARAMETER_UPDATE})
    second_order: ClassVar[bool]

    def prepare(self, ctx: FitContext) -> None:
        cfg = self.config
        solver = cfg.solver if cfg.solver != "auto" else ("exact" if self.flat.size <= cfg.max_parameters else "cg")
        self._info["exact_solver"] = float(solver == "exact")
        if solver == "exact":
            self._solve = exact_solver(self.flat, ctx, cfg.damping, cfg.max_parameters, self._info)
        else:
            self._solve = cg_solver(self.flat, ctx.train, self.l2, tol=cfg.tol, max_iter=cfg.max_iter,
                                    hvp_chunk=cfg.hvp_chunk, info=self._info)

    def inverse_hvp(self, vectors: Tensor) -> Tensor:
        return self._solve(vectors)

    def coefficients(self, size: int) -> tuple[float, float]:
        """(c₁, c₂) for a group of ``size`` points (see the module docstring)."""
        if self.config.normalisation == "fixed-n":
            return 1.0, 1.0
        p = size / self.ctx.n_train
        return (1 - 2 * p) / (1 - p) ** 2, 1 / (1 - p) ** 2

    def curvature_times(self, members: Split, vector: Tensor) -> Tensor:
        """A_U v = Σ_{z∈U} ∇²ℓ(z) v for one ``vector [P]``."""
        return hvp_operator(self.flat, members, 0.0, chunk=self.config.hvp_chunk)(vector[None])[0] * len(members)

    def group_steps(self, groups: Sequence[Tensor]) -> Tensor:
        """``[len(groups), P]``: Δθ for removing each group (first order, plus I′ when second order)."""
        n = self.ctx.n_train
        members = [self.ctx.train.subset(group) for group in groups]
        sums = torch.stack([self.grads(split).sum(0) for split in members])
        first = self.inverse_hvp(sums) / n
        coefficients = torch.tensor([self.coefficients(len(g)) for g in groups], dtype=first.dtype, device=first.device)
        steps = coefficients[:, :1] * first
        if self.second_order:
            curvature = torch.stack([self.curvature_times(split, row) for split, row in zip(members, first, strict=True)])
            steps = steps + coefficients[:, 1:] * self.inverse_hvp(curvature) / n
        return steps

    def score_groups(self, queries: Split, groups: Sequence[Tensor]) -> Tensor:
        return (self.grads(queries) @ self.group_steps(groups).T).float()

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        return self.score_groups(queries, [i[None] for i in train_idx])

    def update(self, removed: Tensor, new_targets: Tensor | None = None) -> Params:
        if new_targets is not None:  # relabelling is not a removal: classic influence of the label shift
            return super().update(removed, new_targets)
        return self.flat.split_vector(self.group_steps([removed])[0])


@registered("group-if-1")
class FirstOrderGroupInfluence(GroupInfluence):
    """The first-order group influence: c₁ × the sum of the group's classic influences."""

    second_order: ClassVar[bool] = False


@registered("group-if-2")
class SecondOrderGroupInfluence(GroupInfluence):
    """Basu et al.'s second-order group influence (I⁽¹⁾ + I′), nested inverse-HVPs."""

    second_order: ClassVar[bool] = True
