"""Linear and Conv2d layers as K-FAC sees them, and their per-example signals from one batched backward pass.

A covered layer's per-example gradient is ``Σ_positions s aᵀ`` (``[d_out, D]``): ``a`` its inputs (Conv2d inputs
unfolded into patches, a 1 appended for the bias) and ``s`` the gradient reaching its outputs. Estimators that
need the gradients of many layers without an ``[n, P]`` matrix (K-FAC, EK-FAC, TRAK's Kronecker projection) take
them from :func:`layer_signals` a batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from estimators.autodiff import select_parameters
from estimators.base import NotApplicable
from tasks.base import Params, Split

#: how per-example gradients are taken: vmap over the chosen parameters, or the Linear/Conv2d layers among them
#: from batched backward passes (:func:`layer_gradients`; norms and embeddings left out)
GRADIENTS = ("vmap", "layers")


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

    def write_gradients(self, flat: Tensor, output_grads: Tensor, inputs: Tensor) -> None:
        """Write the per-example gradients Σ_positions s aᵀ of output gradients ``[B, t, d_out]`` and inputs
        ``[B, t, D]`` (from :meth:`inputs`) into this layer's slice of flat rows ``[B, P]``: one batched matmul
        straight into the slice (no ``[B, d_out, D]`` temporary and no copy), the bias's Σ_t s beside it."""
        size = self.d_out * (self.d_in - (self.bias is not None))
        weight = flat[:, self.offset : self.offset + size].view(len(flat), self.d_out, -1)
        torch.bmm(output_grads.transpose(1, 2), inputs if self.bias is None else inputs[:, :, :-1], out=weight)
        if self.bias is not None:
            flat[:, self.offset + size : self.offset + size + self.d_out] = output_grads.sum(1)

    def write(self, flat: Tensor, matrices: Tensor) -> None:
        """Inverse of :meth:`matrices`: write ``[B, d_out, D]`` into this layer's slice of flat rows ``[B, P]``
        (the weight row-major, then the bias)."""
        size = self.d_out * (self.d_in - (self.bias is not None))
        if self.bias is None:
            flat[:, self.offset : self.offset + size] = matrices.flatten(1)
            return
        flat[:, self.offset : self.offset + size].view(len(flat), self.d_out, -1).copy_(matrices[:, :, :-1])
        flat[:, self.offset + size : self.offset + size + self.d_out] = matrices[:, :, -1]


def in_model_order(model: nn.Module, params: Params) -> Params:
    """``params`` reordered as ``model.named_parameters()`` lists them (names the model lacks last, as given), so
    :func:`covered_layers` finds each bias right after its weight whatever order a checkpoint was saved in."""
    order = [name for name, _ in model.named_parameters() if name in params]
    return {**{name: params[name] for name in order}, **{k: v for k, v in params.items() if k not in order}}


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


def layer_signals(model: nn.Module, params: Params, trainable: Sequence[str], layers: Sequence[Layer], split: Split,
                  roots: Callable[[Tensor, Tensor], Tensor], batch: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Per batch of ``split`` and layer: its inputs ``[b, t, D]`` and the gradients at its outputs ``[C, b, t, d_out]``
    back-propagated from each column of ``roots(outputs, targets) [b, K, C]``, in the model's dtype, at ``params``
    (``trainable``: the names that need gradients). Examples must not interact in the forward pass (no batch
    statistics), as in every task."""
    params = {k: v.detach().requires_grad_(k in trainable) for k, v in params.items()}
    store: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(layer: Layer) -> Any:
        def capture(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            store[layer.name] = (inputs[0].detach(), output)
        return capture

    handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
    try:
        for start in range(0, len(split), batch):
            inputs, targets = split.inputs[start : start + batch], split.targets[start : start + batch]
            store.clear()
            outputs = functional_call(model, params, (inputs,))
            columns = roots(outputs.detach(), targets)
            layer_outputs = [store[layer.name][1] for layer in layers]
            per_column = [torch.autograd.grad(outputs, layer_outputs, grad_outputs=columns[:, :, c],
                                              retain_graph=c + 1 < columns.shape[2])
                          for c in range(columns.shape[2])]
            yield [(layer.inputs(store[layer.name][0]), torch.stack([layer.output_grads(g[i]) for g in per_column]))
                   for i, layer in enumerate(layers)]
    finally:
        for handle in handles:
            handle.remove()


def layer_parameter_names(layers: Sequence[Layer]) -> tuple[str, ...]:
    """The weights and biases ``layers`` cover, layer by layer (the flat order of :func:`layer_gradients`)."""
    return tuple(name for layer in layers for name in (layer.weight, layer.bias) if name is not None)


def loss_roots(loss: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``roots(outputs, targets) → [b, K, 1]``: ∇_outputs of each example's ``loss`` (per-example ``[b]``), the
    output gradients that make :func:`layer_signals` give the loss' per-example gradients."""
    def example_loss(outputs: Tensor, target: Tensor) -> Tensor:
        return loss(outputs[None], target[None])[0]

    def roots(outputs: Tensor, targets: Tensor) -> Tensor:
        return vmap(grad(example_loss))(outputs, targets)[:, :, None]

    return roots


def layer_gradients(model: nn.Module, params: Params, trainable: Sequence[str], layers: Sequence[Layer], split: Split,
                    roots: Callable[[Tensor, Tensor], Tensor], batch: int, out: Tensor | None = None) -> Tensor:
    """Per-example gradients of ``layers`` ``[len(split), P]`` (``P``: their weights and biases, in the flat order of
    :func:`covered_layers`), each layer's Σ_positions s aᵀ from one batched backward pass per ``batch`` examples
    (no per-example vmap); written into ``out`` (at least that many rows) when given, so a caller scoring a chunk
    at a time reuses one buffer."""
    size = sum(layer.d_out * layer.d_in for layer in layers)
    found = out[: len(split)] if out is not None else next(iter(params.values())).new_empty(len(split), size)
    first = 0
    for captured in layer_signals(model, params, trainable, layers, split, roots, batch):
        rows = captured[0][0].shape[0]
        for layer, (a, s) in zip(layers, captured, strict=True):
            layer.write_gradients(found[first : first + rows], s[0], a)
        first += rows
    return found


@dataclass(frozen=True)
class LayerGradientSource:
    """Per-example gradients of the Linear/Conv2d ``layers`` at ``params`` (model order) from batched backward passes
    of ``batch`` examples: ``source(split) → [len(split), size]`` over ``names``, their weights and biases in flat
    order; norm and embedding parameters are not among them."""

    model: nn.Module
    params: Params
    layers: tuple[Layer, ...]
    roots: Callable[[Tensor, Tensor], Tensor]
    batch: int

    @property
    def names(self) -> tuple[str, ...]:
        return layer_parameter_names(self.layers)

    @property
    def size(self) -> int:
        return sum(layer.d_out * layer.d_in for layer in self.layers)

    def __call__(self, split: Split, out: Tensor | None = None) -> Tensor:
        return layer_gradients(self.model, self.params, self.names, self.layers, split, self.roots, self.batch, out)

    def chunks(self, train: Split, idx: Tensor, chunk: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(cols, grads [len(cols), size])`` over ``train``'s points ``idx``, ``chunk`` at a time, the gradients in
        one reused buffer (valid until the next chunk): memory O(chunk · size), never ``[len(idx), size]``."""
        buffer = None
        for cols in idx.split(chunk):
            grads = self(train.subset(cols), buffer)
            buffer = grads if buffer is None else buffer
            yield cols, grads


def layer_gradient_source(model: nn.Module, params: Params, names: tuple[str, ...],
                          loss: Callable[[Tensor, Tensor], Tensor], batch: int) -> LayerGradientSource:
    """The :class:`LayerGradientSource` of the Linear/Conv2d layers among ``names`` (all when empty) for the per-example
    ``loss``; NotApplicable where there is none."""
    params = in_model_order(model, params)  # a checkpoint may store its parameters in another order
    layers = covered_layers(model, params, names)
    if not layers:
        raise NotApplicable("gradients = 'layers' needs a Linear or Conv2d layer among the chosen parameters")
    return LayerGradientSource(model, params, tuple(layers), loss_roots(loss), batch)
