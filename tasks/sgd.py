"""A deterministic mini-batch SGD recipe shared by the deep tasks.

Data order: epoch e visits ``randperm(n)`` drawn from ``(seed, e)``; removed
points are deleted from that permutation, so a retrain without z sees exactly
the same sequence minus z. The learning rate follows a cosine schedule; the
rate in force is saved with every checkpoint (TracIn needs it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bench.seeding import torch_generator
from tasks.base import Checkpoint, Params, SgdRun, Split
from tasks.splits import check_finite, check_sizes


@dataclass(frozen=True)
class SgdRecipe:
    """SGD with momentum and L2 (``weight_decay`` = the objective's l2), cosine-decayed learning rate."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    l2: float = 5e-4
    n_checkpoints: int = 4
    #: retrains trained together as one stacked model (1: one at a time, the plain :func:`run_sgd`)
    retrain_batch: int = 1

    def __post_init__(self) -> None:
        """Task configs extend the recipe: their split sizes are checked here too."""
        if min(self.epochs, self.batch_size, self.n_checkpoints, self.retrain_batch) < 1:
            raise ValueError(f"epochs, batch_size, n_checkpoints and retrain_batch must be ≥ 1, got {self.epochs}, "
                             f"{self.batch_size}, {self.n_checkpoints}, {self.retrain_batch}")
        check_finite("lr", self.lr, positive=True)
        check_finite("l2", self.l2)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if all(hasattr(self, name) for name in ("n_train", "n_test", "n_queries")):
            check_sizes(self.n_train, self.n_test, self.n_queries)  # type: ignore[attr-defined]


def cosine_lr(recipe: SgdRecipe, step: int, total: int) -> float:
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def epoch_order(n: int, seed: int, epoch: int, exclude: Tensor | None) -> Tensor:
    """Training indices visited in ``epoch``: a seeded permutation minus ``exclude``."""
    order = torch.randperm(n, generator=torch_generator(seed, "epoch", epoch))
    if exclude is not None and len(exclude):
        order = order[~torch.isin(order, exclude.cpu())]
    return order


def steps_per_epoch(n_kept: int, batch_size: int) -> int:
    return math.ceil(n_kept / batch_size)


def batches(n: int, seed: int, exclude: Tensor | None, batch_size: int, total: int) -> Iterator[Tensor]:
    """The ``total`` mini-batches (index tensors) of a run: epoch after epoch of :func:`epoch_order`."""
    step = 0
    for epoch in itertools.count():
        order = epoch_order(n, seed, epoch, exclude)
        if step >= total or len(order) == 0:
            return
        for start in range(0, len(order), batch_size):
            if step >= total:
                return
            yield order[start : start + batch_size]
            step += 1


def total_steps(recipe: SgdRecipe, n_kept: int, max_steps: int | None) -> int:
    return max_steps if max_steps is not None else recipe.epochs * steps_per_epoch(n_kept, recipe.batch_size)


def recorded_run(recipe: SgdRecipe, theta0: Tensor, n: int, *, seed: int, max_steps: int | None = None,
                 constant_lr: float | None = None) -> SgdRun:
    """The run :func:`run_sgd` makes from ``theta0`` (flat, over every parameter) on all ``n`` points with
    ``seed``, as a replayable :class:`SgdRun`: the same batches, rates (cosine, or ``constant_lr``), momentum
    and weight decay."""
    total = total_steps(recipe, n, max_steps)
    steps = tuple(batches(n, seed, None, recipe.batch_size, total))
    rates = tuple(constant_lr if constant_lr is not None else cosine_lr(recipe, step, total)
                  for step in range(len(steps)))
    return SgdRun(theta0, steps, rates, recipe.momentum, recipe.l2)


def run_sgd(
    model: nn.Module,
    params: Params,
    train: Split,
    loss: Callable[[Tensor, Tensor], Tensor],
    recipe: SgdRecipe,
    *,
    seed: int,
    exclude: Tensor | None = None,
    max_steps: int | None = None,
    constant_lr: float | None = None,
    on_batch: Callable[[Tensor], None] | None = None,
    after_step: Callable[[int, Params], None] | None = None,
) -> tuple[Params, tuple[Checkpoint, ...]]:
    """Train from ``params``; returns the final parameters and evenly spaced checkpoints.

    ``max_steps`` stops early (warm-start retraining); ``constant_lr`` replaces
    the cosine schedule; ``on_batch(indices)`` sees every batch (for tests);
    ``after_step(steps_done, params)`` sees the parameters after every step (see :class:`Snapshots`).
    """
    current = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(current.values(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.l2)
    n_kept = len(train) - (0 if exclude is None else len(exclude))
    total = total_steps(recipe, n_kept, max_steps)
    marks = {round(total * (i + 1) / recipe.n_checkpoints) for i in range(recipe.n_checkpoints)}
    checkpoints: list[Checkpoint] = []
    for step, batch in enumerate(batches(len(train), seed, exclude, recipe.batch_size, total)):
        batch = batch.to(train.targets.device)
        if on_batch is not None:
            on_batch(batch)
        lr = constant_lr if constant_lr is not None else cosine_lr(recipe, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        outputs = functional_call(model, current, (train.inputs[batch],))
        optimizer.zero_grad(set_to_none=True)
        loss(outputs, train.targets[batch]).mean().backward()
        optimizer.step()
        if step + 1 in marks:
            checkpoints.append(Checkpoint({k: v.detach().clone() for k, v in current.items()}, lr, step + 1))
        if after_step is not None:
            after_step(step + 1, current)
    return {k: v.detach() for k, v in current.items()}, tuple(checkpoints)


class Snapshots:
    """An ``after_step`` hook keeping copies of the parameters after the given step counts; :meth:`members`
    splits stacked parameters ``[M, ...]`` into one tuple of snapshots per member."""

    def __init__(self, steps: Sequence[int]):
        self.steps, self.kept = tuple(steps), {}

    def __call__(self, steps_done: int, params: Params) -> None:
        if steps_done in self.steps:
            self.kept[steps_done] = {k: v.detach().clone() for k, v in params.items()}

    def ordered(self) -> tuple[Params, ...]:
        missing = [s for s in self.steps if s not in self.kept]
        if missing:
            raise RuntimeError(f"the run ended before snapshot steps {missing}")
        return tuple(self.kept[s] for s in self.steps)

    def members(self, count: int) -> list[tuple[Params, ...]]:
        ordered = self.ordered()
        return [tuple({k: v[m] for k, v in params.items()} for params in ordered) for m in range(count)]


StackedForward = Callable[[Params, Tensor], Tensor]


def vmapped_forward(model: nn.Module) -> StackedForward:
    """The generic stacked forward: ``params`` with a leading model axis ``[M, ...]``, inputs ``[M, B, ...]`` →
    outputs ``[M, B, ...]``, by ``torch.func.vmap`` over ``functional_call``."""
    return vmap(lambda p, x: functional_call(model, p, (x,)))


def run_sgd_stacked(
    forward: StackedForward,
    params: Params,
    train: Split,
    loss: Callable[[Tensor, Tensor], Tensor],
    recipe: SgdRecipe,
    *,
    seed: int,
    excludes: Sequence[Tensor],
    max_steps: int | None = None,
    constant_lr: float | None = None,
    after_step: Callable[[int, Params], None] | None = None,
    weights: Tensor | None = None,
) -> list[Params]:
    """M = ``len(excludes)`` runs of :func:`run_sgd` trained together as one stacked model: member m starts
    from ``params``, skips ``excludes[m]`` and sees the batches it would see alone; the final parameters,
    one dict per member (no checkpoints; ``after_step`` sees the stacked parameters). Members leave out
    equally many points, so their batches align (``[M, batch_size]`` indices each step). SGD with momentum
    and weight decay acts elementwise, so one optimizer over the stacked tensors is M independent
    optimizers; the summed loss gives each member its own gradient. Members equal lone runs up to float32
    rounding (stacked kernels sum in another order). ``weights [M, n]`` (optional) multiply each member's
    per-example losses, the batch mean still dividing by the batch's size: the data-weighted run MAGIC
    differentiates (:mod:`estimators.metagradient`); a weight of 0 removes a point from its batches' gradients
    without changing the batches."""
    n, device = len(train), train.targets.device
    sizes = sorted({len(excluded) for excluded in excludes})
    if len(sizes) != 1:
        raise ValueError(f"stacked members must leave out equally many points, got sizes {sizes}")
    total, members = total_steps(recipe, n - sizes[0], max_steps), len(excludes)
    if weights is not None and tuple(weights.shape) != (members, n):
        raise ValueError(f"weights must be [members, n] = [{members}, {n}], got {list(weights.shape)}")
    current = {k: v.detach().unsqueeze(0).repeat(members, *([1] * v.dim())).requires_grad_(True)
               for k, v in params.items()}
    optimizer = torch.optim.SGD(current.values(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.l2)
    streams = [batches(n, seed, torch.as_tensor(excluded, dtype=torch.long), recipe.batch_size, total)
               for excluded in excludes]
    for step in range(total):
        index = torch.stack([next(stream) for stream in streams]).to(device)  # [M, b]: equal kept counts, equal b
        lr = constant_lr if constant_lr is not None else cosine_lr(recipe, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        outputs = forward(current, train.inputs[index])
        per_example = loss(outputs.flatten(0, 1), train.targets[index].flatten()).view(index.shape)
        if weights is not None:
            per_example = per_example * torch.gather(weights, 1, index)
        optimizer.zero_grad(set_to_none=True)
        per_example.mean(1).sum().backward()
        optimizer.step()
        if after_step is not None:
            after_step(step + 1, current)
    return [{k: v[m].detach().clone() for k, v in current.items()} for m in range(members)]
