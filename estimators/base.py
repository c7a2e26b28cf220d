"""The Estimator protocol.

Score convention (every estimator, every protocol): ``score`` returns a float32
matrix ``scores[n_query, n_cols]`` whose entry (q, j) predicts the change in the
query's loss when training point ``train_idx[j]`` is **removed** and the model
retrained::

    scores[q, j] ≈ loss(θ₋z, z_q) − loss(θ̂, z_q)

Positive means the point helped the query (removing it raises the loss).
Ground truth measures exactly this quantity, so no metric flips a sign.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench.config import EmptyConfig
from estimators.autodiff import FlatLoss
from tasks.base import Checkpoint, HeadView, Params, RecordedRun, Split

#: Capabilities an estimator may declare; the runner asks only for what is declared.
SINGLE = "single"  # per-point scores (this protocol)
GROUP = "group"  # scores for removing a whole group
PARAMETER_UPDATE = "parameter-update"  # Δθ for removing / relabelling a set
SELF_INFLUENCE = "self-influence"  # influence of a point on itself
#: scores that predict θ̂'s own recorded run replayed with data weights (the deterministic track), not a retrain
#: under other seeds: an estimator that declares only this runs on replay protocols alone
REPLAY = "replay"


def load_into(module: nn.Module, params: Params) -> nn.Module:
    """Copy ``params`` into ``module``'s parameters of the same names, in place; returns ``module``."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(params[name])
    return module


@dataclass(frozen=True)
class FitContext:
    """Everything an estimator may use, on one device and in the task's dtype.

    ``loss(outputs, targets)`` is per-example ``[b]``; the training objective is
    ``(1/n) Σ ℓ_i + (l2/2)||θ||²`` with ``n = len(train)``, so its Hessian is
    ``(1/n) Σ ∇²ℓ_i + l2·I``. ``exact_hessian`` is a task's fast path for that
    Hessian ``[P, P]`` (parameters flattened in ``params`` order), or None.
    """

    model: nn.Module
    params: Params
    loss: Callable[[Tensor, Tensor], Tensor]
    l2: float
    train: Split
    seed: int
    checkpoints: tuple[Checkpoint, ...] = ()
    exact_hessian: Callable[[], Tensor] | None = None
    #: The task's suggested parameter subset (e.g. the top layers); empty means all.
    default_parameters: tuple[str, ...] = ()
    #: ``embed(split, space)`` → ``[len(split), d]`` features of a split *as this estimator is given it*
    #: (for kNN preselection); ``space`` is one of ``embedding_spaces``.
    embed: Callable[[Split, str], Tensor] | None = None
    embedding_spaces: tuple[str, ...] = ()
    #: The task's head view at other parameters (e.g. a checkpoint's), or None where there is none.
    head_view_at: Callable[[Params], HeadView | None] | None = None
    #: θ̂'s training run as the task records it (``task.recorded_run``), or None: the task has none, or the
    #: estimator was given a head view (a replay needs the whole trained model).
    recorded_run: Callable[[], RecordedRun | None] | None = None
    #: ``train_independent(m)`` (m ≥ 1) → the parameters of a model trained by θ̂'s recipe on the same training data
    #: from the m-th seed derived from θ̂'s (an ensemble member, trained anew at each call: its cost is the fit's),
    #: or None where the context cannot train (a head view, a changed dtype).
    train_independent: Callable[[int], Params] | None = None

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def require_whole_model(self, library: str) -> None:
        """Refuse (not applicable) where the task's estimators work on a parameter subset: a library that
        attributes a whole module runs where that subset is the module (logistic regression, a head view)."""
        if self.default_parameters:
            raise NotApplicable(f"{library} attributes a whole model; this task's estimators work on "
                                f"{list(self.default_parameters)} (run on its head view)")

    def model_at(self) -> nn.Module:
        """A copy of the model holding θ̂ (for libraries that take a module, not parameters)."""
        return load_into(copy.deepcopy(self.model), self.params)

    def in_dtype(self, dtype: torch.dtype) -> FitContext:
        """This context with the model, θ̂ and the training inputs in ``dtype`` (itself where they already are).
        Checkpoints, the exact Hessian, head views and independent training stay in the task's dtype: dropped here."""
        if all(p.dtype == dtype for p in self.params.values() if p.is_floating_point()):
            return self
        params = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.params.items()}
        return dataclasses.replace(self, model=copy.deepcopy(self.model).to(dtype), params=params,
                                   train=self.train.in_dtype(dtype), checkpoints=(), exact_hessian=None,
                                   head_view_at=None, train_independent=None)

    def in_precision(self, name: str) -> FitContext:
        """:meth:`in_dtype` by a dtype's name (``"float32"``, ``"float64"``); ``""`` keeps the task's precision."""
        return self.in_dtype(getattr(torch, name)) if name else self

    def flat_at(self, params: Params, names: tuple[str, ...], function: Callable[[Tensor, Tensor], Tensor] | None = None
                ) -> tuple[FlatLoss, Callable[[Split], Split]]:
        """``function`` (default: the loss; per-example ``[b]`` from outputs and targets) at ``params`` as a
        function of the flat ``names`` parameters, and how a split is fed to it: through the task's head view
        at ``params`` when ``names`` are exactly the head (the same values, the trunk run once per split)."""
        function = self.loss if function is None else function
        view = self.head_view_at(params) if self.head_view_at is not None else None
        if view is not None and names == (view.prefix,):
            return FlatLoss.of(view.module, view.params, function), view.split
        return FlatLoss.of(self.model, params, function, names or None), _unchanged


def _unchanged(split: Split) -> Split:
    return split


class NotApplicable(Exception):
    """Raised by ``fit`` when an estimator cannot run on this task (recorded as not applicable)."""


class OverLimit(NotApplicable):
    """Raised by ``fit`` when the method applies but a configured limit refuses the run (``limit`` names the
    option and its value, e.g. ``"max_parameters = 500,000"``): recorded as *over a limit*, not as a method
    that does not provide what the protocol needs."""

    def __init__(self, message: str, *, limit: str):
        super().__init__(message)
        self.limit = limit


class Estimator(ABC):
    """Base class of influence estimators. Subclasses are marked with ``@registered("name")``."""

    name: ClassVar[str]
    Config: ClassVar[type] = EmptyConfig
    capabilities: ClassVar[frozenset[str]] = frozenset({SINGLE})
    #: Baselines (random, ...) are not expected to agree with ground truth.
    is_baseline: ClassVar[bool] = False
    #: Part of every cell's key: bump it when the estimator's scores change, so finished cells are re-run.
    #: (A plug-in's cells are also keyed by a hash of the file that defines it.)
    version: ClassVar[str] = "1"
    #: Options ``check-estimator`` uses on its 15-parameter toy problem when given none (a setting sized for
    #: real models may not mean anything there: 5% of 15 parameters is one).
    check_options: ClassVar[dict[str, Any]] = {}
    #: For an adapter that runs another library's implementation (``ifbench[peers]``): that library's
    #: distribution name; "" for ifbench's own. Peers run only when named (never through ``"all"``).
    peer: ClassVar[str] = ""
    #: For a peer adapter: the registered ifbench estimator that computes the same scores, with these options.
    counterpart: ClassVar[str] = ""
    counterpart_options: ClassVar[dict[str, Any]] = {}
    #: True if the estimator only needs θ̂ (no checkpoints) and may run on the task's head view when it is
    #: restricted to the head's parameters: the frozen trunk's features are computed once per model, and
    #: ``ctx.model`` is the head alone (influence on the head's parameters is the same, and far cheaper).
    uses_head_view: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def runs_on_head_view(cls, config: Any) -> bool:
        """Whether the runner may hand this estimator (with ``config``) the task's head view."""
        return cls.uses_head_view and not getattr(config, "parameters", ())

    @abstractmethod
    def fit(self, ctx: FitContext) -> None:
        """Precompute whatever does not depend on the queries."""

    def score(self, queries: Split, train_idx: Tensor) -> Tensor:
        """SINGLE (the default capability): ``[len(queries), len(train_idx)]`` float32 predicted removal
        effects (see module docstring). Every estimator that declares SINGLE implements it."""
        raise NotImplementedError(f"{self.name} does not provide single-point scores")

    def score_replay(self, queries: Split, train_idx: Tensor, recorded: RecordedRun) -> Tensor:
        """REPLAY: like :meth:`score`, ``[len(queries), len(train_idx)]`` float32, but predicting the
        ``recorded`` run replayed with the points' weights at 0 (the deterministic track hands the run it
        replays: θ̂'s own, or a warm run from θ̂)."""
        raise NotImplementedError(f"{self.name} does not replay training runs")

    def score_groups(self, queries: Split, groups: Sequence[Tensor]) -> Tensor:
        """GROUP: ``[len(queries), len(groups)]`` predicted change in query loss when each whole group
        (a tensor of training indices) is removed together. Declared with ``GROUP`` in ``capabilities``."""
        raise NotImplementedError(f"{self.name} does not provide group scores")

    def update(self, removed: Tensor, new_targets: Tensor | None = None) -> Params:
        """PARAMETER_UPDATE: predicted ``θ_new − θ̂`` for the parameters the estimator works on, when the
        training points ``removed`` are dropped, or (``new_targets`` given, aligned) relabelled."""
        raise NotImplementedError(f"{self.name} does not provide parameter updates")

    def self_influence(self, train_idx: Tensor) -> Tensor:
        """SELF_INFLUENCE: ``[len(train_idx)]`` predicted rise of each point's own loss when it is removed."""
        raise NotImplementedError(f"{self.name} does not provide self-influence")

    def diagnostics(self) -> dict[str, float]:
        """Numbers worth recording with the result (iterations, residuals, chosen scales). The key
        ``"n_parameters"`` (how many of the model's parameters the estimator works on) fills the
        leaderboard's *params* column."""
        return {}
