"""MAGIC (Ilyas & Engstrom, 2025): exact metagradients of θ̂'s own training run as attribution scores.

For each query, ∂ loss(θ_T, z_q) / ∂ w_i for every training point's data weight, by reverse-mode
differentiation through the recorded SGD run (:mod:`estimators.metagradient`); the score of removing z_i
(w_i: 1 → 0) is the first-order change −∂f/∂w_i (positive: the point helped the query). The estimator
replays θ̂'s run, so it predicts that run's response to data weights, not a retrain under other seeds: it
declares only the ``replay`` capability and runs on the deterministic track alone (``lds-replay``,
``loo-replay``); on seed-averaged protocols it is not applicable. Its cost is in ``score`` (one reverse pass
over the whole run per set of queries, all queries at once); the result is kept for later score calls on the
same run and queries. The protocol hands the run it replays (:meth:`Estimator.score_replay`): θ̂'s own run
from scratch, or the warm run from θ̂ the warm replay protocols use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from bench.registry import registered
from estimators.autodiff import FlatLoss
from estimators.base import REPLAY, Estimator, FitContext, NotApplicable
from estimators.metagradient import metagradient_and_end
from estimators.options import at_least
from tasks.base import RecordedRun, Split


@dataclass(frozen=True)
class MagicConfig:
    """``checkpoint_every``: the replay keeps (θ, v) every k steps (memory O(P·T/k + P·k) per query)."""

    checkpoint_every: int = 32

    def __post_init__(self) -> None:
        at_least(1, checkpoint_every=self.checkpoint_every)


@registered("magic")
class Magic(Estimator):
    """Exact metagradients through θ̂'s recorded run (deterministic track only)."""

    Config: ClassVar[type] = MagicConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({REPLAY})
    version: ClassVar[str] = "1"

    def fit(self, ctx: FitContext) -> None:
        own: RecordedRun | None = ctx.recorded_run() if ctx.recorded_run is not None else None
        if own is None:
            raise NotApplicable("magic differentiates θ̂'s recorded SGD run; this task has none (a convex task is "
                                "solved to its optimum, not trained by a recorded run)")
        self._own, self._ctx = own, ctx
        self._scores: dict[tuple[str, str], Tensor] = {}
        self._last: dict[str, float] = {}

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        """Scores for θ̂'s own recorded run (see :meth:`score_replay`)."""
        return self.score_replay(queries, train_idx, self._own)

    def score_replay(self, queries: Split, train_idx: Tensor, recorded: RecordedRun) -> Tensor:
        """``[Q, len(train_idx)]`` = −∂ loss(θ_T, z_q) / ∂ w_i through ``recorded``; one reverse pass per run and
        query set, kept for later calls."""
        key = (_digest_run(recorded), _digest(queries))
        if key not in self._scores:
            flat = FlatLoss.of(self._ctx.model, recorded.start, self._ctx.loss, tuple(recorded.start))
            gradient, theta_end = metagradient_and_end(flat, self._ctx.train, recorded.run, queries,
                                                       checkpoint_every=self.config.checkpoint_every)
            self._scores[key] = (-gradient).float()
            self._last = {"n_parameters": float(flat.size), "steps": float(recorded.run.steps)}
            if recorded is self._own:  # the functional replay's distance from θ̂, which the same run trained
                base = torch.cat([self._ctx.params[name].reshape(-1) for name in recorded.start])
                self._last["replay_vs_base_relative"] = float((theta_end - base).norm() / base.norm())
        return self._scores[key][:, train_idx.to(self._scores[key].device)]

    def diagnostics(self) -> dict[str, float]:
        if not hasattr(self, "_own"):
            return {}
        return {**self._last, "checkpoint_every": float(self.config.checkpoint_every)}


def _digest_run(recorded: RecordedRun) -> str:
    """A key for a recorded run: its start, rates and batch order."""
    digest = hashlib.sha256(recorded.run.theta0.detach().cpu().contiguous().numpy().tobytes())
    digest.update(torch.tensor(recorded.run.learning_rates, dtype=torch.float64).numpy().tobytes())
    digest.update(torch.cat(list(recorded.run.batches)).cpu().numpy().tobytes())
    return digest.hexdigest()


def _digest(split: Split) -> str:
    """A key for a query split's contents (inputs and targets)."""
    digest = hashlib.sha256()
    for tensor in (split.inputs, split.targets):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
