"""TRAK (Park et al., ICML 2023): attribution through the after-kernel of a linearised model.

For each ensemble member (θ̂ and, optionally, the latest saved training checkpoints) TRAK takes
per-example gradients of the model *output* f, the classification margin
``f(z) = log p_y / (1 − p_y) = logit_y − logsumexp_{k≠y} logit_k``, projects them with a seeded Gaussian
matrix ``R [P, k]`` (entries N(0, 1/k); none when k ≥ P), ``φ = Rᵀ ∇θ f``, and scores

    τ(q, z) = mean_m [φ_q,mᵀ (Φ_mᵀ Φ_m + n·l2·I)⁻¹ φ_z,m] · mean_m (1 − p_z,m)

with ``Φ_m [n, k]`` the training features and ``p_z`` the probability of z's label (TRAK's Q weighting).
The ridge ``n·l2`` is the objective's own L2 term, so with one model and no projection τ is the
Gauss–Newton influence of removing z on the query's margin, with the loss curvature ℓ'' replaced by 1
(TRAK's approximation). The suite's score is the change of the query's *loss*: removing z lowers the
margin by τ, and ∂ℓ/∂f = −(1 − p_q), so ``scores[q, z] = (1 − p_q) · τ(q, z)`` with p_q at θ̂
(positive: z helped the query).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import FlatLoss, per_example_grads
from estimators.base import SELF_INFLUENCE, SINGLE, Estimator, FitContext
from tasks.base import Params, Split


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
    """``projection_dim``: k (0, or ≥ the number of parameters: no projection). ``checkpoints``: up to how
    many of the latest saved training checkpoints (other than θ̂) join θ̂ in the ensemble. ``parameters``: names or dotted prefixes
    (empty: the task's default subset; ``["*"]``: every parameter)."""

    projection_dim: int = 4096
    checkpoints: int = 0
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64

    def __post_init__(self) -> None:
        if self.projection_dim < 0 or self.checkpoints < 0 or self.grad_chunk < 1:
            raise ValueError(f"projection_dim and checkpoints must be ≥ 0 and grad_chunk ≥ 1, got "
                             f"{self.projection_dim}, {self.checkpoints}, {self.grad_chunk}")


def _same(params: Params, other: Params) -> bool:
    return params.keys() == other.keys() and all(torch.equal(params[k], other[k]) for k in params)


@dataclass
class _Member:
    """One model of the ensemble: margin gradients projected to features, and its kernel's solve."""

    margin: FlatLoss
    probability: FlatLoss
    feed: Any
    projection: Tensor | None  # [P, k]
    weighted: Tensor  # (ΦᵀΦ + n·l2·I)⁻¹ Φᵀ: [k, n]
    one_minus_p: Tensor  # [n]


@registered("trak")
class Trak(Estimator):
    """TRAK: projected margin gradients through the after-kernel, Q-weighted, ensembled over checkpoints."""

    Config: ClassVar[type] = TrakConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, SELF_INFLUENCE})
    uses_head_view: ClassVar[bool] = True

    @classmethod
    def runs_on_head_view(cls, config: Any) -> bool:
        return not config.parameters and config.checkpoints == 0  # checkpoints need the whole context

    def fit(self, ctx: FitContext) -> None:
        cfg = self.config
        self.ctx, names = ctx, tuple(cfg.parameters or ctx.default_parameters)
        earlier = [c.params for c in ctx.checkpoints if not _same(c.params, ctx.params)]  # the last is often θ̂
        points = [ctx.params, *earlier[len(earlier) - min(cfg.checkpoints, len(earlier)):]]
        self.members = [self._member(params, names, seed) for seed, params in enumerate(points)]

    def _member(self, params: Params, names: tuple[str, ...], index: int) -> _Member:
        ctx = self.ctx
        flat_margin, feed = ctx.flat_at(params, names, margin)
        flat_probability, _ = ctx.flat_at(params, names, label_probability)
        size = flat_margin.size
        projection = None
        if 0 < self.config.projection_dim < size:
            generator = torch.Generator().manual_seed(ctx.seed + 7919 * index)
            k = self.config.projection_dim
            projection = (torch.randn(size, k, generator=generator, dtype=torch.float64) / k**0.5).to(
                device=ctx.device, dtype=flat_margin.theta().dtype)
        member = _Member(flat_margin, flat_probability, feed, projection, torch.empty(0), torch.empty(0))
        features = self._features(member, ctx.train).double()  # [n, k]
        kernel = features.T @ features
        kernel.diagonal().add_(len(ctx.train) * ctx.l2)
        member.weighted = torch.linalg.solve(kernel, features.T).to(features.dtype)
        member.one_minus_p = 1.0 - self._probability(member, ctx.train).double()
        return member

    def _features(self, member: _Member, split: Split) -> Tensor:
        """Projected margin gradients ``[len(split), k]``, projected chunk by chunk."""
        fed = member.feed(split)
        parts = []
        for start in range(0, len(fed), 1024):
            grads = per_example_grads(member.margin, Split(fed.inputs[start : start + 1024], fed.targets[start : start + 1024]),
                                      chunk=self.config.grad_chunk)
            parts.append(grads if member.projection is None else grads @ member.projection)
        return torch.cat(parts)

    @staticmethod
    def _probability(member: _Member, split: Split) -> Tensor:
        fed = member.feed(split)
        with torch.no_grad():
            return member.probability.batch_losses(member.probability.theta(), fed.inputs, fed.targets)

    def _tau(self, queries: Split, train_idx: Tensor) -> Tensor:
        """``[Q, len(train_idx)]`` margin attributions τ, ensemble-averaged (float64)."""
        kernel_part = sum(self._features(m, queries).double() @ m.weighted[:, train_idx].double() for m in self.members)
        q_weight = sum(m.one_minus_p[train_idx] for m in self.members)
        return kernel_part * q_weight / len(self.members) ** 2

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        loss_slope = 1.0 - self._probability(self.members[0], queries).double()  # −∂ℓ/∂f at θ̂
        return (loss_slope[:, None] * self._tau(queries, train_idx)).float()

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """(1 − p_z) · τ(z, z): the predicted rise of z's own loss when z is removed."""
        points = self.ctx.train.subset(train_idx)
        loss_slope = 1.0 - self._probability(self.members[0], points).double()
        kernel_part = sum((self._features(m, points).double() * m.weighted[:, train_idx].T.double()).sum(1)
                          for m in self.members)
        q_weight = sum(m.one_minus_p[train_idx] for m in self.members)
        return (loss_slope * kernel_part * q_weight / len(self.members) ** 2).float()

    def diagnostics(self) -> dict[str, float]:
        projection = self.members[0].projection
        size = self.members[0].margin.size
        return {"models": float(len(self.members)), "n_parameters": float(size),
                "features": float(projection.shape[1] if projection is not None else size)}
