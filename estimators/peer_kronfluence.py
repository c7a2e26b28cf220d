"""Adapters that run kronfluence's influence through the Estimator interface (``ifbench[peers]``).

kronfluence's pairwise score is ``g_qᵀ P⁻¹ g_z`` with g the gradients of each example's loss (its task sums the
batch's per-example losses) and P its preconditioner: EK-FAC, K-FAC (Kronecker factors of the Fisher, per
Linear/Conv2d layer, plus ``damping_factor``) or the identity. Given ``damping_factor = l2`` (ifbench's
objective adds l2·I to the mean loss' curvature), ``scores = kronfluence / n`` for EK-FAC and K-FAC (the removal
convention of ifbench's ``ekfac`` / ``kfac``), and ``scores = kronfluence`` for the identity (ifbench's
``grad-dot``). Same sign: positive when z helped the query.

The Fisher is the *empirical* one (``use_empirical_fisher``: the observed labels). kronfluence's true Fisher
samples one label per example; ifbench's takes the exact expectation over the predictive distribution, so the
two compute the same quantity only for the empirical Fisher (ifbench's ``fisher = "empirical"``). Traps handled
here: kronfluence replaces the model's Linear/Conv2d *submodules*, so a model that is one Linear layer
(logistic regression) is wrapped in a Sequential; its factors and scores go to files, here a temporary folder.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from bench.registry import registered
from estimators.base import SINGLE, Estimator, FitContext, NotApplicable
from tasks.base import Split


def import_kronfluence() -> Any:
    try:
        import kronfluence.analyzer
        import kronfluence.arguments
        import kronfluence.task
    except ImportError as err:
        raise NotApplicable("kronfluence is not installed: pip install 'ifbench[peers]'") from err
    return kronfluence


def summed_loss_task(loss: Any) -> Any:
    """A kronfluence ``Task`` whose training loss and measurement are ``loss(model(x), y)`` summed over the batch."""
    kronfluence = import_kronfluence()

    class SummedLoss(kronfluence.task.Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            if sample:
                raise NotImplementedError("the ifbench adapters use the empirical Fisher (observed labels)")
            inputs, targets = batch
            return loss(model(inputs), targets).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return self.compute_train_loss(batch, model)

    return SummedLoss()


@dataclass(frozen=True)
class KronfluenceConfig:
    """``batch_size``: examples per kronfluence batch, for factors and for training gradients while scoring."""

    batch_size: int = 512


class KronfluenceInfluence(Estimator):
    """Shared: θ̂'s model prepared for kronfluence, its factors fitted on the training set, pairwise scoring."""

    Config: ClassVar[type] = KronfluenceConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    peer: ClassVar[str] = "kronfluence"
    strategy: ClassVar[str]
    per_removal: ClassVar[bool] = True  # scores / n (influence of removing z); False: the raw product

    def fit(self, ctx: FitContext) -> None:
        kronfluence = import_kronfluence()
        ctx.require_whole_model("kronfluence")
        self.ctx = ctx
        model = nn.Sequential(ctx.model_at()).eval()  # kronfluence tracks submodules only
        task = summed_loss_task(ctx.loss)
        self.folder = tempfile.TemporaryDirectory(prefix="ifbench-kronfluence-")
        self.analyzer = kronfluence.analyzer.Analyzer(
            "ifbench", kronfluence.analyzer.prepare_model(model, task), task, cpu=ctx.device.type == "cpu",
            disable_tqdm=True, output_dir=self.folder.name)
        wide = torch.float64  # ifbench accumulates its factors in float64
        self.factor_args = kronfluence.arguments.FactorArguments(
            strategy=self.strategy, use_empirical_fisher=True, covariance_max_examples=None, lambda_max_examples=None,
            activation_covariance_dtype=wide, gradient_covariance_dtype=wide, lambda_dtype=wide,
            per_sample_gradient_dtype=self.dtype())
        self.analyzer.fit_all_factors(self.strategy, self.dataset(ctx.train), per_device_batch_size=self.config.batch_size,
                                      factor_args=self.factor_args, overwrite_output_dir=True)

    def dtype(self) -> torch.dtype:
        return next(iter(self.ctx.params.values())).dtype

    @staticmethod
    def dataset(split: Split) -> TensorDataset:
        return TensorDataset(split.inputs, split.targets)

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        kronfluence = import_kronfluence()
        score_args = kronfluence.arguments.ScoreArguments(damping_factor=self.ctx.l2, score_dtype=self.dtype(),
                                                          precondition_dtype=self.dtype(), per_sample_gradient_dtype=self.dtype())
        self.analyzer.compute_pairwise_scores(
            "scores", self.strategy, self.dataset(queries), self.dataset(self.ctx.train.subset(train_idx)),
            per_device_query_batch_size=max(len(queries), 1), per_device_train_batch_size=self.config.batch_size,
            score_args=score_args, overwrite_output_dir=True)
        scores = self.analyzer.load_pairwise_scores("scores")["all_modules"]  # [Q, J]
        return (scores / self.ctx.n_train if self.per_removal else scores).float()


@registered("kronfluence-ekfac")
class KronfluenceEkfac(KronfluenceInfluence):
    """kronfluence's EK-FAC influence (empirical Fisher)."""

    strategy: ClassVar[str] = "ekfac"
    counterpart: ClassVar[str] = "ekfac"
    counterpart_options: ClassVar[dict[str, Any]] = {"fisher": "empirical"}


@registered("kronfluence-kfac")
class KronfluenceKfac(KronfluenceInfluence):
    """kronfluence's K-FAC influence (empirical Fisher)."""

    strategy: ClassVar[str] = "kfac"
    counterpart: ClassVar[str] = "kfac"
    counterpart_options: ClassVar[dict[str, Any]] = {"fisher": "empirical"}


@registered("kronfluence-identity")
class KronfluenceIdentity(KronfluenceInfluence):
    """kronfluence with the identity preconditioner: gradient dot products."""

    strategy: ClassVar[str] = "identity"
    counterpart: ClassVar[str] = "grad-dot"
    per_removal: ClassVar[bool] = False
