"""From-scratch linear datamodeling score (TRAK, Park et al. 2023; datamodels, Ilyas et al. 2022).

M random subsets S_m of a fraction α of the training set are drawn from the
protocol's seed. Each is trained with the task's full recipe from a fresh
initialisation (on a fine-tuning task: from the pretrained weights and a fresh
head) under K seeds that are not any base model's, and the K models' query
measurements are averaged per subset. No retrain starts from θ̂, so one set of
subset models serves every base model and every estimator: the ground truth's
cache key is the task's data key, not the base model's, and records of all base
models name the same key.

Two measurements, each a ground truth of its own:

- ``lds`` (the headline): per query, the Spearman correlation across subsets
  between an estimator's predicted loss change for removing the subset's
  complement and the subset models' query loss;
- ``lds_margin``: the same against the correct-class margin (TRAK's model output,
  ``log p_y − log(1 − p_y)``), which falls as the loss rises, so the estimators'
  predicted loss change is negated. trak linearises the margin itself; every
  other estimator is scored on the same negated loss prediction.

``actual[q, m]`` is the mean over seeds of loss(θ_{S_m}, z_q) minus its mean over
subsets: a rank or Pearson correlation across subsets ignores the per-query
constant, and without it the truth does not depend on any θ̂. The seeds'
agreement gives the noise ceiling (:func:`bench.metrics.ceiling`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench import metrics
from bench.executors import Executor, InProcess, RetrainChunk, RetrainProblem
from bench.groundtruth.base import (
    CellResult,
    Evaluation,
    GroundTruth,
    ScoreMatrixProtocol,
    Settings,
    TaskShape,
    pack_groups,
    predict_group_removals,
    unpack_groups,
)
from bench.groundtruth.lds import plan_subsets
from bench.groundtruth.retraining import check_at_least
from bench.records import Fact, fact
from bench.registry import registered
from estimators.base import GROUP, SINGLE
from tasks.base import RetrainSpec, Task, TaskData, TrainedModel


@dataclass(frozen=True)
class LdsScratchConfig:
    """``n_subsets`` (M) subsets of fraction ``alpha``, each trained from scratch under ``seeds`` (K) seeds."""

    n_subsets: int = 100
    alpha: float = 0.5
    seeds: int = 2

    def __post_init__(self) -> None:
        check_at_least("n_subsets", self.n_subsets, 3, "a rank correlation across subsets")
        check_at_least("seeds", self.seeds, 2, "the K models averaged per subset, and the noise ceiling")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def subset_measurements(task: Task, data: TaskData, base: TrainedModel, removed: list[np.ndarray], seeds: int, *,
                        progress: bool, executor: Executor | None) -> tuple[np.ndarray, np.ndarray]:
    """``(losses, margins)``, each ``[K, Q, M]``: the query loss and margin of the model trained from scratch
    without ``removed[m]`` under seed k (``task.replicate_seed(k + 1)`` of base model 0, so no subset model
    shares a base model's seed). Stacks of ``task.retrain_batch`` go to ``executor``."""
    shared = copy.copy(task)
    shared.base_model = 0  # the seeds derive from the data's seed alone, whichever base model asked
    executor = executor or InProcess()
    removals = [torch.as_tensor(r) for r in removed]
    specs = [RetrainSpec("scratch", k + 1) for k in range(seeds)]
    chunks = [RetrainChunk((k, start), spec, tuple(removals[start : start + task.retrain_batch]))
              for k, spec in enumerate(specs) for start in range(0, len(removals), task.retrain_batch)]
    losses = np.zeros((seeds, len(data.queries), len(removals)))
    margins = np.zeros_like(losses)
    bar = tqdm(total=seeds * len(removals), desc=f"lds-scratch trains [{task.name}]", unit="model",
               disable=not progress, leave=False)
    for result in executor.run(RetrainProblem(shared, data, base, torch.get_num_threads()), chunks):
        k, start = result.key
        count = result.losses.shape[1]
        losses[k, :, start : start + count] = result.losses[-1].T
        margins[k, :, start : start + count] = result.margins[-1].T
        bar.update(count)
    bar.close()
    return losses, margins


def centred(values: np.ndarray) -> np.ndarray:
    """``values [..., M]`` minus their mean over the last axis (the subsets)."""
    return values - values.mean(-1, keepdims=True)


@registered("lds-scratch")
class LdsScratch(ScoreMatrixProtocol):
    """Spearman, per query, across random α-subsets each trained from scratch (K seeds averaged)."""

    Config: ClassVar[type] = LdsScratchConfig
    version: ClassVar[str] = "1"
    needs: ClassVar[frozenset[str]] = frozenset({SINGLE, GROUP})
    headline: ClassVar[str] = "lds"
    correlation: ClassVar[str] = "spearman"
    columns: ClassVar[tuple[str, ...]] = ("lds_margin", "pearson")
    column_noun: ClassVar[str] = "subsets"
    depends_on_base: ClassVar[bool] = False

    @classmethod
    def check_against(cls, config: LdsScratchConfig, task: TaskShape) -> None:
        if task.convex:
            raise ValueError(f"lds-scratch: {task.name} is convex, so retraining is exact and does not depend on "
                             "the start: use 'lds'")
        if task.n_train is not None and round(config.alpha * task.n_train) < 1:
            raise ValueError(f"lds-scratch: alpha = {config.alpha} keeps no point of {task.name}'s "
                             f"{task.n_train} training points")

    def compute(self, task: Task, data: TaskData, base: TrainedModel, *, progress: bool = True,
                executor: Executor | None = None) -> GroundTruth:
        cfg = self.config
        removed = plan_subsets(len(data.train), cfg.n_subsets, cfg.alpha, self.seed)
        losses, margins = subset_measurements(task, data, base, removed, cfg.seeds, progress=progress,
                                              executor=executor)
        diagnostics = {"seeds": float(cfg.seeds), "exact_retraining": 0.0, "from_scratch": 1.0,
                       "subset_models": float(cfg.seeds * cfg.n_subsets), "alpha": cfg.alpha}
        extra = {**pack_groups(removed), "margin_replicates": centred(margins)}
        return GroundTruth.from_seeds(self.name, np.array([], dtype=np.int64), centred(losses), diagnostics, extra)

    def predict(self, ev: Evaluation) -> np.ndarray:
        return predict_group_removals(ev, unpack_groups(ev.truth.extra))

    def add_columns(self, result: CellResult, predicted: np.ndarray, truth: GroundTruth, settings: Settings) -> None:
        margin = truth.extra["margin_replicates"].mean(0)
        result.add("lds_margin", metrics.rowwise("spearman", -predicted, margin))
        result.add("pearson", metrics.rowwise("pearson", predicted, truth.actual))

    def noise_ceiling(self, truth: GroundTruth, settings: Settings) -> dict[str, object]:
        found = super().noise_ceiling(truth, settings)
        margins = truth.extra.get("margin_replicates")
        if margins is not None and len(margins) >= 2:
            found["ceiling_lds_margin"] = float(np.nanmean(metrics.ceiling("spearman", margins)))
        return found

    def replicate_seeds(self, task: Task, seeds: int) -> list[int]:
        """Replicate seeds 1..K of base model 0 (:func:`subset_measurements`), whichever base model asks."""
        shared = copy.copy(task)
        shared.base_model = 0
        return [shared.replicate_seed(k + 1) for k in range(seeds)]

    def facts(self, truth: GroundTruth) -> list[Fact]:
        gt = truth.diagnostics
        m, seeds = truth.actual.shape[1], int(gt.get("seeds", 0))
        found = [fact("{} queries × {} subsets of α = {}, each trained from scratch with the task's full recipe "
                      "under {} seeds ({} models), averaged per subset", truth.actual.shape[0], m,
                      f"{gt.get('alpha', 0.5):g}", seeds, m * seeds),
                 fact("one ground truth shared by every base model (no retrain starts from θ̂)")]
        agreement = gt.get("seed_agreement_lds")
        if agreement is not None:
            found.append(fact("seed-vs-seed agreement r = {}", f"{agreement:.3f}"))
        margin = gt.get("ceiling_lds_margin")
        if margin is not None:
            found.append(fact("margin measurement's ceiling {} (column LDS (margin): predicted loss change "
                              "negated against the correct-class margin)", f"{margin:.3f}"))
        return found
