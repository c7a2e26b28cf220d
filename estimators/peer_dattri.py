"""Adapters that run dattri's influence functions through the Estimator interface (``ifbench[peers]``).

dattri's ``IFAttributor*`` score ``attribute(train, test)[j, q] = g_zjᵀ (H + reg·I)⁻¹ g_q`` with H the Hessian
of the loss function it is given on the full training batch. Given the *mean* per-example loss and
``reg = l2``, H + reg·I is ifbench's objective Hessian, so ``scores = attributeᵀ / n`` (Koh & Liang's removal
convention). Traps handled here: dattri sums one inverse-HVP per batch of its full training loader, so that
loader is one batch; every train × test batch pair recomputes the inverse-HVP, so each loader is one batch;
its solvers are called under ``torch.no_grad()`` (otherwise autograd graphs pile up across iterations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bench.registry import registered
from estimators.autodiff import FlatLoss
from estimators.base import SINGLE, Estimator, FitContext, NotApplicable
from estimators.influence import check_solver_dtype, lissa_auto_scale
from estimators.trak import label_probability, margin
from tasks.base import Split


def import_dattri() -> tuple[Any, Any, Any]:
    """dattri's influence-function module, its TRAK attributor and its AttributionTask."""
    try:
        from dattri.algorithm import influence_function
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask
    except ImportError as err:
        raise NotApplicable("dattri is not installed: pip install 'ifbench[peers]'") from err
    return influence_function, TRAKAttributor, AttributionTask


@dataclass(frozen=True)
class DattriExplicitConfig:
    """``dtype``: the precision dattri computes in ("" = the task's), as for ifbench's solvers."""

    dtype: str = ""

    def __post_init__(self) -> None:
        check_solver_dtype(self.dtype)


@dataclass(frozen=True)
class DattriCgConfig:
    """dattri's CG stops at ``max_iter`` or when a residual's norm falls below ``tol`` (absolute). ``dtype``:
    float64 by default (and ifbench's if-cg is compared at float64 too): in float32 dattri's CG returned NaN
    for 33 of 45 toy-logreg scores at max_iter = 100, once residuals had vanished (at max_iter = 10 it did not)."""

    max_iter: int = 100
    tol: float = 1e-7
    dtype: str = "float64"

    def __post_init__(self) -> None:
        check_solver_dtype(self.dtype)


class DattriInfluence(Estimator):
    """Shared: the attribution task over ifbench's model, parameters and mean loss, and the scoring call."""

    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    peer: ClassVar[str] = "dattri"

    def fit(self, ctx: FitContext) -> None:
        self.functions, _, attribution_task = import_dattri()
        ctx.require_whole_model("dattri")
        ctx = ctx.in_precision(self.config.dtype)
        self.ctx = ctx
        model, loss = ctx.model, ctx.loss

        like = next(iter(ctx.params.values()))

        def mean_loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            inputs, targets = data  # LiSSA's collate casts both to float32: back to the model's and the task's dtypes
            outputs = functional_call(model, params, (inputs.to(like.dtype),))
            return loss(outputs, targets.to(ctx.train.targets.dtype)).mean()

        self.task = attribution_task(loss_func=mean_loss, model=model, checkpoints=dict(ctx.params))
        self.attributor = self.make()
        self.attributor.cache(self.loader(ctx.train))

    def make(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def loader(split: Split) -> DataLoader:
        return DataLoader(TensorDataset(split.inputs, split.targets), batch_size=max(len(split), 1), shuffle=False)

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        queries = queries.in_dtype(next(iter(self.ctx.params.values())).dtype)
        with torch.no_grad():
            attributed = self.attributor.attribute(self.loader(self.ctx.train.subset(train_idx)), self.loader(queries))
        return (attributed.T / self.ctx.n_train).float()


@registered("dattri-if-explicit")
class DattriExplicit(DattriInfluence):
    """dattri's IFAttributorExplicit: the dense Hessian inverted (small models)."""

    Config: ClassVar[type] = DattriExplicitConfig
    counterpart: ClassVar[str] = "if-exact"

    def make(self) -> Any:
        return self.functions.IFAttributorExplicit(self.task, device=str(self.ctx.device), regularization=self.ctx.l2)


@registered("dattri-if-cg")
class DattriCg(DattriInfluence):
    """dattri's IFAttributorCG: conjugate gradients on Hessian-vector products."""

    Config: ClassVar[type] = DattriCgConfig
    counterpart: ClassVar[str] = "if-cg"
    counterpart_options: ClassVar[dict[str, Any]] = {"dtype": "float64"}

    def make(self) -> Any:
        cfg = self.config
        return self.functions.IFAttributorCG(self.task, device=str(self.ctx.device), max_iter=cfg.max_iter,
                                             tol=cfg.tol, regularization=self.ctx.l2)


@dataclass(frozen=True)
class DattriDataInfConfig:
    """``damping_scale``: as ifbench's datainf (λ = damping_scale × the layer's mean squared gradient entry).
    ``dtype``: float32, the only precision dattri 0.3.0's DataInf runs in (its accumulator is a float32 zeros)."""

    damping_scale: float = 0.1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_solver_dtype(self.dtype)


@registered("dattri-datainf")
class DattriDataInf(DattriInfluence):
    """dattri's IFAttributorDataInf (one layer: dattri damps every layer alike, ifbench each by its own λ_l)."""

    Config: ClassVar[type] = DattriDataInfConfig
    counterpart: ClassVar[str] = "datainf"

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        if len({name.rpartition(".")[0] for name in self.ctx.params}) != 1:
            raise NotApplicable("dattri's DataInf damps every layer with one constant; the comparison with "
                                "ifbench's per-layer damping holds for one layer only")
        # dattri cached the training gradients [n, P]: the same λ as ifbench's datainf, from them
        grads = self.attributor._cached_train_reps[0].detach()
        self.attributor.regularization = self.config.damping_scale * float((grads**2).mean())

    def make(self) -> Any:
        return self.functions.IFAttributorDataInf(self.task, device=str(self.ctx.device))


@dataclass(frozen=True)
class DattriLissaConfig:
    """As ifbench's if-lissa: ``depth`` recursions of mini-batches of ``batch_size``, averaged over ``repeats``;
    ``scale = 0`` picks 1.25 × H's top eigenvalue by the same power iteration as if-lissa; ``damping`` is LiSSA's
    (1 − damping) factor; float32 like if-lissa's default."""

    depth: int = 2000
    repeats: int = 1
    batch_size: int = 256
    scale: float = 0.0
    damping: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_solver_dtype(self.dtype)


@registered("dattri-if-lissa")
class DattriLissa(DattriInfluence):
    """dattri's IFAttributorLiSSA: the stochastic Neumann series of if-lissa.

    The same recursion as if-lissa; dattri draws a batch per query vector and step, ifbench one per step for
    all queries. dattri's LiSSA has no regularization argument: the l2 term
    joins the loss whose Hessian it inverts, not the one whose gradients it scores."""

    Config: ClassVar[type] = DattriLissaConfig
    counterpart: ClassVar[str] = "if-lissa"

    def make(self) -> Any:
        cfg, ctx = self.config, self.ctx
        mean_loss, l2 = self.task.get_loss_func(), ctx.l2  # of dattri's flat parameter vector

        def objective(flat: Tensor, data: tuple[Tensor, Tensor]) -> Tensor:
            return mean_loss(flat, data) + 0.5 * l2 * flat.pow(2).sum()

        # the Hessian LiSSA inverts is that of get_loss_func's loss; the gradients it scores stay the loss' own
        self.task.get_loss_func = lambda *args, **kwargs: objective
        scale = cfg.scale or lissa_auto_scale(FlatLoss.of(ctx.model, ctx.params, ctx.loss), ctx.train, ctx.l2, ctx.seed)
        return self.functions.IFAttributorLiSSA(self.task, device=str(ctx.device), batch_size=cfg.batch_size,
                                                num_repeat=cfg.repeats, recursion_depth=cfg.depth,
                                                damping=cfg.damping, scaling=scale)


@dataclass(frozen=True)
class DattriTrakConfig:
    """``projection_dim``: 0 for dattri's identity projection (ifbench's trak with ``projection_dim = 0``
    computes the same scores), else k for its Gaussian projection (other random matrices than ifbench's)."""

    projection_dim: int = 0


@registered("dattri-trak")
class DattriTrak(Estimator):
    """dattri's TRAKAttributor on θ̂ alone, without projection by default.

    dattri scores ``τ`` of the margin, with the gradients divided by √P
    and its ``regularization`` added to ΦᵀΦ; ``regularization = n·l2/P`` is ifbench's ridge n·l2 on the
    unscaled gradients, and ``scores = (1 − p_q)·τ`` turns the margin's change into the loss' (ifbench's trak).
    Trap handled: dattri updates its module-level default projector settings in place, so every setting is
    passed explicitly."""

    Config: ClassVar[type] = DattriTrakConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    peer: ClassVar[str] = "dattri"
    counterpart: ClassVar[str] = "trak"
    counterpart_options: ClassVar[dict[str, Any]] = {"projection_dim": 0}

    def fit(self, ctx: FitContext) -> None:
        _, attributor_class, attribution_task = import_dattri()
        ctx.require_whole_model("dattri's TRAK")
        self.ctx, model = ctx, ctx.model

        def one(function: Any) -> Any:
            def of_example(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
                inputs, target = data
                return function(functional_call(model, params, (inputs[None],)), target[None])[0]
            return of_example

        self.probability = one(label_probability)
        task = attribution_task(loss_func=one(margin), model=model, checkpoints=[dict(ctx.params)])
        size = sum(p.numel() for p in ctx.params.values())
        k = self.config.projection_dim
        projector = {"proj_type": "identity" if k == 0 else "normal", "proj_dim": k or size, "proj_seed": ctx.seed,
                     "proj_max_batch_size": 32, "device": str(ctx.device)}
        self.attributor = attributor_class(task, self.probability, projector_kwargs=projector, device=str(ctx.device),
                                           regularization=ctx.n_train * ctx.l2 / size)
        self.attributor.cache(DattriInfluence.loader(ctx.train))

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        with torch.no_grad():
            tau = self.attributor.attribute(DattriInfluence.loader(queries)).T[:, train_idx]  # [Q, J]
            outputs = functional_call(self.ctx.model, self.ctx.params, (queries.inputs,))
            loss_slope = 1.0 - label_probability(outputs, queries.targets)
        return (loss_slope[:, None].to(tau.dtype) * tau).float()
