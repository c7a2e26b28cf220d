"""Adapters that run captum's TracIn and Arnoldi implementations through the Estimator interface (``ifbench[peers]``).

captum's TracInCP sums, over checkpoints, the learning rate times the dot product of per-example loss
gradients, as ifbench's ``tracin`` does, with the same sign (positive: a proponent). TracInCPFast does it for
the last fully connected layer's *weight* only, through the factorisation (δ_q·δ_z)(x_q·x_z) (no bias term),
so its counterpart is ``tracin`` with ``parameters = ["weight"]``. Both need the model to *be* the layer set
they trace: they run where ifbench's parameter set is a whole module (logistic regression, a head view).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench.registry import registered
from estimators.base import SINGLE, Estimator, FitContext, NotApplicable, load_into
from tasks.base import Checkpoint, Split


def import_captum() -> Any:
    try:
        import captum.influence
    except ImportError as err:
        raise NotApplicable("captum is not installed: pip install 'ifbench[peers]'") from err
    return captum.influence


@dataclass(frozen=True)
class CaptumTracInConfig:
    """``batch_size``: training examples per captum batch. TracInCP slows down on large batches (mnist-logreg,
    1,600 columns, 1 thread: 2.7 s at 128, 4.8 s at 512, 23 s at 4,096)."""

    batch_size: int = 128


@dataclass(frozen=True)
class CaptumTracInFastConfig:
    """``batch_size``: training examples per captum batch (mnist-logreg, 4,000 columns, 1 thread: 0.59 s at
    128, 0.18 s at 512 and at 4,096)."""

    batch_size: int = 512


class CaptumTracIn(Estimator):
    """Shared set-up: θ̂'s model copy, the checkpoints as captum loads them, and the training set."""

    Config: ClassVar[type] = CaptumTracInConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    peer: ClassVar[str] = "captum"
    counterpart: ClassVar[str] = "tracin"

    def fit(self, ctx: FitContext) -> None:
        import_captum()
        if not ctx.checkpoints:
            raise NotApplicable("the task saved no training checkpoints to trace")
        ctx.require_whole_model("captum's TracIn")
        self.ctx = ctx
        self.model = copy.deepcopy(ctx.model)

    @staticmethod
    def load_checkpoint(model: nn.Module, checkpoint: Checkpoint) -> float:
        """captum's ``checkpoints_load_func``: our checkpoint's values into ``model``; its learning rate."""
        load_into(model, checkpoint.params)
        return checkpoint.learning_rate

    def dataset(self, split: Split) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(split.inputs, split.targets)

    def make(self, train: Split) -> Any:
        raise NotImplementedError

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        tracer = self.make(self.ctx.train.subset(train_idx))
        return tracer.influence((queries.inputs, queries.targets)).detach().float()


@registered("captum-tracincp")
class CaptumTracInCP(CaptumTracIn):
    """captum's TracInCP (per-example gradients of every parameter, summed over checkpoints)."""

    def make(self, train: Split) -> Any:
        return import_captum().TracInCP(self.model, self.dataset(train), list(self.ctx.checkpoints),
                                        checkpoints_load_func=self.load_checkpoint, loss_fn=self.ctx.loss,
                                        batch_size=self.config.batch_size)


@registered("captum-tracincp-fast")
class CaptumTracInCPFast(CaptumTracIn):
    """captum's TracInCPFast: the last Linear layer's weight gradients, factorised, summed over checkpoints."""

    Config: ClassVar[type] = CaptumTracInFastConfig
    counterpart_options: ClassVar[dict[str, Any]] = {"parameters": ("weight",)}

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        if not isinstance(self.model, nn.Linear):
            raise NotApplicable(f"captum's TracInCPFast traces one final Linear layer; the model is {type(self.model).__name__}")
        self.loss_sum = _ReducedLoss(ctx.loss, "sum")

    def make(self, train: Split) -> Any:
        return import_captum().TracInCPFast(self.model, self.model, self.dataset(train), list(self.ctx.checkpoints),
                                            checkpoints_load_func=self.load_checkpoint, loss_fn=self.loss_sum,
                                            batch_size=self.config.batch_size)


class _ReducedLoss(nn.Module):
    """A per-example loss with the ``reduction`` attribute captum reads: "sum" sums it over the batch, "none"
    keeps ``[b]``."""

    def __init__(self, loss: Any, reduction: str):
        super().__init__()
        self.loss, self.reduction = loss, reduction

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = self.loss(outputs, targets)
        return losses.sum() if self.reduction == "sum" else losses


@dataclass(frozen=True)
class CaptumArnoldiConfig:
    """As ifbench's arnoldi: ``iterations`` Arnoldi steps (captum's ``arnoldi_dim``) and the ``rank`` top
    eigenpairs (its ``projection_dim``). ``tolerance``: captum's ``arnoldi_tol``, the absolute residual norm at
    which it stops early (its default, 0.1, is not scaled to the summed loss' Hessian; an early stop costs a basis
    vector, see CaptumArnoldi). ``batch_size``: examples per captum batch."""

    iterations: int = 200
    rank: int = 50
    tolerance: float = 1e-12
    batch_size: int = 512


@registered("captum-arnoldi")
class CaptumArnoldi(Estimator):
    """captum's ArnoldiInfluenceFunction: influence on H's top eigenpairs, found by Arnoldi iteration.

    Its Hessian is the *summed* loss' (n × ifbench's mean), so
    ``hessian_reg = n·l2`` adds the objective's l2 (on the Krylov restriction, where Qᵀ(A + cI)Q = QᵀAQ + cI),
    and its scores ``g_qᵀ V (Λ + n·l2)⁻¹ Vᵀ g_z`` are ifbench's ``(1/n) g_qᵀ H⁻¹ g_z`` on the same top eigenspace.
    Traps handled: it loads θ̂ through a checkpoint *path* (a name here, with a load function that leaves the
    model at θ̂), and it scores every training point (the columns are picked afterwards). Not
    handled: captum always sets aside its last Arnoldi vector, so where the Krylov space is exhausted before
    ``iterations`` (a Hessian with fewer distinct eigenvalues than that) it keeps one invariant direction fewer
    than there are (toy-logreg: 10 of 11, 67% off exact IF, where ifbench's arnoldi is exact)."""

    Config: ClassVar[type] = CaptumArnoldiConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    peer: ClassVar[str] = "captum"
    counterpart: ClassVar[str] = "arnoldi"

    def fit(self, ctx: FitContext) -> None:
        import_captum()
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        ctx.require_whole_model("captum's Arnoldi")
        self.ctx, cfg = ctx, self.config
        train = torch.utils.data.TensorDataset(ctx.train.inputs, ctx.train.targets)
        self.scorer = ArnoldiInfluenceFunction(
            ctx.model_at(), train, "theta-hat", checkpoints_load_func=lambda module, path: 1.0,  # already at θ̂
            loss_fn=_ReducedLoss(ctx.loss, "none"), batch_size=cfg.batch_size, projection_dim=cfg.rank,
            arnoldi_dim=cfg.iterations, arnoldi_tol=cfg.tolerance, seed=ctx.seed, hessian_reg=ctx.n_train * ctx.l2)

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        return self.scorer.influence((queries.inputs, queries.targets)).detach()[:, train_idx].float()
