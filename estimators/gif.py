"""Generalized influence functions (Lyu et al.): GIF and its ablations FIF and PIF.

Only target parameters S (``ratio`` of P, chosen for the examined data by a
rule of :mod:`estimators.target_params`) move; the rest stay fixed. For a
perturbation whose full-model influence is H⁻¹ g (g = g_z/n when removing z):

- ``gif``: x_S = argmin ‖H_{:,S} x − g‖, i.e. (H_{S,:} H_{:,S}) x = [H g]_S: the update of S whose
  first-order gradient change best nullifies g on *all* parameters, fixed ones included;
- ``fif``: x_S = H_{SS}⁻¹ g_S (the rest frozen and ignored);
- ``pif``: x_S = [H⁻¹ g]_S (the full influence, projected onto S).

With S = all parameters, all three equal classic influence. Predicted query-loss
change: g_q[S] · x_S. The solves here are direct, on the explicit Hessian of the
chosen parameters (``max_parameters`` bounds it), so they are exact: the paper's
iteration converges to the same x_S. Selection is per examined set: each
scored point gets its own S, and a removed set gets one S.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import FlatLoss, per_example_grads
from estimators.base import PARAMETER_UPDATE, SINGLE, Estimator, FitContext
from estimators.influence import cholesky_factor, dense_hessian, perturbation_gradient
from estimators.options import at_least, one_of
from estimators.target_params import (
    NEURON_RULES,
    SELECTION_RULES,
    neuron_units,
    random_scores,
    take_best,
    unit_scores,
)
from tasks.base import Params, Split


@dataclass(frozen=True)
class GifConfig:
    """``ratio`` of the parameters (0, 1] moved; ``rule`` picks them (see estimators.target_params)."""

    ratio: float = 0.05
    rule: str = "activation"
    damping: float = 0.0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    max_parameters: int = 12_000

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1] (the share of parameters moved), got {self.ratio!r}")
        one_of("rule", self.rule, SELECTION_RULES)
        at_least(0, damping=self.damping)
        at_least(1, grad_chunk=self.grad_chunk, max_parameters=self.max_parameters)


class TargetedInfluence(Estimator):
    """Shared: Hessian, selection and scoring; subclasses solve for x_S."""

    Config: ClassVar[type] = GifConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, PARAMETER_UPDATE})
    uses_head_view: ClassVar[bool] = True
    version: ClassVar[str] = "2"  # 2: neuron rules fill the budget to the parameter (a partial last neuron)
    #: on the 15-parameter toy, 5% is one parameter: check a third (one neuron's worth)
    check_options: ClassVar[dict[str, Any]] = {"ratio": 1 / 3}

    def fit(self, ctx: FitContext) -> None:
        cfg = self.config
        self.ctx = ctx
        self.flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss, cfg.parameters or ctx.default_parameters or None)
        self._info: dict[str, float] = {"n_parameters": float(self.flat.size)}
        self.hessian = dense_hessian(self.flat, ctx, cfg.damping, cfg.max_parameters, self._info).double()
        self.units = neuron_units(self.flat) if cfg.rule in NEURON_RULES else None
        #: the order a partly taken neuron gives its parameters in (see estimators.target_params)
        self.curvature = self.hessian.diagonal().cpu().double() if self.units is not None else None
        self.budget = max(1, round(cfg.ratio * self.flat.size))
        self._factors: dict[bytes, Tensor] = {}
        self.prepare()

    def prepare(self) -> None:
        """Query-independent factorisations."""

    def solve(self, rhs: Tensor, chosen: list[Tensor]) -> list[Tensor]:
        """``x_S`` (float64) for each right-hand side ``rhs [R, P]`` and its selection ``chosen[r]``.

        Rows that share a selection (neuron rules repeat a few) are solved together in one call."""
        solutions: list[Tensor] = [rhs.new_empty(0)] * len(chosen)
        shared: dict[bytes, tuple[Tensor, list[int]]] = {}
        for row, selection in enumerate(chosen):
            shared.setdefault(selection.cpu().numpy().tobytes(), (selection, []))[1].append(row)
        for selection, rows in shared.values():
            for row, solution in zip(rows, self.solve_shared(rhs[rows], selection), strict=True):
                solutions[row] = solution
        return solutions

    def solve_shared(self, rhs: Tensor, chosen: Tensor) -> Tensor:
        """``[R, |S|]``: x_S for right-hand sides ``rhs [R, P]`` that share the selection ``chosen``."""
        raise NotImplementedError

    def factor_for(self, chosen: Tensor, matrix: Callable[[Tensor], Tensor]) -> Tensor:
        """Cholesky factor of ``matrix(chosen)``, cached per distinct selection (neuron rules repeat them)."""
        key = chosen.cpu().numpy().tobytes()
        if key not in self._factors:
            self._factors[key] = cholesky_factor(matrix(chosen))
        return self._factors[key]

    def grads(self, split: Split) -> Tensor:
        return per_example_grads(self.flat, split, chunk=self.config.grad_chunk)

    def select(self, examined: Split, grads: Tensor, key: tuple[int, ...]) -> Tensor:
        """Flat indices of S for one examined set (its per-example gradients ``grads [m, P]``)."""
        if self.config.rule == "random":
            return self.best(random_scores(self.flat.size, self.ctx.seed, key))
        return self.best(unit_scores(self.flat, examined, grads, self.config.rule, self.units).mean(0))

    def best(self, scores: Tensor) -> Tensor:
        """Flat indices of the best units under ``scores [U]`` within the parameter budget."""
        if self.units is None:
            return take_best(scores, None, None, self.budget)
        return take_best(scores, self.units.sizes, self.units.unit_of, self.budget, self.curvature)

    def steps(self, rhs: Tensor, selections: list[Tensor]) -> Tensor:
        """``[R, P]`` float64 updates, each zero outside its selection."""
        full = torch.zeros(rhs.shape, dtype=torch.float64, device=rhs.device)
        for row, (chosen, solution) in enumerate(zip(selections, self.solve(rhs.double(), selections), strict=True)):
            full[row, chosen] = solution
        self._info["selected_fraction"] = sum(len(c) for c in selections) / max(1, len(selections)) / self.flat.size
        return full

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        points = self.ctx.train.subset(train_idx)
        grads = self.grads(points)
        if self.config.rule == "random":
            selections = [self.select(points, grads, (i,)) for i in train_idx.tolist()]
        else:  # each point is its own examined set: per-example unit scores in one pass, one row per point
            per_point = unit_scores(self.flat, points, grads, self.config.rule, self.units)
            selections = [self.best(row) for row in per_point]
        selections = [chosen.to(grads.device) for chosen in selections]
        return (self.grads(queries).double() @ self.steps(grads / self.ctx.n_train, selections).T).float()

    def update(self, removed: Tensor, new_targets: Tensor | None = None) -> Params:
        removed = torch.as_tensor(removed, dtype=torch.long)
        examined = self.ctx.train.subset(removed)
        shift = perturbation_gradient(self.flat, self.ctx.train, removed, new_targets, self.config.grad_chunk)
        chosen = self.select(examined, self.grads(examined), tuple(sorted(removed.tolist()))).to(shift.device)
        step = self.steps(shift[None] / self.ctx.n_train, [chosen])[0]
        return self.flat.split_vector(step.to(self.flat.theta().dtype))

    def diagnostics(self) -> dict[str, float]:
        return dict(self._info)


@registered("gif")
class GeneralizedInfluence(TargetedInfluence):
    """GIF: moves only S, nullifying the gradient change on the fixed parameters (least squares)."""

    def solve_shared(self, rhs: Tensor, chosen: Tensor) -> Tensor:
        def normal(s: Tensor) -> Tensor:  # H_{S,:} H_{:,S}
            columns = self.hessian[:, s]
            return columns.T @ columns

        return torch.cholesky_solve(self.hessian[chosen] @ rhs.T, self.factor_for(chosen, normal)).T


@registered("fif")
class FrozenInfluence(TargetedInfluence):
    """FIF: influence with every parameter outside S frozen, x_S = H_SS⁻¹ g_S."""

    def solve_shared(self, rhs: Tensor, chosen: Tensor) -> Tensor:
        def block(s: Tensor) -> Tensor:
            return self.hessian[s][:, s]

        return torch.cholesky_solve(rhs[:, chosen].T, self.factor_for(chosen, block)).T


@registered("pif")
class ProjectedInfluence(TargetedInfluence):
    """PIF: the full influence H⁻¹ g, projected onto S."""

    def prepare(self) -> None:
        self.factor = cholesky_factor(self.hessian)

    def solve(self, rhs: Tensor, chosen: list[Tensor]) -> list[Tensor]:
        full = torch.cholesky_solve(rhs.T, self.factor).T  # all right-hand sides in one solve
        return [row[s] for row, s in zip(full, chosen, strict=True)]
