"""GIF's protocols (Lyu et al.): class removal and label change, judged on the updated model.

The estimator's parameter update (Δθ for dropping, or relabelling, a set of
training points) is added to θ̂ and the updated model is compared with the
model actually retrained without (or with the new labels of) those points:

- ``forget``: class removal, 1 − accuracy on the removed class's test points;
  label change, accuracy on the relabelled training points under their new labels;
- ``retain``: test accuracy on the other classes (class removal) or on the whole
  test set (label change);
- ``f1``: the harmonic mean of forget and retain, the GIF paper's F1;
- ``param_distance``: ‖θ_updated − θ_retrained‖ / ‖θ̂ − θ_retrained‖ over all
  parameters (0: the update is the retrained model; 1: no better than no update).

The retrained model's and θ̂'s own values are recorded with the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from bench.groundtruth.base import CellResult, Evaluation, EvaluationError, GroundTruth, Protocol
from bench.groundtruth.retraining import warm_steps
from bench.registry import registered
from bench.seeding import rng
from estimators.base import PARAMETER_UPDATE
from tasks.base import Params, RetrainSpec, Split, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class ClassRemovalConfig:
    """``target_class`` −1: drawn from the seed. Non-convex tasks retrain with ``retrain`` ("scratch" or "warm")."""

    target_class: int = -1
    retrain: str = "scratch"
    warm_epochs: float = 1.0
    warm_lr_factor: float = 0.1


@dataclass(frozen=True)
class LabelChangeConfig:
    """``fraction`` of the training set, drawn from one source class, relabelled to one target class
    (−1: drawn from the seed). The model is retrained on the new labels with the task's own recipe."""

    fraction: float = 0.05
    source_class: int = -1
    target_class: int = -1


def _flatten(params: Params, names: list[str]) -> Tensor:
    return torch.cat([params[n].detach().reshape(-1).double().cpu() for n in names])


@torch.no_grad()
def _accuracy(task: Task, params: Params, split: Split) -> float:
    if len(split) == 0:
        return float("nan")
    return task.accuracy(task.build_model(), params, split)


def _harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


class UpdateProtocol(Protocol):
    """Shared: retrain once on the changed data, then judge estimators' updated models."""

    needs: ClassVar[frozenset[str]] = frozenset({PARAMETER_UPDATE})
    headline: ClassVar[str] = "f1"
    columns: ClassVar[tuple[str, ...]] = ("forget", "retain", "param_distance")
    column_noun: ClassVar[str] = "change"
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"param_distance"})

    def plan(self, task: Task, data: TaskData) -> tuple[np.ndarray, np.ndarray | None]:
        """Training indices changed, and their new labels (None: removed)."""
        raise NotImplementedError

    def scores(self, task: Task, data: TaskData, params: Params, extra: dict[str, np.ndarray]) -> dict[str, float]:
        """forget, retain, f1 of a model (see the module docstring)."""
        raise NotImplementedError

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        cfg = self.config
        if getattr(cfg, "retrain", "scratch") not in ("warm", "scratch"):
            raise ValueError(f"{self.name}: unknown retrain mode {cfg.retrain!r}. Valid: warm, scratch")
        changed, new_labels = self.plan(task, data)
        index = torch.as_tensor(changed, dtype=torch.long)
        if new_labels is None:
            steps = warm_steps(task, len(data.train) - len(changed), cfg.warm_epochs)
            spec = RetrainSpec("exact") if task.convex else RetrainSpec(cfg.retrain, 0, steps, cfg.warm_lr_factor)
            retrained = task.retrain_without(data, base, [index], spec)[0].params
        else:
            retrained = task.train(relabelled(data, changed, new_labels)).params
        extra = {"changed": changed, **({"new_labels": new_labels} if new_labels is not None else {})}
        names = list(base.params)
        extra.update({f"retrained.{n}": retrained[n].detach().cpu().numpy() for n in names})
        model = task.build_model()
        with torch.no_grad():
            actual = (task.per_example_loss(model, retrained, data.test) -
                      task.per_example_loss(model, base.params, data.test)).cpu().numpy()[:, None]
        diagnostics: dict[str, Any] = {f"retrained_{k}": v for k, v in self.scores(task, data, retrained, extra).items()}
        diagnostics.update({f"original_{k}": v for k, v in self.scores(task, data, base.params, extra).items()})
        diagnostics["changed_points"] = float(len(changed))
        return GroundTruth(self.name, changed, actual, diagnostics, None, extra)

    def evaluate(self, ev: Evaluation) -> CellResult:
        extra, base = ev.truth.extra, ev.base.params
        removed = torch.as_tensor(extra["changed"], dtype=torch.long, device=ev.data.train.targets.device)
        new_labels = extra.get("new_labels")
        targets = None if new_labels is None else torch.as_tensor(new_labels, device=removed.device)
        delta = ev.lift(ev.estimator.update(removed, targets))
        unknown = set(delta) - set(base)
        if unknown:
            raise ValueError(f"update() returned parameters the model does not have: {sorted(unknown)}")
        updated = {n: (v + delta[n].to(v.dtype) if n in delta else v) for n, v in base.items()}
        if not all(bool(torch.isfinite(v).all()) for v in delta.values()):
            raise EvaluationError("update() returned non-finite values")
        result = CellResult()
        for name, value in self.scores(ev.task, ev.data, updated, extra).items():
            result.metrics[name] = value
        names = list(base)
        retrained = torch.cat([torch.as_tensor(extra[f"retrained.{n}"]).reshape(-1).double() for n in names])
        gap = float((_flatten(base, names) - retrained).norm())
        result.metrics["param_distance"] = float((_flatten(updated, names) - retrained).norm()) / max(gap, 1e-30)
        result.details = {"changed_parameters": sorted(delta)}
        return result



def relabelled(data: TaskData, changed: np.ndarray, new_labels: np.ndarray) -> TaskData:
    targets = data.train.targets.clone()
    targets[torch.as_tensor(changed, dtype=torch.long)] = torch.as_tensor(new_labels, device=targets.device)
    return TaskData(Split(data.train.inputs, targets), data.test, data.query_idx)


def _pick_class(labels: np.ndarray, wanted: int, seed: int, *keys: str, exclude: int | None = None) -> int:
    classes = [int(c) for c in np.unique(labels) if c != exclude]
    if wanted >= 0:
        if wanted not in classes:
            raise ValueError(f"class {wanted} is not in the training labels (classes: {classes})")
        return wanted
    return int(rng(seed, *keys).choice(classes))


@registered("class-removal")
class ClassRemoval(UpdateProtocol):
    """Remove every training point of one class; the updated model should forget it and keep the rest."""

    Config: ClassVar[type] = ClassRemovalConfig
    column_noun: ClassVar[str] = "removed class"

    def plan(self, task: Task, data: TaskData) -> tuple[np.ndarray, np.ndarray | None]:
        labels = data.train.targets.cpu().numpy()
        self.target = _pick_class(labels, self.config.target_class, self.seed, "class-removal")
        return np.flatnonzero(labels == self.target), None

    def scores(self, task: Task, data: TaskData, params: Params, extra: dict[str, np.ndarray]) -> dict[str, float]:
        target = int(data.train.targets[int(extra["changed"][0])])
        test_labels = data.test.targets.cpu().numpy()
        forget = 1.0 - _accuracy(task, params, data.test.subset(np.flatnonzero(test_labels == target)))
        retain = _accuracy(task, params, data.test.subset(np.flatnonzero(test_labels != target)))
        removed_train = _accuracy(task, params, data.train.subset(extra["changed"]))
        return {"forget": forget, "retain": retain, "f1": _harmonic(forget, retain), "removed_train_accuracy": removed_train}


@registered("label-change")
class LabelChange(UpdateProtocol):
    """Relabel a set of one class's training points to another class; the updated model should follow."""

    Config: ClassVar[type] = LabelChangeConfig
    column_noun: ClassVar[str] = "relabelling"

    def plan(self, task: Task, data: TaskData) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.config
        if not 0 < cfg.fraction < 1:
            raise ValueError(f"label-change: fraction must be in (0, 1), got {cfg.fraction}")
        labels = data.train.targets.cpu().numpy()
        source = _pick_class(labels, cfg.source_class, self.seed, "label-change", "source")
        target = _pick_class(labels, cfg.target_class, self.seed, "label-change", "target", exclude=source)
        pool = np.flatnonzero(labels == source)
        size = min(len(pool), max(1, round(cfg.fraction * len(labels))))
        changed = np.sort(rng(self.seed, "label-change", "points").choice(pool, size, replace=False))
        return changed, np.full(size, target, dtype=np.int64)

    def scores(self, task: Task, data: TaskData, params: Params, extra: dict[str, np.ndarray]) -> dict[str, float]:
        moved = relabelled(data, extra["changed"], extra["new_labels"]).train.subset(extra["changed"])
        forget = _accuracy(task, params, moved)  # accuracy under the new labels
        retain = _accuracy(task, params, data.test)
        return {"forget": forget, "retain": retain, "f1": _harmonic(forget, retain)}
