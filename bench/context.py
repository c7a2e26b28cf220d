"""The one place a :class:`FitContext` is assembled from a task, its data and a trained model."""

from __future__ import annotations

from torch import Tensor

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
    )


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
