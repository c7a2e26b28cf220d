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

Two views of an update: the estimator's own Δθ (α = 1: ``f1``, ``forget``,
``retain``, ``param_distance``), and θ̂ + α*·Δθ with α* the step on a grid of
powers of two that maximises F1 on a *validation* half of the test split
(``f1_best_alpha``, ``alpha_star``). The GIF authors scale the update and keep
the best F1 along that line; choosing α on the validation half and reporting on
the other, *evaluation* half keeps the choice off the numbers it is judged by.
Test-set metrics are on the evaluation half, with 95% intervals from resampling
its points (and the forget set) with replacement. The retrained model's and θ̂'s
own values are recorded with the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from bench.executors import Executor
from bench.groundtruth.base import CellResult, Evaluation, EvaluationError, GroundTruth, Protocol
from bench.groundtruth.retraining import check_class, check_lr_factor, check_retrain_mode, check_warm_epochs, warm_steps
from bench.records import Fact, fact
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

    def __post_init__(self) -> None:
        check_retrain_mode(self.retrain)
        check_warm_epochs(self.warm_epochs)
        check_lr_factor("warm_lr_factor", self.warm_lr_factor)
        check_class("target_class", self.target_class)


@dataclass(frozen=True)
class LabelChangeConfig:
    """``fraction`` of the training set, drawn from one source class, relabelled to one target class
    (−1: drawn from the seed). The model is retrained on the new labels with the task's own recipe."""

    fraction: float = 0.05
    source_class: int = -1
    target_class: int = -1

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"label-change: fraction must be in (0, 1), got {self.fraction}")
        check_class("source_class", self.source_class)
        check_class("target_class", self.target_class)


def _flatten(params: Params, names: list[str]) -> Tensor:
    return torch.cat([params[n].detach().reshape(-1).double().cpu() for n in names])


#: The scalings of Δθ the validation sweep tries (powers of two, 1/64 to 256).
ALPHAS = tuple(2.0**k for k in range(-6, 9))

#: Per-point success indicators of a model: ``{"forget": [n_f], "retain": [n_r]}`` (booleans).
Hits = dict[str, np.ndarray]


@torch.no_grad()
def correct(task: Task, params: Params, split: Split) -> np.ndarray:
    """``[len(split)]`` whether the model predicts each target."""
    if len(split) == 0:
        return np.zeros(0, dtype=bool)
    logits = functional_call(task.build_model(), params, (split.inputs,))
    return (logits.argmax(-1) == split.targets).cpu().numpy()


def _harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def summary(hits: Hits) -> dict[str, float]:
    """forget, retain (means of the indicators) and their harmonic mean f1."""
    forget, retain = (float(hits[k].mean()) if len(hits[k]) else float("nan") for k in ("forget", "retain"))
    return {"forget": forget, "retain": retain, "f1": _harmonic(forget, retain)}


def f1_interval(hits: Hits, *, resamples: int, seed: int) -> list[float]:
    """Percentile 95% CI of F1, resampling the forget and retain points separately."""
    generator = np.random.default_rng(seed)
    values = [summary({k: v[generator.integers(0, len(v), len(v))] for k, v in hits.items()})["f1"]
              for _ in range(resamples)]
    return [float(v) for v in np.nanpercentile(values, [2.5, 97.5])]


def halves(test: Split, seed: int) -> tuple[Split, Split]:
    """(validation, evaluation): a seeded split of the test set in two halves."""
    order = rng(seed, "updates", "validation").permutation(len(test))
    return test.subset(np.sort(order[: len(test) // 2])), test.subset(np.sort(order[len(test) // 2 :]))


class UpdateProtocol(Protocol):
    """Shared: retrain once on the changed data, then judge estimators' updated models."""

    needs: ClassVar[frozenset[str]] = frozenset({PARAMETER_UPDATE})
    version: ClassVar[str] = "2"  # 2: metrics on the evaluation half; α* chosen on the validation half
    headline: ClassVar[str] = "f1"
    columns: ClassVar[tuple[str, ...]] = ("f1_best_alpha", "alpha_star", "forget", "retain", "param_distance")
    column_noun: ClassVar[str] = "change"
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"param_distance"})
    caches_predictions: ClassVar[bool] = False  # a parameter update: tensors by name, not one array

    def plan(self, task: Task, data: TaskData) -> tuple[np.ndarray, np.ndarray | None]:
        """Training indices changed, and their new labels (None: removed)."""
        raise NotImplementedError

    def hits(self, task: Task, data: TaskData, params: Params, extra: dict[str, np.ndarray], test: Split) -> Hits:
        """A model's forget and retain indicators, with ``test`` as the test split (see the module docstring)."""
        raise NotImplementedError

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        cfg = self.config
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
        _, evaluation = halves(data.test, self.seed)
        diagnostics: dict[str, Any] = {
            f"{who}_{k}": v for who, params in (("retrained", retrained), ("original", base.params))
            for k, v in summary(self.hits(task, data, params, extra, evaluation)).items()}
        diagnostics["changed_points"] = float(len(changed))
        return GroundTruth(self.name, changed, actual, diagnostics, None, extra)

    #: How the changed points are named in the leaderboard ("removed", "relabelled").
    changed_verb: ClassVar[str] = "relabelled"

    def facts(self, truth: GroundTruth) -> list[Fact]:
        gt = truth.diagnostics
        found = [fact("{} training points " + self.changed_verb, int(gt["changed_points"])),
                 fact("test metrics on the evaluation half of the test split, α* chosen on the validation half")]
        for who, label in (("retrained", "retrained model"), ("original", "θ̂ (no update)")):
            found.append(fact(label + ": F1 {} (forget {}, retain {})", f"{gt[f'{who}_f1']:.3f}",
                              f"{gt[f'{who}_forget']:.3f}", f"{gt[f'{who}_retain']:.3f}"))
        return found

    def predict(self, ev: Evaluation) -> Params:
        """The estimator's Δθ in the whole model's parameter names, checked to be finite."""
        extra, base = ev.truth.extra, ev.base.params
        removed = torch.as_tensor(extra["changed"], dtype=torch.long, device=ev.data.train.targets.device)
        new_labels = extra.get("new_labels")
        targets = None if new_labels is None else torch.as_tensor(new_labels, device=removed.device)
        delta = ev.lift(ev.estimator.update(removed, targets))
        unknown = set(delta) - set(base)
        if unknown:
            raise EvaluationError(f"update() returned parameters the model does not have: {sorted(unknown)}")
        if not all(bool(torch.isfinite(v).all()) for v in delta.values()):
            raise EvaluationError("update() returned non-finite values")
        return delta

    def judge(self, delta: Params, ev: Evaluation) -> CellResult:
        extra, base = ev.truth.extra, ev.base.params

        def scaled(alpha: float) -> Params:
            return {n: (v + alpha * delta[n].to(v.dtype) if n in delta else v) for n, v in base.items()}

        updated, (validation, evaluation) = scaled(1.0), halves(ev.data.test, self.seed)
        alpha_star = max(sorted(ALPHAS, key=lambda a: abs(np.log2(a))),  # ties: the step closest to α = 1
                         key=lambda a: summary(self.hits(ev.task, ev.data, scaled(a), extra, validation))["f1"])
        own, best = (self.hits(ev.task, ev.data, scaled(a), extra, evaluation) for a in (1.0, alpha_star))
        result = CellResult()
        result.metrics.update(summary(own))
        result.metrics.update(f1_best_alpha=summary(best)["f1"], alpha_star=alpha_star)
        result.ci["f1"] = f1_interval(own, resamples=ev.settings.resamples, seed=ev.settings.seed)
        result.ci["f1_best_alpha"] = f1_interval(best, resamples=ev.settings.resamples, seed=ev.settings.seed)
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
    changed_verb: ClassVar[str] = "removed"

    def plan(self, task: Task, data: TaskData) -> tuple[np.ndarray, np.ndarray | None]:
        labels = data.train.targets.cpu().numpy()
        self.target = _pick_class(labels, self.config.target_class, self.seed, "class-removal")
        return np.flatnonzero(labels == self.target), None

    def hits(self, task: Task, data: TaskData, params: Params, extra: dict[str, np.ndarray], test: Split) -> Hits:
        target = int(data.train.targets[int(extra["changed"][0])])
        removed_class = (test.targets == target).cpu().numpy()
        hit = correct(task, params, test)
        return {"forget": ~hit[removed_class], "retain": hit[~removed_class]}


@registered("label-change")
class LabelChange(UpdateProtocol):
    """Relabel a set of one class's training points to another class; the updated model should follow."""

    Config: ClassVar[type] = LabelChangeConfig
    column_noun: ClassVar[str] = "relabelling"

    def plan(self, task: Task, data: TaskData) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.config
        labels = data.train.targets.cpu().numpy()
        source = _pick_class(labels, cfg.source_class, self.seed, "label-change", "source")
        target = _pick_class(labels, cfg.target_class, self.seed, "label-change", "target", exclude=source)
        pool = np.flatnonzero(labels == source)
        size = min(len(pool), max(1, round(cfg.fraction * len(labels))))
        changed = np.sort(rng(self.seed, "label-change", "points").choice(pool, size, replace=False))
        return changed, np.full(size, target, dtype=np.int64)

    def hits(self, task: Task, data: TaskData, params: Params, extra: dict[str, np.ndarray], test: Split) -> Hits:
        moved = relabelled(data, extra["changed"], extra["new_labels"]).train.subset(extra["changed"])
        return {"forget": correct(task, params, moved), "retain": correct(task, params, test)}  # new labels followed
