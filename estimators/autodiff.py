"""Per-example gradients, Hessian-vector products and Hessians through ``torch.func``.

Parameters are handled as one flat vector θ ``[P]`` over a chosen subset of the
model's parameters (all by default); the rest stay fixed at their values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from tasks.base import Params, Split

#: a ``parameters`` option of just this selects every parameter of the model (the whole network)
ALL_PARAMETERS = "*"


def select_parameters(params: Params, names: Sequence[str] | None) -> tuple[str, ...]:
    """Parameter names matching ``names`` exactly or as a dotted prefix (``"fc"`` → ``fc.weight``,
    ``fc.bias``), in model order; None, empty or ``("*",)`` selects all."""
    if not names or tuple(names) == (ALL_PARAMETERS,):
        return tuple(params)
    chosen = tuple(p for p in params if any(p == n or p.startswith(n + ".") for n in names))
    unmatched = [n for n in names if not any(p == n or p.startswith(n + ".") for p in params)]
    if unmatched:
        raise ValueError(f"parameter names {unmatched} match nothing; the model has {list(params)}")
    return chosen


@dataclass(frozen=True)
class FlatLoss:
    """The per-example loss as a function of a flat parameter vector."""

    model: nn.Module
    params: Params
    loss: Callable[[Tensor, Tensor], Tensor]
    names: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module, params: Params, loss: Callable[[Tensor, Tensor], Tensor],
           names: Sequence[str] | None = None) -> FlatLoss:
        return cls(model, {k: v.detach() for k, v in params.items()}, loss, select_parameters(params, names))

    @property
    def size(self) -> int:
        return sum(self.params[n].numel() for n in self.names)

    def theta(self) -> Tensor:
        return torch.cat([self.params[n].reshape(-1) for n in self.names])

    def unflatten(self, theta: Tensor) -> Params:
        merged, offset = dict(self.params), 0
        for name in self.names:
            shape = self.params[name].shape
            merged[name] = theta[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return merged

    def split_vector(self, vector: Tensor) -> Params:
        """A flat ``[P]`` vector (e.g. a parameter update) as ``{name: tensor}`` over the chosen names only."""
        return {name: value for name, value in self.unflatten(vector).items() if name in self.names}

    def batch_losses(self, theta: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss(functional_call(self.model, self.unflatten(theta), (inputs,)), targets)

    def example_loss(self, theta: Tensor, inputs: Tensor, target: Tensor) -> Tensor:
        return self.batch_losses(theta, inputs[None], target[None])[0]


def per_example_grads(flat: FlatLoss, split: Split, *, chunk: int = 64, theta: Tensor | None = None) -> Tensor:
    """∇θ ℓ(z_i, θ) for every example: ``[len(split), P]``, vmapped in chunks."""
    theta = flat.theta() if theta is None else theta
    grad_fn = vmap(grad(flat.example_loss), in_dims=(None, 0, 0))
    rows = [grad_fn(theta, split.inputs[i : i + chunk], split.targets[i : i + chunk]) for i in range(0, len(split), chunk)]
    return torch.cat(rows) if rows else theta.new_zeros(0, flat.size)


def hvp_operator(flat: FlatLoss, split: Split, l2: float, *, chunk: int = 1024,
                 theta: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """V ``[B, P]`` ↦ V (1/|split| Σ ∇²ℓ_i + l2·I) row by row (forward-over-reverse)."""
    theta = flat.theta() if theta is None else theta
    n = len(split)

    def matvec(vectors: Tensor) -> Tensor:
        out = l2 * vectors
        for i in range(0, n, chunk):
            inputs, targets = split.inputs[i : i + chunk], split.targets[i : i + chunk]
            gradient = grad(lambda t, x=inputs, y=targets: flat.batch_losses(t, x, y).sum())
            out = out + vmap(lambda v, g=gradient: jvp(g, (theta,), (v,))[1])(vectors) / n
        return out

    return matvec


def full_hessian(flat: FlatLoss, split: Split, l2: float, *, chunk: int = 256, columns: int = 64) -> Tensor:
    """(1/n) Σ ∇²ℓ_i + l2·I as a dense ``[P, P]`` matrix (small models only), ``columns`` Hessian columns at a
    time (forward-over-reverse HVPs with basis vectors, batched by ``vmap``) over ``chunk`` examples at a
    time: memory grows with ``columns`` × a chunk's activations, not with P × them as ``torch.func.hessian``."""
    theta = flat.theta()
    total = l2 * torch.eye(flat.size, dtype=theta.dtype, device=theta.device)
    basis = torch.eye(flat.size, dtype=theta.dtype, device=theta.device)
    for i in range(0, len(split), chunk):
        inputs, targets = split.inputs[i : i + chunk], split.targets[i : i + chunk]
        gradient = grad(lambda t, x=inputs, y=targets: flat.batch_losses(t, x, y).sum())
        column_block = vmap(lambda v, g=gradient: jvp(g, (theta,), (v,))[1])
        for j in range(0, flat.size, columns):
            total[j : j + columns] += column_block(basis[j : j + columns]) / len(split)
    return total
