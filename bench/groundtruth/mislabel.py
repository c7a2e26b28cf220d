"""Mislabel detection (TracIn's evaluation; Koh & Liang §5.4): rank training points by self-influence.

A seeded ``fraction`` of the training labels is flipped to another class, the
model is trained on the noisy labels with the task's own recipe, and every
estimator is fit on *that* model and data. Points are ranked by self-influence
(the predicted rise of a point's own loss when it is removed; mislabelled points
should rank high). Reported: ROC AUC of the ranking for "is flipped", and the
fraction of flipped labels found after inspecting the top 10/20/30% of the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.stats
import torch

from bench.groundtruth.base import CellResult, Evaluation, GroundTruth, Protocol, checked
from bench.registry import registered
from bench.seeding import rng
from estimators.base import SELF_INFLUENCE
from tasks.base import Split, Task, TaskData, TrainedModel

INSPECTED = (0.1, 0.2, 0.3)


@dataclass(frozen=True)
class MislabelConfig:
    """``fraction`` of the training labels flipped (each to a uniformly drawn other class)."""


    fraction: float = 0.1
    #: Rank a seeded random subset of this many training points (0: all). Iterative inverse-HVP solvers
    #: pay one solve per ranked point, so a subset keeps them affordable; the fractions are unbiased.
    n_ranked: int = 0


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted flipped indices, noisy labels), from the seed alone."""
    if not 0 < fraction < 1:
        raise ValueError(f"mislabel: fraction must be in (0, 1), got {fraction}")
    generator = rng(seed, "mislabel")
    classes = np.unique(labels)
    flipped = np.sort(generator.choice(len(labels), max(1, round(fraction * len(labels))), replace=False))
    noisy = labels.copy()
    for i in flipped:
        noisy[i] = generator.choice(classes[classes != labels[i]])
    return flipped, noisy


def detection_metrics(self_influence: np.ndarray, is_flipped: np.ndarray) -> dict[str, float]:
    """AUC (Mann–Whitney U / (n₁n₀)) and the fraction of flipped points among the top 10/20/30%."""
    positives, negatives = self_influence[is_flipped], self_influence[~is_flipped]
    auc = scipy.stats.mannwhitneyu(positives, negatives, alternative="two-sided").statistic / (len(positives) * len(negatives))
    order = np.argsort(-self_influence, kind="stable")
    found = {f"found@{100 * f:g}%": float(is_flipped[order[: round(f * len(order))]].sum() / is_flipped.sum())
             for f in INSPECTED}
    return {"auc": float(auc), **found}


@registered("mislabel")
class MislabelDetection(Protocol):
    """Flip 10% of the labels, train, rank points by self-influence."""

    Config: ClassVar[type] = MislabelConfig
    needs: ClassVar[frozenset[str]] = frozenset({SELF_INFLUENCE})
    headline: ClassVar[str] = "auc"
    columns: ClassVar[tuple[str, ...]] = tuple(f"found@{100 * f:g}%" for f in INSPECTED)
    column_noun: ClassVar[str] = "training points"
    fits_on_own_model: ClassVar[bool] = True

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True) -> GroundTruth:
        labels = data.train.targets.cpu().numpy()
        flipped, noisy = flip_labels(labels, self.config.fraction, self.seed)
        n_ranked = self.config.n_ranked or len(labels)
        if not 0 < n_ranked <= len(labels):
            raise ValueError(f"mislabel: n_ranked must be in 1..{len(labels)} (0: all), got {self.config.n_ranked}")
        ranked = np.sort(rng(self.seed, "mislabel", "ranked").permutation(len(labels))[:n_ranked])
        is_flipped = np.isin(ranked, flipped)
        if is_flipped.all() or not is_flipped.any():
            raise ValueError(f"mislabel: the {n_ranked} ranked points hold {int(is_flipped.sum())} of the {len(flipped)} "
                             "flipped labels; AUC needs both flipped and clean points: raise n_ranked (0: all) or fraction")
        noisy_data = self._noisy(data, noisy)
        model = task.train(noisy_data)
        losses = self._losses(task, model, noisy_data)[ranked]
        diagnostics = {"flipped": float(len(flipped)), "ranked": float(n_ranked), "flipped_ranked": float(is_flipped.sum()),
                       "noisy_test_accuracy": model.diagnostics.get("test_accuracy", np.nan),
                       **{f"loss_ranking_{k}": v for k, v in detection_metrics(losses, is_flipped).items()}}
        return GroundTruth(self.name, ranked, is_flipped[None].astype(np.float64), diagnostics, None,
                           {"noisy_labels": noisy, "flipped": flipped}, model)

    @staticmethod
    def _noisy(data: TaskData, noisy: np.ndarray) -> TaskData:
        return TaskData(Split(data.train.inputs, torch.as_tensor(noisy, device=data.train.targets.device)),
                        data.test, data.query_idx)

    @staticmethod
    def _losses(task: Task, model: TrainedModel, noisy: TaskData) -> np.ndarray:
        """Each training point's loss under its noisy label: the simple ranking estimators should beat."""
        with torch.no_grad():
            return task.per_example_loss(task.build_model(), model.params, noisy.train).double().cpu().numpy()

    def fit_data(self, data: TaskData, truth: GroundTruth) -> TaskData:
        return self._noisy(data, truth.extra["noisy_labels"])

    def evaluate(self, ev: Evaluation) -> CellResult:
        idx = torch.as_tensor(ev.truth.train_idx, dtype=torch.long, device=ev.data.train.targets.device)
        values = checked(ev.estimator.self_influence(idx), (len(idx),))
        result = CellResult()
        result.metrics.update(detection_metrics(values, ev.truth.actual[0].astype(bool)))
        return result
