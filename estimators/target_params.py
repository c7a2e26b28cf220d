"""GIF's target-parameter selection (Lyu et al.): which parameters are "closely tied" to examined data.

Rules, each scoring *units* per examined example (``[m, U]``), averaged over a set:

- "activation" (output-based): neurons by mean |activation| on the examined data;
- "output-gradient" (output-based): neurons by mean |∂ℓ/∂activation|;
- "gradient": single parameters by mean |∂ℓ/∂θ|;
- "random": single parameters in a seeded random order (a control).

A neuron is output channel j of a module (row j of its weight, its bias j,
and any other of its parameters' index j): the unit is its incoming weights
and bias. Units are taken best-first, whole, up to ``ratio`` × P parameters; the next unit then gives the
parameters left in the budget, those where the loss curves most first (the Hessian's diagonal: independent of
the examined data, so a neuron set's selection is one selection). The share moved is ``ratio`` (to one
parameter), not rounded up to whole neurons: on a head whose neurons are 385 parameters each, 5% is 38.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bench.seeding import torch_generator
from estimators.autodiff import FlatLoss
from tasks.base import Split

SELECTION_RULES = ("activation", "output-gradient", "gradient", "random")
NEURON_RULES = ("activation", "output-gradient")
CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Units:
    """``unit_of [P]``: the unit of each flat parameter; ``modules``: (module path, channel) per neuron."""

    unit_of: Tensor
    sizes: Tensor
    modules: tuple[tuple[str, int], ...]


def neuron_units(flat: FlatLoss) -> Units:
    """Group the flat parameters by (owning module, output channel = index along dim 0)."""
    ids: dict[tuple[str, int], int] = {}
    unit_of = []
    for name in flat.names:
        module = name.rpartition(".")[0]
        shape = flat.params[name].shape
        channels = torch.arange(shape[0]).repeat_interleave(shape[1:].numel() if len(shape) > 1 else 1)
        unit_of.append(torch.tensor([ids.setdefault((module, int(c)), len(ids)) for c in channels.tolist()]))
    unit_of_all = torch.cat(unit_of)
    return Units(unit_of_all, torch.bincount(unit_of_all, minlength=len(ids)), tuple(ids))


def _module_outputs(flat: FlatLoss, split: Split, modules: set[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs of ``modules`` (graph kept) and the per-example losses ``[m]`` at θ̂."""
    captured: dict[str, Tensor] = {}
    handles = [flat.model.get_submodule(path).register_forward_hook(
        lambda _m, _i, out, path=path: captured.__setitem__(path, out)) for path in modules]
    try:
        theta = flat.theta().requires_grad_(True)  # so that module outputs carry a graph to the loss
        losses = flat.loss(functional_call(flat.model, flat.unflatten(theta), (split.inputs,)), split.targets)
    finally:
        for handle in handles:
            handle.remove()
    return captured, losses


def _per_channel(module: nn.Module, values: Tensor) -> Tensor:
    """``[m, C]`` mean |value| per example and output channel."""
    values = values.abs()
    if isinstance(module, CHANNEL_FIRST):
        return values.flatten(2).mean(2) if values.dim() > 2 else values
    return values.reshape(values.shape[0], -1, values.shape[-1]).mean(1)


def neuron_scores(flat: FlatLoss, split: Split, units: Units, rule: str) -> Tensor:
    """``[m, n_neurons]`` per-example scores under an output-based ``rule``."""
    paths = {path for path, _ in units.modules}
    with torch.enable_grad():
        captured, losses = _module_outputs(flat, split, paths)
        missing = paths - set(captured)
        if missing:
            raise ValueError(f"modules {sorted(missing)} produced no output in the forward pass")
        if rule == "output-gradient":
            grads = torch.autograd.grad(losses.sum(), [captured[p] for p in paths], allow_unused=True)
            captured = {p: (g if g is not None else torch.zeros_like(captured[p])) for p, g in zip(paths, grads, strict=True)}
    per_module = {p: _per_channel(flat.model.get_submodule(p), v.detach()) for p, v in captured.items()}
    return torch.stack([per_module[path][:, channel] for path, channel in units.modules], dim=1)


def unit_scores(flat: FlatLoss, split: Split, grads: Tensor, rule: str, units: Units) -> Tensor:
    """``[m, U]`` per-example unit scores (neurons for output-based rules, parameters otherwise)."""
    if rule in NEURON_RULES:
        return neuron_scores(flat, split, units, rule)
    if rule == "gradient":
        return grads.abs()
    raise ValueError(f"unknown selection rule {rule!r}. Valid: {', '.join(SELECTION_RULES)}")


def random_scores(size: int, seed: int, key: tuple[int, ...]) -> Tensor:
    """Seeded uniform scores for one examined set, named by its sorted training indices."""
    return torch.rand(size, generator=torch_generator(seed, "gif-random", *key), dtype=torch.float64)


def take_best(scores: Tensor, sizes: Tensor | None, unit_of: Tensor | None, budget: int,
              within: Tensor | None = None) -> Tensor:
    """Flat indices of exactly ``budget`` parameters, sorted: the best units whole, best-first, then as many of
    the next unit's parameters as the budget leaves (in order of ``within [P]``, highest first; index order
    without it), so the share moved is ``budget / P`` whatever a unit's size."""
    order = torch.argsort(scores.cpu().double(), descending=True, stable=True)
    if sizes is None:  # units are single parameters
        return torch.sort(order[:budget]).values
    cumulative = torch.cumsum(sizes.cpu()[order], 0)
    whole = int((cumulative <= budget).sum())
    picked = torch.nonzero(torch.isin(unit_of.cpu(), order[:whole])).flatten()
    short = budget - len(picked)
    if short > 0 and whole < len(order):
        members = torch.nonzero(unit_of.cpu() == order[whole]).flatten()
        if within is not None:
            members = members[torch.argsort(within.cpu().double()[members], descending=True, stable=True)]
        picked = torch.cat([picked, members[:short]])
    return torch.sort(picked).values
