"""The one place a :class:`FitContext` is assembled from a task, its data and a trained model."""

from __future__ import annotations

from torch import Tensor

from bench.seeding import derive_seed
from estimators.base import FitContext
from tasks.base import HeadView, Split, Task, TaskData, TrainedModel


def fit_context(task: Task, data: TaskData, base: TrainedModel, seed: int) -> FitContext:
    """Everything an estimator may use about ``base`` on ``task`` (the whole model; no head view)."""
    return FitContext(
        model=task.build_model(), params=base.params, loss=task.loss, l2=task.l2, train=data.train, seed=seed,
        checkpoints=base.checkpoints, exact_hessian=lambda: task.exact_hessian(base.params, data),
        default_parameters=task.influence_parameters,
        embed=lambda split, space: task.embed(base.params, split, space),
        embedding_spaces=task.embedding_spaces, head_view_at=task.head_view,
        recorded_run=lambda: task.recorded_run(data),
        train_independent=lambda index: task.train(data, seed=independent_seed(task, index)).params,
    )


def independent_seed(task: Task, index: int) -> int:
    """The training seed of ensemble member ``index`` (≥ 1) of ``task``'s θ̂: derived from θ̂'s own, so every
    base model has its own members and the suite's ``--seed`` reaches them."""
    if index < 1:
        raise ValueError(f"an independent model's index must be ≥ 1 (0 is θ̂ itself), got {index}")
    return derive_seed(task.training_seed, "independent model", index)


def head_view_context(task: Task, view: HeadView, train: Split, seed: int) -> FitContext:
    """The same on the task's head view: the head's parameters over ``train``'s features, ``view.split(data.train)``
    (queries must go through ``view.split`` too)."""
    return FitContext(model=view.module, params=view.params, loss=task.loss, l2=task.l2, train=train,
                      seed=seed, embed=_penultimate_of_view, embedding_spaces=("penultimate",))


def _penultimate_of_view(split: Split, space: str) -> Tensor:
    """On a head view the inputs *are* the penultimate features."""
    if space != "penultimate":
        raise ValueError(f"a head view offers only the 'penultimate' feature space, not {space!r}")
    return split.inputs.flatten(1)
