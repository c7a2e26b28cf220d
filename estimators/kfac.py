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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap

from bench.registry import registered
from estimators.autodiff import FlatLoss, per_example_grads, select_parameters
from estimators.base import SELF_INFLUENCE, SINGLE, Estimator, FitContext, NotApplicable, OverLimit
from tasks.base import Split

FISHERS = ("true", "empirical")


@dataclass(frozen=True)
class KfacConfig:
    """``parameters``: names or dotted prefixes of the layers to cover (empty: every Linear and Conv2d layer
    of the model, i.e. the whole network). ``damping`` is added to the objective's own l2. ``max_parameters``
    bounds the covered parameters (``parameters`` can pick fewer layers). ``fisher``: "true" (the exact
    expectation over the model's predictive distribution) or "empirical" (the gradients at the observed labels,
    as kronfluence's ``use_empirical_fisher``)."""

    parameters: tuple[str, ...] = ()
    damping: float = 0.0
    fisher: str = "true"
    #: more covered parameters than this is not applicable (per-example gradients are materialised: on rt-bert's
    #: whole top layer, 1.8 M parameters, EK-FAC took 135 s to fit and 373 s and 12.7 GB to score LDS)
    max_parameters: int = 500_000
    batch_size: int = 64
    grad_chunk: int = 32
    column_chunk: int = 128

    def __post_init__(self) -> None:
        if self.fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {', '.join(map(repr, FISHERS))}, got {self.fisher!r}")
        if self.max_parameters < 1:
            raise ValueError(f"max_parameters must be ≥ 1, got {self.max_parameters}")
        if not self.damping >= 0 or min(self.batch_size, self.grad_chunk, self.column_chunk) < 1:
            raise ValueError(f"damping must be ≥ 0 and the chunk sizes ≥ 1, got damping={self.damping}, "
                             f"batch_size={self.batch_size}, grad_chunk={self.grad_chunk}, column_chunk={self.column_chunk}")


@dataclass
class Layer:
    """A covered layer: its module, parameter names and offsets in the flat vector, and its factors."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    offset: int  # of the weight in the flat vector; the bias (if covered) follows the weight there
    d_out: int
    d_in: int  # D: inputs per output (patch size for Conv2d), plus 1 with a bias
    a_moment: Tensor | None = None
    s_moment: Tensor | None = None
    q_a: Tensor | None = None
    q_s: Tensor | None = None
    curvature: Tensor | None = None  # [d_out, D] in the Kronecker eigenbasis

    def inputs(self, captured: Tensor) -> Tensor:
        """Layer inputs as ``[b, positions, D]`` (a column of ones last when the bias is covered)."""
        module = self.module
        if isinstance(module, nn.Conv2d):
            patches = F.unfold(captured, module.kernel_size, module.dilation, module.padding, module.stride)
            rows = patches.transpose(1, 2)
        else:
            rows = captured.reshape(captured.shape[0], -1, captured.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:2], 1)], dim=2)
        return rows

    def output_grads(self, grads: Tensor) -> Tensor:
        """Gradients at the layer's outputs as ``[b, positions, d_out]``."""
        if isinstance(self.module, nn.Conv2d):
            return grads.flatten(2).transpose(1, 2)
        return grads.reshape(grads.shape[0], -1, grads.shape[-1])

    def matrices(self, flat: Tensor) -> Tensor:
        """Rows of flat gradients ``[B, P]`` → this layer's gradient matrices ``[B, d_out, D]``."""
        size = self.d_out * (self.d_in - (self.bias is not None))
        weight = flat[:, self.offset : self.offset + size].reshape(len(flat), self.d_out, -1)
        if self.bias is None:
            return weight
        bias = flat[:, self.offset + size : self.offset + size + self.d_out]
        return torch.cat([weight, bias[:, :, None]], dim=2)

    def flatten(self, matrices: Tensor) -> Tensor:
        """Inverse of :meth:`matrices` for this layer's slice: ``[B, d_out, D]`` → ``[B, size]``."""
        if self.bias is None:
            return matrices.flatten(1)
        return torch.cat([matrices[:, :, :-1].flatten(1), matrices[:, :, -1]], dim=1)


def covered_layers(model: nn.Module, params: dict[str, Tensor], names: tuple[str, ...]) -> list[Layer]:
    """Linear/Conv2d layers whose weight is among ``names`` (all when empty), in model order; offsets are
    positions in the flat vector of the covered parameters alone (in ``params`` order)."""
    chosen = set(select_parameters(params, names))
    found = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        weight, bias = (f"{module_name}.weight", f"{module_name}.bias") if module_name else ("weight", "bias")
        if weight in chosen:
            found.append((module_name, module, weight, bias if bias in chosen and module.bias is not None else None))
    covered = {n for *_, weight, bias in found for n in (weight, bias) if n is not None}
    offsets, position = {}, 0
    for name in params:
        if name in covered:
            offsets[name] = position
            position += params[name].numel()
    layers = []
    for module_name, module, weight, bias in found:
        if bias is not None and offsets[bias] != offsets[weight] + params[weight].numel():
            raise ValueError(f"{module_name}: bias does not follow its weight in the parameter order")
        layers.append(Layer(module_name, module, weight, bias, offsets[weight], params[weight].shape[0],
                            params[weight][0].numel() + (bias is not None)))
    return layers


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
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n is not None}
        self.flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss, tuple(n for n in ctx.params if n in covered))
        if self.flat.size > cfg.max_parameters:
            raise OverLimit(f"{self.flat.size:,} parameters in the covered layers exceed max_parameters="
                            f"{cfg.max_parameters:,} (per-example gradients are materialised); raise it or "
                            "choose fewer layers with 'parameters'", limit=f"max_parameters = {cfg.max_parameters:,}")
        self.n_left_out = sum(v.numel() for v in ctx.params.values()) - self.flat.size
        n = len(ctx.train)
        for layer in self.layers:
            layer.a_moment = torch.zeros(layer.d_in, layer.d_in, dtype=torch.float64, device=ctx.device)
            layer.s_moment = torch.zeros(layer.d_out, layer.d_out, dtype=torch.float64, device=ctx.device)
        for captured in self._pseudo_gradients():
            for layer, (a, s) in zip(self.layers, captured, strict=True):
                layer.a_moment += torch.einsum("bti,btj->ij", a, a) / a.shape[1] / n
                layer.s_moment += torch.einsum("cbti,cbtj->ij", s, s) / n
        for layer in self.layers:
            eig_a, layer.q_a = torch.linalg.eigh(layer.a_moment)
            eig_s, layer.q_s = torch.linalg.eigh(layer.s_moment)
            layer.curvature = torch.outer(eig_s.clamp_min(0), eig_a.clamp_min(0))
        if self.eigen_corrected:
            for layer in self.layers:
                layer.curvature = torch.zeros_like(layer.curvature)
            for captured in self._pseudo_gradients():
                for layer, (a, s) in zip(self.layers, captured, strict=True):
                    a_rot, s_rot = a @ layer.q_a, s @ layer.q_s  # [b, t, D], [c, b, t, d_out]
                    for first in range(0, a.shape[0], 8):  # (Q_Sᵀ G Q_A) per example and c: [c, 8, d_out, D]
                        rotated = torch.einsum("cbti,btj->cbij", s_rot[:, first : first + 8], a_rot[first : first + 8])
                        layer.curvature += rotated.pow(2).sum(dim=(0, 1)) / n

    def _pseudo_gradients(self) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Per training batch and covered layer: inputs ``[b, t, D]`` and the pseudo-gradients at its outputs
        ``[C, b, t, d_out]`` (float64), one per eigenpair of the loss' Hessian in the model outputs (the true
        Fisher), or the loss gradient alone (C = 1: the empirical Fisher)."""
        ctx, cfg = self.ctx, self.config
        params = {k: v.detach().requires_grad_(k in self.flat.names) for k, v in ctx.params.items()}
        store: dict[str, tuple[Tensor, Tensor]] = {}

        def hook(layer: Layer) -> Any:
            def capture(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                store[layer.name] = (inputs[0].detach(), output)
            return capture

        handles = [layer.module.register_forward_hook(hook(layer)) for layer in self.layers]
        try:
            for start in range(0, len(ctx.train), cfg.batch_size):
                inputs = ctx.train.inputs[start : start + cfg.batch_size]
                targets = ctx.train.targets[start : start + cfg.batch_size]
                store.clear()
                outputs = functional_call(ctx.model, params, (inputs,))
                roots = self._output_roots(outputs.detach(), targets)
                layer_outputs = [store[layer.name][1] for layer in self.layers]
                per_class = [torch.autograd.grad(outputs, layer_outputs, grad_outputs=roots[:, :, c], retain_graph=True)
                             for c in range(roots.shape[2])]
                yield [(layer.inputs(store[layer.name][0]).double(),
                        torch.stack([layer.output_grads(grads[i]) for grads in per_class]).double())
                       for i, layer in enumerate(self.layers)]
        finally:
            for handle in handles:
                handle.remove()

    def _output_roots(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[b, K, C]``: columns whose outer products sum to the Fisher's per-example factor in the model
        outputs: √λ_c v_c for each eigenpair of ∇²_out ℓ (true Fisher), or ∇_out ℓ alone (empirical, C = 1)."""
        example_loss = lambda o, t: self.ctx.loss(o[None], t[None])[0]  # noqa: E731
        if self.config.fisher == "empirical":
            return vmap(grad(example_loss))(outputs, targets)[:, :, None]
        output_hessian = vmap(hessian(example_loss))(outputs, targets)
        eigenvalues, vectors = torch.linalg.eigh(output_hessian)  # [b, K], [b, K, K]
        return vectors * eigenvalues.clamp_min(0).sqrt()[:, None, :]

    def inverse_hvp(self, flat_grads: Tensor) -> Tensor:
        """``[B, P]`` → ``[B, P]``: the approximate ``H⁻¹ g`` layer by layer (float64)."""
        shift = self.ctx.l2 + self.config.damping
        parts = []
        for layer in self.layers:
            v = layer.matrices(flat_grads.double())
            rotated = layer.q_s.T @ v @ layer.q_a
            parts.append(layer.flatten(layer.q_s @ (rotated / (layer.curvature + shift)) @ layer.q_a.T))
        return torch.cat(parts, dim=1)

    def _grads(self, split: Split) -> Tensor:
        return per_example_grads(self.flat, split, chunk=self.config.grad_chunk)

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        solved = self.inverse_hvp(self._grads(queries)) / len(self.ctx.train)  # [Q, P] float64
        columns = [(solved.to(grads.dtype) @ grads.T).double()
                   for grads in (self._grads(self.ctx.train.subset(cols)) for cols in train_idx.split(self.config.column_chunk))]
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
