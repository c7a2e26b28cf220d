"""MAGIC (Ilyas & Engstrom, 2025): exact metagradients of θ̂'s own training run as attribution scores.

For each query, ∂ loss(θ_T, z_q) / ∂ w_i for every training point's data weight, by reverse-mode
differentiation through the recorded SGD run (:mod:`estimators.metagradient`); the score of removing z_i
(w_i: 1 → 0) is the first-order change −∂f/∂w_i (positive: the point helped the query). The estimator
replays θ̂'s run, so it predicts that run's response to data weights, not a retrain under other seeds: it
declares only the ``replay`` capability and runs on the deterministic track alone (``lds-replay``,
``loo-replay``); on seed-averaged protocols it is not applicable. Its cost is in ``score`` (one reverse pass
over the whole run per set of queries, all queries at once); the result is kept for later score calls on the
same queries.
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
        recorded: RecordedRun | None = ctx.recorded_run() if ctx.recorded_run is not None else None
        if recorded is None:
            raise NotApplicable("magic differentiates θ̂'s recorded SGD run; this task has none (a convex task is "
                                "solved to its optimum, not trained by a recorded run)")
        self._run, self._train = recorded.run, ctx.train
        self._flat = FlatLoss.of(ctx.model, recorded.start, ctx.loss, tuple(recorded.start))
        self._base = torch.cat([ctx.params[name].reshape(-1) for name in recorded.start])
        self._scores: dict[str, Tensor] = {}
        self._replay_error = float("nan")

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        key = _digest(queries)
        if key not in self._scores:
            gradient, theta_end = metagradient_and_end(self._flat, self._train, self._run, queries,
                                                       checkpoint_every=self.config.checkpoint_every)
            self._scores[key] = (-gradient).float()
            self._replay_error = float((theta_end - self._base).norm() / self._base.norm())
        return self._scores[key][:, train_idx.to(self._scores[key].device)]

    def diagnostics(self) -> dict[str, float]:
        if not hasattr(self, "_flat"):
            return {}
        return {"n_parameters": float(self._flat.size), "steps": float(self._run.steps),
                "checkpoint_every": float(self.config.checkpoint_every),
                "replay_vs_base_relative": self._replay_error}


def _digest(split: Split) -> str:
    """A key for a query split's contents (inputs and targets)."""
    digest = hashlib.sha256()
    for tensor in (split.inputs, split.targets):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
