"""A deterministic mini-batch SGD recipe shared by the deep tasks.

Data order: epoch e visits ``randperm(n)`` drawn from ``(seed, e)``; removed
points are deleted from that permutation, so a retrain without z sees exactly
the same sequence minus z. The learning rate follows a cosine schedule; the
rate in force is saved with every checkpoint (TracIn needs it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bench.seeding import torch_generator
from tasks.base import Checkpoint, Params, Split
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

    def __post_init__(self) -> None:
        """Task configs extend the recipe: their split sizes are checked here too."""
        if self.epochs < 1 or self.batch_size < 1 or self.n_checkpoints < 1:
            raise ValueError(f"epochs, batch_size and n_checkpoints must be ≥ 1, got {self.epochs}, {self.batch_size}, "
                             f"{self.n_checkpoints}")
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
) -> tuple[Params, tuple[Checkpoint, ...]]:
    """Train from ``params``; returns the final parameters and evenly spaced checkpoints.

    ``max_steps`` stops early (warm-start retraining); ``constant_lr`` replaces
    the cosine schedule; ``on_batch(indices)`` sees every batch (for tests).
    """
    current = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(current.values(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.l2)
    n_kept = len(train) - (0 if exclude is None else len(exclude))
    total = max_steps if max_steps is not None else recipe.epochs * steps_per_epoch(n_kept, recipe.batch_size)
    marks = {round(total * (i + 1) / recipe.n_checkpoints) for i in range(recipe.n_checkpoints)}
    checkpoints: list[Checkpoint] = []
    step = 0
    for epoch in itertools.count():
        order = epoch_order(len(train), seed, epoch, exclude).to(train.targets.device)
        if step >= total or len(order) == 0:
            return {k: v.detach() for k, v in current.items()}, tuple(checkpoints)
        for start in range(0, len(order), recipe.batch_size):
            if step >= total:
                break
            batch = order[start : start + recipe.batch_size]
            if on_batch is not None:
                on_batch(batch)
            lr = constant_lr if constant_lr is not None else cosine_lr(recipe, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            outputs = functional_call(model, current, (train.inputs[batch],))
            optimizer.zero_grad(set_to_none=True)
            loss(outputs, train.targets[batch]).mean().backward()
            optimizer.step()
            step += 1
            if step in marks:
                checkpoints.append(Checkpoint({k: v.detach().clone() for k, v in current.items()}, lr, step))
    raise AssertionError("unreachable: the epoch loop is unbounded")
