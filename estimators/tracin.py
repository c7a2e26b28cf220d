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
from torch import Tensor, nn

from bench.registry import registered
from estimators.autodiff import FlatLoss, per_example_grads, select_parameters
from estimators.base import SELF_INFLUENCE, SINGLE, Estimator, FitContext, NotApplicable
from estimators.layers import GRADIENTS, covered_layers, layer_gradient_source, layer_parameter_names
from estimators.options import at_least, one_of
from tasks.base import Params, Split

#: ``split ↦ (δ [b, C], x̃ [b, d'])`` with the per-example gradient δ ⊗ x̃, or None where it is not of that form.
Factors = Callable[[Split], "tuple[Tensor, Tensor] | None"]


@dataclass(frozen=True)
class Stage:
    """Gradients at one parameter point, weighted: ``grads(split) → [len(split), P]``; ``factors``, where the
    parameters are one Linear layer's, gives them as outer products instead (see :func:`linear_factors`)."""

    weight: float
    grads: Callable[[Split], Tensor]
    factors: Factors | None = None


def gradient_stage(ctx: FitContext, params: Params, names: tuple[str, ...], weight: float, chunk: int,
                   gradients: str = "vmap") -> Stage:
    """Per-example gradients at ``params`` on ``names``; through the task's head view at ``params`` when
    ``names`` are exactly the head (identical gradients, the trunk run once per split). ``gradients = "layers"``:
    the Linear/Conv2d layers among ``names`` only, from one batched backward pass per chunk (no vmap)."""
    if gradients == "layers":
        return Stage(weight, layer_gradient_source(ctx.model, params, names, ctx.loss, chunk))
    flat, feed = ctx.flat_at(params, names)
    factors = linear_factors(flat)
    return Stage(weight, lambda split: per_example_grads(flat, feed(split), chunk=chunk),
                 None if factors is None else lambda split: factors(feed(split)))


def linear_factors(flat: FlatLoss) -> Factors | None:
    """For a loss over one ``nn.Linear``'s weight (and bias) applied to ``[b, d]`` inputs, the per-example
    gradient is an outer product: ∇_W ℓ = δ xᵀ and ∇_b ℓ = δ, with δ = ∂ℓ/∂outputs ``[b, C]``. So
    ⟨g_q, g_z⟩ = (δ_q·δ_z)(x̃_q·x̃_z) with x̃ = [x, 1] (x alone without a bias), and no ``[b, P]`` gradient
    is ever formed (captum's TracInCPFast trick). None for any other parameter set; the returned function
    gives None for inputs that are not ``[b, d]`` (a layer applied along a sequence is not rank one)."""
    layer = flat.model
    if not isinstance(layer, nn.Linear) or set(flat.names) not in ({"weight"}, {"weight", "bias"}):
        return None
    weight = flat.params["weight"]
    bias = flat.params.get("bias")
    with_bias = "bias" in flat.names

    def factors(split: Split) -> tuple[Tensor, Tensor] | None:
        if split.inputs.dim() != 2:
            return None
        inputs = split.inputs.to(weight.dtype)
        outputs = nn.functional.linear(inputs, weight, bias).detach().requires_grad_(True)
        with torch.enable_grad():
            (slopes,) = torch.autograd.grad(flat.loss(outputs, split.targets).sum(), outputs)
        return slopes, torch.cat([inputs, inputs.new_ones(len(inputs), 1)], 1) if with_bias else inputs

    return factors


class GradientSimilarity(Estimator):
    """scores[q, j] = Σ_stages weight · sim(g_q, g_{z_j}); subclasses choose the stages and ``sim``."""

    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, SELF_INFLUENCE})
    normalise: ClassVar[bool] = False

    version: ClassVar[str] = "3"  # 2: records n_parameters; 3: a Linear layer's products factorised
    #: bytes of training-point gradients kept between score calls (every protocol of a fitted estimator scores
    #: the same training points); chunks beyond it are computed again at each call. The scores are the same.
    train_cache_bytes: ClassVar[int] = 1 << 30

    def fit(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.names = tuple(self.config.parameters or ctx.default_parameters)
        self.stages = self.make_stages(ctx)
        chosen = select_parameters(ctx.params, self.names)
        if getattr(self.config, "gradients", "vmap") == "layers":  # the layers' weights and biases alone
            chosen = layer_parameter_names(covered_layers(ctx.model, ctx.params, self.names))
        self.n_parameters = sum(ctx.params[n].numel() for n in chosen)
        self._train_cache: dict[tuple[int, bytes], Tensor] = {}
        self._cached_bytes = 0

    def make_stages(self, ctx: FitContext) -> list[Stage]:
        raise NotImplementedError

    def _unit(self, grads: Tensor) -> Tensor:
        return grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-12) if self.normalise else grads

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        total = None
        for index, stage in enumerate(self.stages):
            part = self._factorised_part(stage, queries, train_idx)
            if part is None:
                query_grads = self._unit(stage.grads(queries))
                part = torch.cat([query_grads @ self._train_grads(index, cols).T
                                  for cols in train_idx.split(self.config.column_chunk)], dim=1)
            total = stage.weight * part if total is None else total + stage.weight * part
        return total.float()

    def _train_grads(self, index: int, cols: Tensor) -> Tensor:
        """``[len(cols), P]`` (unit where ``normalise``) gradients of stage ``index`` at training points ``cols``,
        kept for later calls while ``train_cache_bytes`` allows."""
        key = (index, cols.cpu().numpy().tobytes())
        if key in self._train_cache:
            return self._train_cache[key]
        grads = self._unit(self.stages[index].grads(self.ctx.train.subset(cols)))
        size = grads.numel() * grads.element_size()
        if self._cached_bytes + size <= self.train_cache_bytes:
            self._train_cache[key], self._cached_bytes = grads, self._cached_bytes + size
        return grads

    def _factorised_part(self, stage: Stage, queries: Split, train_idx: Tensor) -> Tensor | None:
        """``[Q, J]`` similarities from a Linear layer's factors, or None where the stage has none."""
        query = stage.factors(queries) if stage.factors is not None else None
        train = stage.factors(self.ctx.train.subset(train_idx)) if query is not None else None
        if query is None or train is None:
            return None
        dots = (query[0] @ train[0].T) * (query[1] @ train[1].T)
        if self.normalise:  # ‖δ ⊗ x̃‖ = ‖δ‖·‖x̃‖
            dots = dots / (_outer_norms(query)[:, None] * _outer_norms(train)[None, :]).clamp_min(1e-12)
        return dots

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """Σ_k η_k ‖∇ℓ(θ_k, z)‖² (TracIn's self-influence, used to find mislabelled points)."""
        total = torch.zeros(len(train_idx), dtype=torch.float64)
        for stage in self.stages:
            for cols, out in zip(train_idx.split(self.config.column_chunk), total.split(self.config.column_chunk), strict=True):
                points = self.ctx.train.subset(cols)
                factors = stage.factors(points) if stage.factors is not None and not self.normalise else None
                squares = (_outer_norms(factors) ** 2 if factors is not None
                           else self._unit(stage.grads(points)).pow(2).sum(1))
                out += stage.weight * squares.double().cpu()
        return total.float()

    def diagnostics(self) -> dict[str, float]:
        return {"stages": float(len(self.stages)), "n_parameters": float(self.n_parameters),
                "factorised_stages": float(sum(stage.factors is not None for stage in self.stages))}


def _outer_norms(factors: tuple[Tensor, Tensor]) -> Tensor:
    """``[b]`` norms of the outer products δ ⊗ x̃."""
    return factors[0].norm(dim=1) * factors[1].norm(dim=1)


@dataclass(frozen=True)
class TracInConfig:
    """``checkpoints``: which saved checkpoints to trace (Python indices, negative from the end; empty:
    all). ``parameters``: names or dotted prefixes (empty: the task's default subset; ``["*"]``: every parameter)."""

    checkpoints: tuple[int, ...] = ()
    parameters: tuple[str, ...] = ()
    gradients: str = "vmap"
    grad_chunk: int = 64
    column_chunk: int = 1024

    def __post_init__(self) -> None:
        at_least(1, grad_chunk=self.grad_chunk, column_chunk=self.column_chunk)
        one_of("gradients", self.gradients, GRADIENTS)


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
                               self.config.grad_chunk, self.config.gradients) for i in chosen]


@dataclass(frozen=True)
class GradDotConfig:
    """``parameters``: names or dotted prefixes (empty: the task's default subset; ``["*"]``: every parameter)."""

    parameters: tuple[str, ...] = ()
    gradients: str = "vmap"
    grad_chunk: int = 64
    column_chunk: int = 1024

    def __post_init__(self) -> None:
        at_least(1, grad_chunk=self.grad_chunk, column_chunk=self.column_chunk)
        one_of("gradients", self.gradients, GRADIENTS)


@registered("grad-dot")
class GradDot(GradientSimilarity):
    """g_qᵀ g_z at θ̂ (TracIn at the final parameters, unweighted): influence with H = I."""

    Config: ClassVar[type] = GradDotConfig
    uses_head_view: ClassVar[bool] = True

    def make_stages(self, ctx: FitContext) -> list[Stage]:
        return [gradient_stage(ctx, ctx.params, self.names, 1.0, self.config.grad_chunk, self.config.gradients)]


@registered("grad-cos")
class GradCos(GradDot):
    """cos(g_q, g_z) at θ̂: gradient similarity without the gradient-norm factor."""

    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})  # a point's cosine with itself is always 1
    normalise: ClassVar[bool] = True
