"""TRAK (Park et al., ICML 2023): attribution through the after-kernel of a linearised model.

For each ensemble member (θ̂; ``models − 1`` models trained independently by θ̂'s recipe from their own seeds,
as the paper's ensemble; optionally θ̂'s latest saved checkpoints) TRAK takes per-example gradients of the model
*output* f, the classification margin ``f(z) = log p_y / (1 − p_y) = logit_y − logsumexp_{k≠y} logit_k``,
projects them with a seeded Gaussian matrix ``R [P, k]`` (entries N(0, 1/k); none when k ≥ P), ``φ = Rᵀ ∇θ f``
(or with a Kronecker-factored sketch per layer, :mod:`estimators.projection`, where ``R`` would not fit), and scores

    τ(q, z) = mean_m [φ_q,mᵀ (Φ_mᵀ Φ_m + n·l2·I)⁻¹ φ_z,m] · mean_m (1 − p_z,m)

with ``Φ_m [n, k]`` the training features and ``p_z`` the probability of z's label (TRAK's Q weighting).
The ridge ``n·l2`` is the objective's own L2 term, so with one model and no projection τ is the
Gauss–Newton influence of removing z on the query's margin, with the loss curvature ℓ'' replaced by 1
(TRAK's approximation). The suite's score is the change of the query's *loss*: removing z lowers the
margin by τ, and ∂ℓ/∂f = −(1 − p_q), so ``scores[q, z] = (1 − p_q) · τ(q, z)`` with p_q at θ̂
(positive: z helped the query).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import per_example_grads
from estimators.base import SELF_INFLUENCE, SINGLE, Estimator, FitContext, NotApplicable
from estimators.layers import covered_layers, in_model_order, layer_parameter_names, loss_roots
from estimators.projection import KroneckerSketch, dense_projection
from tasks.base import Params, Split

PROJECTIONS = ("dense", "kronecker")


def margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """``[b]`` log-odds of the label: logit_y − logsumexp over the other classes' logits."""
    label = outputs.gather(1, targets[:, None])[:, 0]
    others = outputs.scatter(1, targets[:, None], float("-inf"))
    return label - torch.logsumexp(others, dim=1)


def label_probability(outputs: Tensor, targets: Tensor) -> Tensor:
    """``[b]`` softmax probability of the label."""
    return torch.softmax(outputs, dim=1).gather(1, targets[:, None])[:, 0]


@dataclass(frozen=True)
class TrakConfig:
    """``models``: ensemble size, θ̂ and ``models − 1`` independently trained models (each trained in the fit).
    ``projection_dim``: k of the dense projection (0, or ≥ the number of parameters: none). ``projection``:
    "dense" (TRAK's Gaussian R) or "kronecker" (per Linear/Conv2d layer, each side projected to ``side_dim``;
    other parameters are left out). ``checkpoints``: up to how many of θ̂'s latest saved training checkpoints
    (other than θ̂) join the ensemble. ``parameters``: names or dotted prefixes (empty: the task's default subset;
    ``["*"]``: every parameter)."""

    models: int = 1
    projection_dim: int = 4096
    projection: str = "dense"
    side_dim: int = 32
    checkpoints: int = 0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(map(repr, PROJECTIONS))}, got {self.projection!r}")
        if self.models < 1 or self.projection_dim < 0 or self.checkpoints < 0 or min(self.grad_chunk, self.side_dim) < 1:
            raise ValueError(f"models, grad_chunk and side_dim must be ≥ 1 and projection_dim, checkpoints ≥ 0, got "
                             f"models={self.models}, grad_chunk={self.grad_chunk}, side_dim={self.side_dim}, "
                             f"projection_dim={self.projection_dim}, checkpoints={self.checkpoints}")


def _same(params: Params, other: Params) -> bool:
    return params.keys() == other.keys() and all(torch.equal(params[k], other[k]) for k in params)


def margin_roots(outputs: Tensor, targets: Tensor) -> Tensor:
    """``[b, K, 1]``: ∂f/∂outputs of each example's margin (what a layer's output gradients start from)."""
    return loss_roots(margin)(outputs, targets)


@dataclass
class _Member:
    """One model of the ensemble: features ``[b, k]`` of a split, its kernel's solve and Q weights."""

    features: Callable[[Split], Tensor]
    probability: Callable[[Split], Tensor]
    size: int  # parameters the features sketch
    width: int  # k
    weighted: Tensor = field(default_factory=lambda: torch.empty(0))  # (ΦᵀΦ + n·l2·I)⁻¹ Φᵀ: [k, n]
    one_minus_p: Tensor = field(default_factory=lambda: torch.empty(0))  # [n]


@registered("trak")
class Trak(Estimator):
    """TRAK: projected margin gradients through the after-kernel, Q-weighted, ensembled over models."""

    Config: ClassVar[type] = TrakConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, SELF_INFLUENCE})
    uses_head_view: ClassVar[bool] = True
    version: ClassVar[str] = "2"  # 2: independently trained members, Kronecker projection

    @classmethod
    def runs_on_head_view(cls, config: Any) -> bool:
        return not config.parameters and config.checkpoints == 0 and config.models == 1 and config.projection == "dense"

    def fit(self, ctx: FitContext) -> None:
        cfg = self.config
        self.ctx, names = ctx, tuple(cfg.parameters or ctx.default_parameters)
        if cfg.models > 1 and ctx.train_independent is None:
            raise NotApplicable("an ensemble of independently trained models needs a context that can train the task")
        started = time.perf_counter()
        independent = [ctx.train_independent(m) for m in range(1, cfg.models)] if cfg.models > 1 else []
        self.training_s = time.perf_counter() - started
        earlier = [c.params for c in ctx.checkpoints if not _same(c.params, ctx.params)]  # the last is often θ̂
        points = [ctx.params, *independent, *earlier[len(earlier) - min(cfg.checkpoints, len(earlier)):]]
        self.members = [self._member(params, names, seed) for seed, params in enumerate(points)]

    def _member(self, params: Params, names: tuple[str, ...], index: int) -> _Member:
        ctx, cfg = self.ctx, self.config
        seed = ctx.seed + 7919 * index
        flat_probability, feed = ctx.flat_at(params, names, label_probability)

        def probability(split: Split) -> Tensor:
            fed = feed(split)
            with torch.no_grad():
                return flat_probability.batch_losses(flat_probability.theta(), fed.inputs, fed.targets)

        if cfg.projection == "kronecker":
            member = self._kronecker_member(params, names, seed, probability)
        else:
            member = self._dense_member(params, names, seed, probability)
        features = member.features(ctx.train).double()  # [n, k]
        kernel = features.T @ features
        kernel.diagonal().add_(len(ctx.train) * ctx.l2)
        member.weighted = torch.linalg.solve(kernel, features.T).to(features.dtype)
        member.one_minus_p = 1.0 - probability(ctx.train).double()
        return member

    def _dense_member(self, params: Params, names: tuple[str, ...], seed: int,
                      probability: Callable[[Split], Tensor]) -> _Member:
        flat_margin, feed = self.ctx.flat_at(params, names, margin)
        projection = dense_projection(flat_margin.size, self.config.projection_dim, seed,
                                      device=self.ctx.device, dtype=flat_margin.theta().dtype)

        def features(split: Split) -> Tensor:
            fed, parts = feed(split), []
            for start in range(0, len(fed), 1024):
                grads = per_example_grads(flat_margin, Split(fed.inputs[start : start + 1024],
                                                             fed.targets[start : start + 1024]), chunk=self.config.grad_chunk)
                parts.append(grads if projection is None else grads @ projection)
            return torch.cat(parts)

        width = flat_margin.size if projection is None else projection.shape[1]
        return _Member(features, probability, flat_margin.size, width)

    def _kronecker_member(self, params: Params, names: tuple[str, ...], seed: int,
                          probability: Callable[[Split], Tensor]) -> _Member:
        params = in_model_order(self.ctx.model, params)
        layers = covered_layers(self.ctx.model, params, names)
        if not layers:
            raise NotApplicable("the Kronecker projection needs a Linear or Conv2d layer among the chosen parameters")
        trainable = layer_parameter_names(layers)
        sketch = KroneckerSketch.draw(self.ctx.model, params, trainable, layers, self.config.side_dim, seed)
        size = sum(params[n].numel() for n in trainable)
        return _Member(lambda split: sketch.features(split, margin_roots, self.config.grad_chunk), probability,
                       size, sketch.size)

    def _tau(self, queries: Split, train_idx: Tensor) -> Tensor:
        """``[Q, len(train_idx)]`` margin attributions τ, ensemble-averaged (float64)."""
        kernel_part = sum(m.features(queries).double() @ m.weighted[:, train_idx].double() for m in self.members)
        q_weight = sum(m.one_minus_p[train_idx] for m in self.members)
        return kernel_part * q_weight / len(self.members) ** 2

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        loss_slope = 1.0 - self.members[0].probability(queries).double()  # −∂ℓ/∂f at θ̂
        return (loss_slope[:, None] * self._tau(queries, train_idx)).float()

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """(1 − p_z) · τ(z, z): the predicted rise of z's own loss when z is removed."""
        points = self.ctx.train.subset(train_idx)
        loss_slope = 1.0 - self.members[0].probability(points).double()
        kernel_part = sum((m.features(points).double() * m.weighted[:, train_idx].T.double()).sum(1)
                          for m in self.members)
        q_weight = sum(m.one_minus_p[train_idx] for m in self.members)
        return (loss_slope * kernel_part * q_weight / len(self.members) ** 2).float()

    def diagnostics(self) -> dict[str, float]:
        first = self.members[0]
        return {"models": float(len(self.members)), "n_parameters": float(first.size), "features": float(first.width),
                "independent_models": float(self.config.models - 1), "ensemble_training_s": self.training_s}
