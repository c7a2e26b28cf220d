"""Mislabel detection (TracIn's evaluation; Koh & Liang §5.4): rank training points by self-influence.

A seeded ``fraction`` of the training labels is flipped to another class (by
default the class θ̂ confuses it with most, as in TracIn's and dattri's set-ups:
such flips are plausible and harder to spot than uniform ones), the model is
trained on the noisy labels with the task's own recipe, and every estimator is
fit on *that* model and data. Points are ranked by self-influence
(the predicted rise of a point's own loss when it is removed; mislabelled points
should rank high). Reported: ROC AUC of the ranking for "is flipped", and the
fraction of flipped labels found after inspecting the top 10/20/30% of the data.
The AUC's 95% interval resamples flipped and clean ranked points separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.stats
import torch
from torch.func import functional_call

from bench.executors import Executor
from bench.groundtruth.base import CellResult, Evaluation, GroundTruth, Protocol, TaskShape, checked
from bench.records import Fact, fact
from bench.registry import registered
from bench.seeding import rng
from estimators.base import SELF_INFLUENCE
from tasks.base import Split, Task, TaskData, TrainedModel

INSPECTED = (0.1, 0.2, 0.3)


FLIPS = ("confused", "uniform")


@dataclass(frozen=True)
class MislabelConfig:
    """``fraction`` of the training labels flipped: ``flip = "confused"`` to the class θ̂ gives the highest
    probability among the wrong ones, ``"uniform"`` to a uniformly drawn other class."""

    fraction: float = 0.1
    #: Rank a seeded random subset of this many training points (0: all). Iterative inverse-HVP solvers
    #: pay one solve per ranked point, so a subset keeps them affordable; the fractions are unbiased.
    n_ranked: int = 0
    flip: str = "confused"

    def __post_init__(self) -> None:
        if self.flip not in FLIPS:
            raise ValueError(f"mislabel: unknown flip {self.flip!r}. Valid: {', '.join(FLIPS)}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"mislabel: fraction must be in (0, 1), got {self.fraction}")
        if self.n_ranked < 0:
            raise ValueError(f"mislabel: n_ranked must be ≥ 0 (0: all), got {self.n_ranked}")


def flip_labels(labels: np.ndarray, fraction: float, seed: int,
                confusion: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted flipped indices, noisy labels): which points from the seed alone; each flipped to the wrong class
    with the highest ``confusion [n, classes]`` score (e.g. θ̂'s logits), or uniformly without one."""
    if not 0 < fraction < 1:
        raise ValueError(f"mislabel: fraction must be in (0, 1), got {fraction}")
    generator = rng(seed, "mislabel")
    classes = np.unique(labels)
    flipped = np.sort(generator.choice(len(labels), max(1, round(fraction * len(labels))), replace=False))
    noisy = labels.copy()
    for i in flipped:
        if confusion is None:
            noisy[i] = generator.choice(classes[classes != labels[i]])
        else:
            scores = confusion[i].astype(np.float64).copy()
            scores[labels[i]] = -np.inf
            noisy[i] = int(np.argmax(scores))
    return flipped, noisy


def auc_interval(self_influence: np.ndarray, is_flipped: np.ndarray, *, resamples: int, seed: int) -> list[float]:
    """Percentile 95% CI of the AUC, resampling flipped and clean points separately (so it stays defined)."""
    generator = np.random.default_rng(seed)
    positives, negatives = self_influence[is_flipped], self_influence[~is_flipped]
    values = []
    for _ in range(resamples):
        p = positives[generator.integers(0, len(positives), len(positives))]
        n = negatives[generator.integers(0, len(negatives), len(negatives))]
        ranks = scipy.stats.rankdata(np.concatenate([p, n]))
        values.append((ranks[: len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


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
    version: ClassVar[str] = "2"  # 2: flips to the most-confused class by default

    @classmethod
    def check_against(cls, config: MislabelConfig, task: TaskShape) -> None:
        if task.n_train is not None and config.n_ranked > task.n_train:
            raise ValueError(f"mislabel: n_ranked must be in 1..{task.n_train} (0: all), got {config.n_ranked}")

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        labels = data.train.targets.cpu().numpy()
        confusion = self._logits(task, base, data.train) if self.config.flip == "confused" else None
        flipped, noisy = flip_labels(labels, self.config.fraction, self.seed, confusion)
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
                       "flip": self.config.flip,
                       "noisy_test_accuracy": model.diagnostics.get("test_accuracy", np.nan),
                       **{f"loss_ranking_{k}": v for k, v in detection_metrics(losses, is_flipped).items()}}
        return GroundTruth(self.name, ranked, is_flipped[None].astype(np.float64), diagnostics, None,
                           {"noisy_labels": noisy, "flipped": flipped}, model)

    @staticmethod
    def _noisy(data: TaskData, noisy: np.ndarray) -> TaskData:
        return TaskData(Split(data.train.inputs, torch.as_tensor(noisy, device=data.train.targets.device)),
                        data.test, data.query_idx)

    @staticmethod
    def _logits(task: Task, base: TrainedModel, split: Split, chunk: int = 1024) -> np.ndarray:
        """θ̂'s outputs ``[n, classes]`` on ``split``, for flips to the most-confused class."""
        model = task.build_model()
        with torch.no_grad():
            parts = [functional_call(model, base.params, (split.inputs[i : i + chunk],)) for i in range(0, len(split), chunk)]
        return torch.cat(parts).double().cpu().numpy()

    @staticmethod
    def _losses(task: Task, model: TrainedModel, noisy: TaskData) -> np.ndarray:
        """Each training point's loss under its noisy label: the simple ranking estimators should beat."""
        with torch.no_grad():
            return task.per_example_loss(task.build_model(), model.params, noisy.train).double().cpu().numpy()

    def fit_data(self, data: TaskData, truth: GroundTruth) -> TaskData:
        return self._noisy(data, truth.extra["noisy_labels"])

    def facts(self, truth: GroundTruth) -> list[Fact]:
        gt = truth.diagnostics
        flips = "to the class θ̂ confuses them with most" if gt.get("flip") == "confused" else "to a random other class"
        return [fact("{} labels flipped " + flips + "; {} of them among the {} ranked points", int(gt["flipped"]),
                     int(gt["flipped_ranked"]), int(gt["ranked"]))]

    def predict(self, ev: Evaluation) -> np.ndarray:
        """``[R]`` self-influence of the ranked points."""
        idx = torch.as_tensor(ev.truth.train_idx, dtype=torch.long, device=ev.data.train.targets.device)
        return checked(ev.estimator.self_influence(idx), (len(idx),))

    def judge(self, values: np.ndarray, ev: Evaluation) -> CellResult:
        is_flipped = ev.truth.actual[0].astype(bool)
        result = CellResult()
        result.metrics.update(detection_metrics(values, is_flipped))
        result.ci["auc"] = auc_interval(values, is_flipped, resamples=ev.settings.resamples, seed=ev.settings.seed)
        return result
