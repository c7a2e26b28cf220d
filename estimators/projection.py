"""Seeded random projections of per-example gradients (TRAK's sketch), dense or Kronecker-factored per layer.

Dense: ``R [P, k]`` with entries N(0, 1/k), so E[R Rᵀ] = I and inner products are kept in expectation; it needs
``P·k`` numbers (29 GB at P = 1.77 M, k = 4,096). Kronecker (LoGra's, Choe et al. 2024): for each Linear/Conv2d
layer, whose per-example gradient is ``G = Σ_t s_t a_tᵀ`` (``[d_out, D]``, see :mod:`estimators.layers`), the
sketch is ``P_s G P_aᵀ = Σ_t (P_s s_t)(P_a a_t)ᵀ`` with ``P_s [k_s, d_out]`` and ``P_a [k_a, D]`` of entries
N(0, 1/rows): ``vec`` of it is ``(P_s ⊗ P_a) vec G`` and E[(P_s ⊗ P_a)ᵀ(P_s ⊗ P_a)] = I too, but it needs only
``k·(d_out + D)`` numbers and never forms G. A side no wider than k is kept as it is (no projection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from estimators.layers import Layer, layer_signals
from tasks.base import Params, Split


def gaussian(rows: int, columns: int, seed: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[rows, columns]`` with entries N(0, 1/columns), drawn in float64 from ``seed`` (the same on any device)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, columns, generator=generator, dtype=torch.float64) / columns**0.5).to(device, dtype)


def dense_projection(size: int, k: int, seed: int, *, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """TRAK's ``R [size, k]`` (None when ``k`` is 0 or ≥ ``size``: no projection)."""
    return gaussian(size, k, seed, device=device, dtype=dtype) if 0 < k < size else None


@dataclass
class KroneckerSketch:
    """Per-layer ``(P_s, P_a)`` (None: that side kept) and how to take the sketch of a split's gradients."""

    model: nn.Module
    params: Params
    trainable: tuple[str, ...]
    layers: Sequence[Layer]
    sides: list[tuple[Tensor | None, Tensor | None]]

    @classmethod
    def draw(cls, model: nn.Module, params: Params, trainable: tuple[str, ...], layers: Sequence[Layer], k: int,
             seed: int) -> KroneckerSketch:
        """Sides of at most ``k`` rows per layer, each from its own seed derived from ``seed``."""
        dtype = next(iter(params.values())).dtype
        device = next(iter(params.values())).device

        def side(width: int, salt: int) -> Tensor | None:
            return gaussian(width, k, seed + salt, device=device, dtype=dtype).T if k < width else None

        sides = [(side(layer.d_out, 2 * i + 1), side(layer.d_in, 2 * i + 2)) for i, layer in enumerate(layers)]
        return cls(model, params, trainable, layers, sides)

    @property
    def size(self) -> int:
        """Features per example: Σ_layers rows(P_s) · rows(P_a)."""
        return sum((s.shape[0] if s is not None else layer.d_out) * (a.shape[0] if a is not None else layer.d_in)
                   for layer, (s, a) in zip(self.layers, self.sides, strict=True))

    def features(self, split: Split, roots: Callable[[Tensor, Tensor], Tensor], batch: int) -> Tensor:
        """``[len(split), size]``: the sketch of each example's gradient of the function whose output gradient
        ``roots(outputs, targets)`` gives (``[b, K, 1]``), layer after layer, in the model's dtype."""
        rows = []
        for captured in layer_signals(self.model, self.params, self.trainable, self.layers, split, roots, batch):
            parts = []
            for (p_s, p_a), (a, s) in zip(self.sides, captured, strict=True):
                s_side = s[0] if p_s is None else s[0] @ p_s.T  # [b, t, k_s]
                a_side = a if p_a is None else a @ p_a.T  # [b, t, k_a]
                parts.append(torch.einsum("bto,bti->boi", s_side, a_side).flatten(1))
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows) if rows else next(iter(self.params.values())).new_zeros(0, self.size)
