"""DataInf (Kwon et al., ICLR 2024): a closed-form inverse of each layer's damped empirical Fisher.

Per layer l (the parameters of one module), the curvature is the damped empirical Fisher
``G_l + λ_l I`` with ``G_l = (1/n) Σ_i g_il g_ilᵀ``. DataInf swaps the inverse and the average,

    (G_l + λ_l I)⁻¹ ≈ (1/n) Σ_i (g_il g_ilᵀ + λ_l I)⁻¹ = (1/(n λ_l)) Σ_i (I − g_il g_ilᵀ / (λ_l + ‖g_il‖²))

(Sherman–Morrison), so no matrix is formed or inverted. The damping is the paper's
``λ_l = damping_scale · (1/(n d_l)) Σ_i ‖g_il‖²`` (0.1 in the authors' code), for a layer of d_l
parameters. Scores follow Koh & Liang's removal convention with that curvature, block-diagonal over layers:

    scores[q, z] = (1/n) Σ_l g_qlᵀ Ĥ_l⁻¹ g_zl        (positive: z helped the query)

The task's own l2 is not part of DataInf's curvature (its λ_l takes that role).

``gradients = "layers"`` (the Linear/Conv2d layers among the chosen parameters, each a block) never forms the
``[n, P]`` matrix: per-example gradients come from batched backward passes ``column_chunk`` training points at a time,
Ĥ_l⁻¹ g_q is accumulated over one pass through the training set (Sherman–Morrison needs every g_i), and the scores
take a second pass. Self-influence needs ``(g_i·g_j)²`` for every pair, so it takes one pass per ``column_chunk``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import per_example_grads
from estimators.base import SELF_INFLUENCE, SINGLE, Estimator, FitContext
from estimators.layers import GRADIENTS, layer_gradient_source
from estimators.options import at_least, one_of
from tasks.base import Split


@dataclass(frozen=True)
class DataInfConfig:
    """``damping_scale``: λ_l as a multiple of the layer's mean squared gradient entry. ``parameters``: names or
    dotted prefixes (empty: the task's default subset; ``["*"]``: every parameter), grouped into layers by module.
    ``gradients``: ``"vmap"`` (an ``[n, P]`` matrix of per-example gradients kept) or ``"layers"`` (the Linear/Conv2d
    layers among the parameters, from batched backward passes of ``grad_chunk`` examples, ``column_chunk`` training
    points held at a time)."""

    damping_scale: float = 0.1
    parameters: tuple[str, ...] = ()
    grad_chunk: int = 64
    gradients: str = "vmap"
    column_chunk: int = 128

    def __post_init__(self) -> None:
        if not self.damping_scale > 0 or self.grad_chunk < 1:
            raise ValueError(f"datainf needs damping_scale > 0 and grad_chunk ≥ 1, got {self.damping_scale}, "
                             f"{self.grad_chunk}")
        one_of("gradients", self.gradients, GRADIENTS)
        at_least(1, column_chunk=self.column_chunk)


def layer_slices(names: tuple[str, ...], sizes: list[int]) -> dict[str, slice]:
    """Flat-vector slices of each module's parameters (``fc.weight`` and ``fc.bias`` form layer ``fc``);
    the parameters of one module are adjacent in model order."""
    layers: dict[str, slice] = {}
    offset = 0
    for name, size in zip(names, sizes, strict=True):
        module = name.rpartition(".")[0]
        start = layers[module].start if module in layers else offset
        if module in layers and layers[module].stop != offset:
            raise ValueError(f"parameters of module {module!r} are not adjacent in {names}")
        layers[module] = slice(start, offset + size)
        offset += size
    return layers


def sherman_morrison_solve(vectors: Tensor, train_grads: Tensor, damping: float) -> Tensor:
    """``[B, d]``: each row v ↦ (1/n) Σ_i (g_i g_iᵀ + λI)⁻¹ v for training gradients ``[n, d]``, λ = damping."""
    coefficients = (vectors @ train_grads.T) / (damping + (train_grads**2).sum(1))  # [B, n]
    return (vectors - coefficients @ train_grads / len(train_grads)) / damping


@registered("datainf")
class DataInf(Estimator):
    """DataInf: layer-wise Sherman–Morrison inverse of the damped empirical Fisher (Kwon et al. 2024)."""

    Config: ClassVar[type] = DataInfConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE, SELF_INFLUENCE})
    uses_head_view: ClassVar[bool] = True

    def fit(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.streamed = StreamedDataInf(ctx, self.config) if self.config.gradients == "layers" else None
        if self.streamed is not None:
            return
        self.flat, self.feed = ctx.flat_at(ctx.params, tuple(self.config.parameters or ctx.default_parameters))
        self.train_grads = self._grads(ctx.train)  # [n, P]
        sizes = [self.flat.params[name].numel() for name in self.flat.names]
        self.layers = layer_slices(self.flat.names, sizes)
        self.damping = {
            layer: self.config.damping_scale * float((self.train_grads[:, cut] ** 2).mean())
            for layer, cut in self.layers.items()
        }

    def _grads(self, split: Split) -> Tensor:
        return per_example_grads(self.flat, self.feed(split), chunk=self.config.grad_chunk)

    def inverse_curvature(self, vectors: Tensor) -> Tensor:
        """``[B, P]``: Ĥ⁻¹ v, layer by layer."""
        out = torch.empty_like(vectors)
        for layer, cut in self.layers.items():
            out[:, cut] = sherman_morrison_solve(vectors[:, cut], self.train_grads[:, cut], self.damping[layer])
        return out

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        if self.streamed is not None:
            return self.streamed.score(queries, train_idx)
        solved = self.inverse_curvature(self._grads(queries))
        return (solved @ self.train_grads[train_idx].T / self.ctx.n_train).float()

    def self_influence(self, train_idx: Tensor) -> Tensor:
        if self.streamed is not None:
            return self.streamed.self_influence(train_idx)
        grads = self.train_grads[train_idx]
        return ((self.inverse_curvature(grads) * grads).sum(1) / self.ctx.n_train).float()

    def diagnostics(self) -> dict[str, float]:
        if self.streamed is not None:
            return self.streamed.diagnostics()
        info = {"n_parameters": float(self.train_grads.shape[1]), "layers": float(len(self.layers))}
        if len(self.layers) == 1:
            info["damping"] = next(iter(self.damping.values()))
        return info


class StreamedDataInf:
    """DataInf over Linear/Conv2d layers without an ``[n, P]`` matrix (``gradients = "layers"``): what
    :class:`DataInf` computes, from per-example layer gradients a ``column_chunk`` at a time."""

    def __init__(self, ctx: FitContext, cfg: DataInfConfig):
        self.ctx, self.config = ctx, cfg
        self._layer_grads = layer_gradient_source(ctx.model, ctx.params, tuple(cfg.parameters or ctx.default_parameters),
                                                  ctx.loss, cfg.grad_chunk)
        layers = self._layer_grads.layers
        self.layers = {layer.name: slice(layer.offset, layer.offset + layer.d_out * layer.d_in) for layer in layers}
        self.n_parameters = sum(layer.d_out * layer.d_in for layer in layers)
        self.norms = torch.zeros(ctx.n_train, len(self.layers), dtype=torch.float64)  # ‖g_il‖²
        for cols, grads in self._training_chunks():
            self.norms[cols] = torch.stack([(grads[:, cut].double() ** 2).sum(1) for cut in self.layers.values()], 1)
        sizes = torch.tensor([cut.stop - cut.start for cut in self.layers.values()], dtype=torch.float64)
        damping = cfg.damping_scale * self.norms.sum(0) / (ctx.n_train * sizes)
        self.damping = dict(zip(self.layers, damping.tolist(), strict=True))

    def _training_chunks(self, train_idx: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(cols, grads [len(cols), P])`` over ``train_idx`` (all training points when None), ``column_chunk``
        at a time (see :meth:`LayerGradientSource.chunks`)."""
        train_idx = torch.arange(self.ctx.n_train) if train_idx is None else train_idx
        return self._layer_grads.chunks(self.ctx.train, train_idx, self.config.column_chunk)

    def inverse_curvature(self, vectors: Tensor) -> Tensor:
        """``[B, P]``: Ĥ⁻¹ v layer by layer, the Sherman–Morrison sum accumulated over one pass."""
        out, n = vectors.clone(), self.ctx.n_train
        for cols, grads in self._training_chunks():
            for index, (layer, cut) in enumerate(self.layers.items()):
                train = grads[: len(cols), cut]
                coefficients = (vectors[:, cut] @ train.T) / (self.damping[layer] + self.norms[cols, index]).to(train)
                out[:, cut] -= coefficients @ train / n
        for layer, cut in self.layers.items():
            out[:, cut] /= self.damping[layer]
        return out

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        solved = self.inverse_curvature(self._layer_grads(queries))
        parts = [solved @ grads[: len(cols)].T for cols, grads in self._training_chunks(train_idx)]
        return (torch.cat(parts, 1) / self.ctx.n_train).float()

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """(1/n) Σ_l (‖g_jl‖² − (1/n) Σ_i (g_il·g_jl)² / (λ_l + ‖g_il‖²)) / λ_l, one training pass per chunk of j."""
        n, total = self.ctx.n_train, []
        for cols in train_idx.split(self.config.column_chunk):
            points = self._layer_grads(self.ctx.train.subset(cols))
            values = torch.zeros(len(cols), dtype=torch.float64)
            for rows, grads in self._training_chunks():
                for index, (layer, cut) in enumerate(self.layers.items()):
                    dots = (grads[: len(rows), cut] @ points[:, cut].T).double()  # [rows, cols]
                    weights = 1.0 / (n * self.damping[layer] * (self.damping[layer] + self.norms[rows, index]))
                    values -= weights @ dots**2
            for index, layer in enumerate(self.layers):
                values += self.norms[cols, index] / self.damping[layer]
            total.append(values / n)
        return torch.cat(total).float()

    def diagnostics(self) -> dict[str, float]:
        info = {"n_parameters": float(self.n_parameters), "layers": float(len(self.layers))}
        if len(self.layers) == 1:
            info["damping"] = next(iter(self.damping.values()))
        return info
