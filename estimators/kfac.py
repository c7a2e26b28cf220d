"""Influence with Kronecker-factored curvature: K-FAC and EK-FAC (George et al. 2018; Grosse et al. 2023).

Per Linear / Conv2d layer l the Gauss–Newton block of the objective's Hessian is approximated as
``A_l ⊗ S_l``: ``A`` the second moment of the layer's inputs (a 1 appended for the bias; Conv2d inputs
unfolded into patches; averaged over examples and positions) and ``S`` that of the gradients reaching the
layer's outputs (summed over positions, averaged over examples). The gradients are *pseudo*-gradients
``√λ_c v_c`` back-propagated from each eigenpair of the loss' Hessian in the outputs, so S is the exact
expectation over the model's predictive distribution (for cross-entropy, the true Fisher) without sampling
labels (``fisher = "empirical"``: the loss gradient at the observed label instead, the empirical Fisher).
With ``A = Q_A Λ_A Q_Aᵀ`` and ``S = Q_S Λ_S Q_Sᵀ``, K-FAC's curvature in the Kronecker eigenbasis
is ``Λ_S,i Λ_A,j``; EK-FAC replaces it by the true second moment of the per-example gradients in that basis,
``mean_z Σ_c ((Q_Sᵀ G_z,c Q_A)_ij)²``. The inverse-HVP of a layer gradient V (``[d_out, D]``) is
``Q_S [(Q_Sᵀ V Q_A) / (curvature + l2 + damping)] Q_Aᵀ``; scores are ``+(1/n) g_qᵀ H⁻¹ g_z`` summed over
layers (the suite's sign: positive when z helped the query). Parameters outside Linear/Conv2d layers
(norms, embeddings) are left out, and the diagnostics count them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import hessian, vmap

from bench.registry import registered
from estimators.autodiff import FlatLoss
from estimators.base import SELF_INFLUENCE, SINGLE, Estimator, FitContext, NotApplicable
from estimators.layers import covered_layers, layer_gradients, layer_parameter_names, layer_signals, loss_roots
from tasks.base import Split

FISHERS = ("true", "empirical")


@dataclass(frozen=True)
class KfacConfig:
    """``parameters``: names or dotted prefixes of the layers to cover (empty: every Linear and Conv2d layer
    of the model, i.e. the whole network). ``damping`` is added to the objective's own l2. ``fisher``: "true"
    (the exact expectation over the model's predictive distribution) or "empirical" (the gradients at the
    observed labels, as kronfluence's ``use_empirical_fisher``). No ``[n, P]`` matrix is formed: training
    gradients are taken ``column_chunk`` points at a time (``grad_chunk`` per batched backward pass), so scoring
    holds the preconditioned queries ``[Q, P]`` and one chunk ``[column_chunk, P]``."""

    parameters: tuple[str, ...] = ()
    damping: float = 0.0
    fisher: str = "true"
    batch_size: int = 64
    grad_chunk: int = 32
    column_chunk: int = 128

    def __post_init__(self) -> None:
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {', '.join(map(repr, FISHERS))}, got {self.fisher!r}")
        if not self.damping >= 0 or min(self.batch_size, self.grad_chunk, self.column_chunk) < 1:
            raise ValueError(f"damping must be ≥ 0 and the chunk sizes ≥ 1, got damping={self.damping}, "
                             f"batch_size={self.batch_size}, grad_chunk={self.grad_chunk}, column_chunk={self.column_chunk}")


class KroneckerInfluence(Estimator):
    """Shared by K-FAC and EK-FAC; ``eigen_corrected`` chooses the curvature in the eigenbasis."""

    Config: ClassVar[type] = KfacConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, SELF_INFLUENCE})
    eigen_corrected: ClassVar[bool]

    def fit(self, ctx: FitContext) -> None:
        self.ctx, cfg = ctx, self.config
        self.layers = covered_layers(ctx.model, ctx.params, cfg.parameters)
        if not self.layers:
            raise NotApplicable("no Linear or Conv2d layer among the chosen parameters")
        covered = set(layer_parameter_names(self.layers))
        self.flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss, tuple(n for n in ctx.params if n in covered))
        self._loss_roots = loss_roots(ctx.loss)  # [b, K, 1]: ∇_outputs ℓ at the observed labels
        self.n_left_out = sum(v.numel() for v in ctx.params.values()) - self.flat.size
        self._fit_factors()
        if self.eigen_corrected:
            self._fit_eigenvalues()

    def _fit_factors(self) -> None:
        """A and S per layer, their eigenbases, and K-FAC's curvature Λ_S ⊗ Λ_A. Each batch's moments are
        products in the model's dtype (float32 GEMMs on the deep tasks), accumulated and decomposed in float64."""
        n = len(self.ctx.train)
        for layer in self.layers:
            layer.a_moment = torch.zeros(layer.d_in, layer.d_in, dtype=torch.float64, device=self.ctx.device)
            layer.s_moment = torch.zeros(layer.d_out, layer.d_out, dtype=torch.float64, device=self.ctx.device)
        for captured in self._pseudo_gradients():
            for layer, (a, s) in zip(self.layers, captured, strict=True):
                layer.a_moment += torch.einsum("bti,btj->ij", a, a).double() / a.shape[1] / n
                layer.s_moment += torch.einsum("cbti,cbtj->ij", s, s).double() / n
        for layer in self.layers:
            eig_a, layer.q_a = torch.linalg.eigh(layer.a_moment)
            eig_s, layer.q_s = torch.linalg.eigh(layer.s_moment)
            layer.curvature = torch.outer(eig_s.clamp_min(0), eig_a.clamp_min(0))

    def _fit_eigenvalues(self) -> None:
        """EK-FAC: the curvature in the Kronecker eigenbasis refitted to mean_z Σ_c ((Q_Sᵀ G_z,c Q_A)_ij)²,
        rotations in the model's dtype, squares accumulated in float64."""
        n = len(self.ctx.train)
        for layer in self.layers:
            layer.curvature = torch.zeros_like(layer.curvature)
        for captured in self._pseudo_gradients():
            for layer, (a, s) in zip(self.layers, captured, strict=True):
                a_rot, s_rot = a @ layer.q_a.to(a.dtype), s @ layer.q_s.to(s.dtype)  # [b, t, D], [c, b, t, d_out]
                for first in range(0, a.shape[0], 16):  # (Q_Sᵀ G Q_A) per example and c: [c, 16, d_out, D]
                    rotated = torch.einsum("cbti,btj->cbij", s_rot[:, first : first + 16], a_rot[first : first + 16])
                    layer.curvature += rotated.pow(2).sum(dim=(0, 1)).double() / n

    def _pseudo_gradients(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Per training batch and covered layer: inputs ``[b, t, D]`` and the pseudo-gradients at its outputs
        ``[C, b, t, d_out]`` (the model's dtype), one per eigenpair of the loss' Hessian in the model outputs (the true
        Fisher), or the loss gradient alone (C = 1: the empirical Fisher)."""
        yield from self._layer_signals(self.ctx.train, self._output_roots, self.config.batch_size)

    def _layer_signals(self, split: Split, roots: Any, batch: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """:func:`estimators.layers.layer_signals` at θ̂ on the covered layers."""
        yield from layer_signals(self.ctx.model, self.ctx.params, self.flat.names, self.layers, split, roots, batch)

    def _example_loss(self, outputs: Tensor, target: Tensor) -> Tensor:
        """ℓ of one example from its outputs ``[K]`` (for vmap)."""
        return self.ctx.loss(outputs[None], target[None])[0]

    def _output_roots(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[b, K, C]``: columns whose outer products sum to the Fisher's per-example factor in the model
        outputs: √λ_c v_c for each eigenpair of ∇²_out ℓ (true Fisher), or ∇_out ℓ alone (empirical, C = 1).
        Eigenpairs zero to working precision in every example of the batch (λ ≤ K·ε·max λ: softmax cross-entropy's
        all-ones direction, so a 2-class head has C = 1) carry nothing and are dropped, saving their backward pass."""
        if self.config.fisher == "empirical":
            return self._loss_roots(outputs, targets)
        output_hessian = vmap(hessian(self._example_loss))(outputs, targets)
        eigenvalues, vectors = torch.linalg.eigh(output_hessian)  # [b, K], [b, K, K]
        eigenvalues = eigenvalues.clamp_min(0)
        tolerance = eigenvalues.shape[1] * torch.finfo(eigenvalues.dtype).eps * eigenvalues.max()
        kept = (eigenvalues > tolerance).any(dim=0)
        return (vectors * eigenvalues.sqrt()[:, None, :])[:, :, kept]

    def inverse_hvp(self, flat_grads: Tensor) -> Tensor:
        """``[B, P]`` → ``[B, P]``: the approximate ``H⁻¹ g`` layer by layer, in ``flat_grads``' dtype (float32
        GEMMs on the deep tasks; the factors are decomposed in float64)."""
        shift = self.ctx.l2 + self.config.damping
        work = flat_grads.dtype
        solved = torch.empty_like(flat_grads)
        for layer in self.layers:
            q_s, q_a = layer.q_s.to(work), layer.q_a.to(work)
            rotated = q_s.T @ layer.matrices(flat_grads) @ q_a
            preconditioned = q_s @ (rotated / (layer.curvature + shift).to(work)) @ q_a.T
            layer.write(solved, preconditioned)
        return solved

    def _grads(self, split: Split, out: Tensor | None = None) -> Tensor:
        """Per-example gradients of the covered layers ``[len(split), P]`` (flat order), ``grad_chunk`` examples per
        batched backward pass (:func:`estimators.layers.layer_gradients`), into ``out`` when given."""
        return layer_gradients(self.ctx.model, self.ctx.params, self.flat.names, self.layers, split,
                               self._loss_roots, self.config.grad_chunk, out)

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        """``[Q, len(train_idx)]``: (1/n) (H⁻¹ g_q)·g_z, the training gradients ``column_chunk`` at a time (into one
        reused buffer) against the preconditioned queries, kept in the gradients' dtype: memory
        O(Q·P + column_chunk·P), never [n, P]."""
        grads = self._grads(queries)
        solved = self.inverse_hvp(grads).div_(len(self.ctx.train))
        del grads
        buffer = solved.new_empty(min(self.config.column_chunk, len(train_idx)), self.flat.size)
        columns = [solved @ self._grads(self.ctx.train.subset(cols), buffer).T
                   for cols in train_idx.split(self.config.column_chunk)]
        return torch.cat(columns, dim=1).float()

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """(1/n) g_zᵀ H⁻¹ g_z."""
        parts = []
        for cols in train_idx.split(self.config.column_chunk):
            grads = self._grads(self.ctx.train.subset(cols)).double()
            parts.append((self.inverse_hvp(grads) * grads).sum(1) / len(self.ctx.train))
        return torch.cat(parts).float()

    def diagnostics(self) -> dict[str, float]:
        return {"layers": float(len(self.layers)), "n_parameters": float(self.flat.size),
                "n_parameters_left_out": float(self.n_left_out)}


@registered("kfac")
class Kfac(KroneckerInfluence):
    """Influence with K-FAC curvature (A ⊗ S per Linear/Conv2d layer), over the whole network by default."""

    eigen_corrected: ClassVar[bool] = False


@registered("ekfac")
class Ekfac(KroneckerInfluence):
    """Influence with EK-FAC curvature (K-FAC's eigenbasis, eigenvalues fitted to the gradients' second moment)."""

    eigen_corrected: ClassVar[bool] = True
