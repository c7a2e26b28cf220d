"""The Task contract shared by every benchmark task.

Objective convention (all tasks): training on the full set minimises
``J(θ) = (1/n) Σ_i w_i ℓ(z_i, θ) + (l2/2) ||θ||²`` with ``n`` the *full*
training-set size and ``w_i = 1``; removing a set of points sets their
``w_i = 0`` and keeps ``n`` (Koh & Liang's ε = −1/n up-weighting). So the
Hessian estimators must invert is ``H = (1/n) Σ ∇²ℓ_i + l2·I``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bench.seeding import derive_seed

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Split:
    """Aligned inputs ``[n, ...]`` and integer targets ``[n]``."""

    inputs: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"inputs ({len(self.inputs)}) and targets ({len(self.targets)}) differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, idx: Tensor | Sequence[int]) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.targets.device)
        return Split(self.inputs[idx], self.targets[idx])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.inputs.to(device), self.targets.to(device))

    def in_dtype(self, dtype: torch.dtype) -> Split:
        """Floating-point inputs cast to ``dtype`` (integer inputs, such as token ids, and targets unchanged)."""
        if not self.inputs.is_floating_point() or self.inputs.dtype == dtype:
            return self
        return Split(self.inputs.to(dtype), self.targets)


@dataclass(frozen=True)
class TaskData:
    """Train and test splits plus the seeded query set (indices into ``test``)."""

    train: Split
    test: Split
    query_idx: Tensor

    @property
    def queries(self) -> Split:
        return self.test.subset(self.query_idx)


@dataclass(frozen=True)
class Checkpoint:
    """Parameters saved during training and the learning rate in force there."""

    params: Params
    learning_rate: float
    step: int


@dataclass(frozen=True)
class SgdRun:
    """A deterministic SGD run to replay (MAGIC's metagradients): the start ``theta0 [P]`` (flat, in the
    order of the parameters it covers), each step's batch (indices into the training split) and learning rate,
    heavy-ball ``momentum`` and ``weight_decay`` coupled into the gradient, as ``torch.optim.SGD`` does
    (dampening 0, no Nesterov): v ← μ v + g + λθ, θ ← θ − η v, v₀ = 0."""

    theta0: Tensor
    batches: tuple[Tensor, ...]
    learning_rates: tuple[float, ...]
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if len(self.batches) != len(self.learning_rates):
            raise ValueError(f"SgdRun: {len(self.batches)} batches but {len(self.learning_rates)} learning rates")
        if not 0.0 <= self.momentum < 1.0 or self.weight_decay < 0.0:
            raise ValueError(f"SgdRun: momentum must be in [0, 1) and weight_decay ≥ 0, got {self.momentum}, "
                             f"{self.weight_decay}")

    @property
    def steps(self) -> int:
        return len(self.batches)


@dataclass(frozen=True)
class RecordedRun:
    """θ̂'s own training run, replayable: ``start`` holds the initial values of the parameters SGD updates
    (model order; the others stay at the model's values) and ``run`` is the run over their flat concatenation."""

    start: Params
    run: SgdRun


@dataclass
class TrainedModel:
    """Trained parameters θ̂, training checkpoints, and diagnostics (accuracy, ‖∇J‖)."""

    params: Params
    checkpoints: tuple[Checkpoint, ...] = ()
    diagnostics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadView:
    """The model seen from its head: ``features(inputs)`` is computed once (no gradient), and
    ``module`` with ``params`` maps features to outputs. Influence restricted to the head's
    parameters is identical on this view and on the whole model, and far cheaper."""

    module: nn.Module
    params: Params
    prefix: str
    features: Callable[[Tensor], Tensor]

    def split(self, split: Split, chunk: int = 512) -> Split:
        with torch.no_grad():
            parts = [self.features(split.inputs[i : i + chunk]) for i in range(0, len(split), chunk)]
        return Split(torch.cat(parts), split.targets)


class FeaturesOf(nn.Module):
    """Wraps a model so ``functional_call`` can run one of its feature methods with given parameters."""

    def __init__(self, model: nn.Module, method: str = "features"):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, inputs: Tensor) -> Tensor:
        return getattr(self.model, self.method)(inputs)


def head_view_of(model: nn.Module, params: Params, head: str) -> HeadView | None:
    """A HeadView for a model with a ``features(inputs)`` method feeding its submodule ``head``."""
    if not hasattr(model, "features"):
        return None
    wrapper = FeaturesOf(model)
    trunk = {f"model.{name}": value for name, value in params.items()}
    head_params = {k.removeprefix(f"{head}."): v for k, v in params.items() if k.startswith(f"{head}.")}
    return HeadView(model.get_submodule(head), head_params, head,
                    lambda inputs: functional_call(wrapper, trunk, (inputs,)))


def correct_class_margin(logits: Tensor, targets: Tensor) -> Tensor:
    """``[b]``: logit of the target class minus the logsumexp of the other classes' logits ``[b, C]``."""
    correct = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


RETRAIN_MODES = ("exact", "warm", "scratch")


@dataclass(frozen=True)
class RetrainSpec:
    """How to retrain: ``scratch`` (same recipe, seed and data order minus the removed
    points), ``warm`` (from θ̂ for ``steps`` SGD steps at ``lr_factor`` × the recipe's
    rate), or ``exact`` (convex tasks: to the unique optimum; seed and steps unused).

    ``snapshots`` (warm only): earlier step counts, increasing and below ``steps``, at which the run's
    parameters are kept too. A warm run has a constant rate and its batch order does not depend on its
    length, so the snapshot at s steps *is* the warm run of s steps (:meth:`at`): several retraining
    lengths cost one run of the longest."""

    mode: str = "exact"
    seed: int = 0
    steps: int = 0
    lr_factor: float = 0.1
    snapshots: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in RETRAIN_MODES:
            raise ValueError(f"unknown retrain mode {self.mode!r}. Valid modes: {', '.join(RETRAIN_MODES)}")
        if self.snapshots and (self.mode != "warm" or list(self.snapshots) != sorted(set(self.snapshots))
                               or not 0 < self.snapshots[0] <= self.snapshots[-1] < self.steps):
            raise ValueError(f"snapshots must be increasing step counts in 1..{self.steps - 1} of a warm retrain, "
                             f"got {self.snapshots} ({self.mode}, {self.steps} steps)")

    @property
    def lengths(self) -> tuple[int, ...]:
        """The step counts whose parameters the retrain yields: the snapshots, then ``steps``."""
        return (*self.snapshots, self.steps)

    def at(self, steps: int) -> RetrainSpec:
        """The same retrain stopped after ``steps`` (no snapshots)."""
        return RetrainSpec(self.mode, self.seed, steps, self.lr_factor)


EXACT = RetrainSpec()


@dataclass
class Retrained:
    """The parameters retrained without a set of points, with convergence diagnostics, and the parameters at
    the spec's ``snapshots`` (in order; empty where the task does not keep them)."""

    params: Params
    diagnostics: dict[str, float] = field(default_factory=dict)
    snapshots: tuple[Params, ...] = ()


def retrain_at_lengths(task: Task, data: TaskData, base: TrainedModel, removals: Sequence[Tensor],
                       spec: RetrainSpec) -> tuple[list[Retrained], list[list[Params]]]:
    """``task.retrain_without`` under ``spec``, and the parameters after each of ``spec.lengths``,
    ``[L][len(removals)]``: the retrains' snapshots, or, for a task that keeps none, the shorter retrains run
    on their own (the same parameters, at more cost)."""
    retrained = task.retrain_without(data, base, removals, spec)
    if all(len(r.snapshots) == len(spec.snapshots) for r in retrained):
        earlier = [[r.snapshots[i] for r in retrained] for i in range(len(spec.snapshots))]
    else:
        earlier = [[r.params for r in task.retrain_without(data, base, removals, spec.at(steps))] for steps in spec.snapshots]
    return retrained, [*earlier, [r.params for r in retrained]]


class Task(ABC):
    """A benchmark task. Subclasses set ``name``, ``Config``, ``presets`` and ``version``.

    ``version`` is part of every cache key: bump it when the data, model or
    training recipe change, so no stale cache is reused.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    presets: ClassVar[dict[str, Any]]
    version: ClassVar[str] = "1"
    #: Convex tasks retrain exactly (one unique optimum): no seeds, no noise ceiling.
    convex: ClassVar[bool] = False
    #: Parameters estimators restrict to by default (empty: all), e.g. the fine-tuned top layers.
    influence_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, *, seed: int, device: torch.device | str = "cpu", base_model: int = 0):
        """``seed`` decides the data (splits, queries); ``base_model`` picks which independently trained θ̂
        (0: the one trained from ``seed`` itself; others from seeds derived from it, on the same data)."""
        if base_model < 0:
            raise ValueError(f"base_model must be ≥ 0, got {base_model}")
        self.config = config
        self.seed = seed
        self.device = torch.device(device)
        self.base_model = base_model

    @property
    def training_seed(self) -> int:
        """The seed θ̂ is trained from: the task's own seed for base model 0, one derived from it otherwise."""
        return self.seed if self.base_model == 0 else derive_seed(self.seed, "base model", self.base_model)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a worker process) without what it caches (underscored: built model, factorisations)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    @abstractmethod
    def l2(self) -> float:
        """L2 coefficient of the training objective (see module docstring)."""

    @abstractmethod
    def load_data(self) -> TaskData:
        """Deterministic splits on ``self.device``."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The architecture on ``self.device`` (its parameter values are not used)."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example loss ``[b]`` from model outputs ``[b, ...]`` and targets ``[b]``."""

    @abstractmethod
    def train(self, data: TaskData, seed: int | None = None) -> TrainedModel:
        """Train on the whole training set (``seed`` None: :attr:`training_seed`, giving θ̂)."""

    @abstractmethod
    def retrain_without(self, data: TaskData, base: TrainedModel, removals: Sequence[Tensor],
                        spec: RetrainSpec = EXACT) -> list[Retrained]:
        """Retrain once per entry of ``removals`` (training indices to drop; may be empty: a control run)."""

    def replicate_seed(self, replicate: int) -> int:
        """Training seed of ground-truth replicate ``replicate`` (0: θ̂'s own, :attr:`training_seed`)."""
        return self.training_seed if replicate == 0 else derive_seed(self.training_seed, "replicate", replicate)

    def warm_order_seed(self, spec: RetrainSpec) -> int:
        """Batch-order seed of a warm retrain: from the replicate's seed, so the suite's ``--seed`` reaches it."""
        return derive_seed(self.replicate_seed(spec.seed), "warm")

    @property
    def retrain_batch(self) -> int:
        """Retrains :meth:`retrain_without` computes together (protocols hand it removals in lists this long)."""
        return 1

    def retrain_state(self, data: TaskData, base: TrainedModel, specs: Sequence[RetrainSpec]) -> Any:
        """What every retrain around ``base`` under ``specs`` shares and would otherwise compute for itself
        (e.g. a factorisation): computed once in the run's process and shipped with the retrain jobs, so worker
        processes adopt it (:meth:`adopt_retrain_state`) instead of computing it again for each ground truth.
        None: nothing to share."""
        return None

    def adopt_retrain_state(self, state: Any) -> None:
        """Use ``state`` (not None) from :meth:`retrain_state`: the same values this task would compute itself."""
        raise NotImplementedError(f"task {self.name} returns a retrain state but does not adopt one")

    def recorded_run(self, data: TaskData, base: TrainedModel | None = None,
                     spec: RetrainSpec | None = None) -> RecordedRun | None:
        """A replayable :class:`RecordedRun` (MAGIC, the deterministic track), or None for a task that is not
        trained by a recorded SGD run (a convex task is solved to its optimum). ``spec`` None or scratch:
        θ̂'s own training run; warm: the warm retrain's control run from ``base`` (``spec.steps`` steps at
        ``spec.lr_factor`` × the rate, its batch order)."""
        return None

    def replay_weighted(self, data: TaskData, weights: Tensor, base: TrainedModel | None = None,
                        spec: RetrainSpec | None = None) -> list[Params]:
        """The run :meth:`recorded_run` gives replayed once per row of data ``weights [M, n]``, each point's
        loss multiplied by its weight: the final parameters of each."""
        raise NotImplementedError(f"task {self.name} has no recorded SGD run to replay")

    def steps_per_epoch(self, n_kept: int) -> int:
        """SGD steps in one pass over ``n_kept`` points with the task's warm-retraining batch size."""
        raise NotImplementedError(f"task {self.name} has no SGD recipe for warm-started retraining")

    #: Feature spaces ``embed`` offers; a space ``s`` other than "penultimate" is the model's ``s_features``.
    embedding_spaces: ClassVar[tuple[str, ...]] = ("penultimate",)

    @torch.no_grad()
    def embed(self, params: Params, split: Split, space: str = "penultimate", chunk: int = 512) -> Tensor:
        """``[len(split), d]`` features for nearest-neighbour search and clustering. "penultimate" is the
        input of the model's last layer (its ``features`` method), or the flattened inputs for a linear model."""
        if space not in self.embedding_spaces:
            raise ValueError(f"unknown feature space {space!r} for task {self.name}. Valid: {', '.join(self.embedding_spaces)}")
        model = self.build_model()
        method = "features" if space == "penultimate" else f"{space}_features"
        if not hasattr(model, method):
            return split.inputs.flatten(1)
        wrapper, wrapped = FeaturesOf(model, method), {f"model.{k}": v for k, v in params.items()}
        parts = [functional_call(wrapper, wrapped, (split.inputs[i : i + chunk],)) for i in range(0, len(split), chunk)]
        return torch.cat(parts).flatten(1)

    def head_view(self, params: Params) -> HeadView | None:
        """Optional: the head that ``influence_parameters`` names, over frozen features (see HeadView)."""
        return None

    def exact_hessian(self, params: Params, data: TaskData) -> Tensor | None:
        """Optional fast path: the full Hessian ``[P, P]`` of J at ``params``, or None."""
        return None

    def per_example_loss(self, model: nn.Module, params: Params, split: Split) -> Tensor:
        """``ℓ(z, θ)`` for each example of ``split``: ``[len(split)]`` (no regulariser)."""
        return self.loss(functional_call(model, params, (split.inputs,)), split.targets)

    def per_example_measures(self, model: nn.Module, params: Params, split: Split) -> tuple[Tensor, Tensor]:
        """``(loss, margin)``, each ``[len(split)]``, from one forward pass. The margin is TRAK's model output
        for classification, ``log p_y − log(1 − p_y)`` = the correct-class logit minus the logsumexp of the
        others (it falls as the loss rises)."""
        outputs = functional_call(model, params, (split.inputs,))
        return self.loss(outputs, split.targets), correct_class_margin(outputs, split.targets)

    @torch.no_grad()
    def accuracy(self, model: nn.Module, params: Params, split: Split) -> float:
        logits = functional_call(model, params, (split.inputs,))
        return float((logits.argmax(-1) == split.targets).double().mean())
