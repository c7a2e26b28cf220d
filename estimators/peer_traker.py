"""An adapter that runs the TRAK authors' library (traker) through the Estimator interface (``ifbench[peers]``).

traker's image-classification task scores the margin ``logit_y − logsumexp_{k≠y} logit_k`` through the
after-kernel, weighted by the training points' ``1 − p_z``, as ifbench's ``trak`` does. Its conventions, undone
here so that its scores follow ``trak`` with ``projection_dim = 0`` (one model, no projection):

- gradients are divided by √P before the kernel, so its ``lambda_reg = n·l2/P`` is ifbench's ridge n·l2;
- it divides ``(ΦᵀΦ + λI)⁻¹`` by that matrix's mean absolute entry (a float16 safeguard), so the scores are
  multiplied back by the same number, recomputed from the gradients traker stored;
- its score is the margin's change τ; ``scores = (1 − p_q)·τ`` is the query loss' (ifbench's sign and units).

traker writes its features and scores to memory-mapped files (a temporary folder here: fresh, yet opened with
``load_from_save_dir=True``, without which traker never creates the experiments file scoring needs), and computes
in float32 (``use_half_precision=False``; the default, float16, would round every feature).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from bench.registry import registered
from estimators.base import SINGLE, Estimator, FitContext, NotApplicable
from estimators.trak import label_probability
from tasks.base import Split


def import_traker() -> Any:
    try:
        import trak
        import trak.projectors
    except ImportError as err:
        raise NotApplicable("traker is not installed: pip install 'ifbench[peers]'") from err
    return trak


@dataclass(frozen=True)
class TrakerConfig:
    """``batch_size``: training examples per ``featurize`` call."""

    batch_size: int = 512


@registered("traker-trak")
class TrakerTrak(Estimator):
    """traker's TRAKer on θ̂ alone, without projection (a NoOpProjector)."""

    Config: ClassVar[type] = TrakerConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    peer: ClassVar[str] = "traker"
    counterpart: ClassVar[str] = "trak"
    counterpart_options: ClassVar[dict[str, Any]] = {"projection_dim": 0}

    def fit(self, ctx: FitContext) -> None:
        trak = import_traker()
        ctx.require_whole_model("traker")
        if ctx.train.targets.dtype != torch.long:
            raise NotApplicable("traker's image-classification margin needs class labels")
        self.ctx, self.scored = ctx, 0
        self.checkpoint = {name: value.detach().clone() for name, value in ctx.params.items()}
        size = sum(v.numel() for v in ctx.params.values())
        self.folder = tempfile.TemporaryDirectory(prefix="ifbench-traker-")
        device = str(ctx.device)
        self.traker = trak.TRAKer(
            model=ctx.model, task="image_classification", train_set_size=ctx.n_train, save_dir=self.folder.name,
            load_from_save_dir=True, device=device, proj_dim=size, logging_level=logging.WARNING,
            projector=trak.projectors.NoOpProjector(grad_dim=size, proj_dim=size, device=device),
            use_half_precision=False, lambda_reg=ctx.n_train * ctx.l2 / size)
        self.traker.load_checkpoint(self.checkpoint, model_id=0)
        for start in range(0, ctx.n_train, self.config.batch_size):
            batch = (ctx.train.inputs[start : start + self.config.batch_size],
                     ctx.train.targets[start : start + self.config.batch_size])
            self.traker.featurize(batch=batch, num_samples=len(batch[0]))
        self.traker.finalize_features()
        self.inverse_scale = self._inverse_scale()

    def _inverse_scale(self) -> float:
        """The mean absolute entry of traker's ``(ΦᵀΦ + λI)⁻¹``, by which it divided that matrix."""
        score_computer = self.traker.score_computer
        grads = torch.as_tensor(np.asarray(self.traker.saver.current_store["grads"]))
        xtx = score_computer.get_xtx(grads)
        regularised = xtx + score_computer.lambda_reg * torch.eye(len(xtx), dtype=xtx.dtype)
        return float(torch.linalg.inv(regularised.float()).abs().mean())

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        self.scored += 1
        experiment = f"queries-{self.scored}"
        self.traker.start_scoring_checkpoint(exp_name=experiment, checkpoint=self.checkpoint, model_id=0,
                                             num_targets=len(queries))
        self.traker.score(batch=(queries.inputs, queries.targets), num_samples=len(queries))
        tau = torch.as_tensor(np.asarray(self.traker.finalize_scores(exp_name=experiment))).T  # [Q, n]
        with torch.no_grad():
            outputs = functional_call(self.ctx.model, self.ctx.params, (queries.inputs,))
            loss_slope = 1.0 - label_probability(outputs, queries.targets).double()
        return (loss_slope[:, None] * tau[:, train_idx].double() * self.inverse_scale).float()
