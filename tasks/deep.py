"""Shared logic of the non-convex tasks trained by the SGD recipe (:mod:`tasks.sgd`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from bench.seeding import derive_seed
from tasks.base import EXACT, Params, RecordedRun, Retrained, RetrainSpec, Task, TaskData, TrainedModel
from tasks.sgd import (
    SgdRecipe,
    Snapshots,
    StackedForward,
    recorded_run,
    run_sgd,
    run_sgd_stacked,
    steps_per_epoch,
    vmapped_forward,
)


class SgdTask(Task):
    """Subclasses provide data, ``make_model()`` and ``recipe``; this class trains and retrains.

    ``make_model()`` builds the architecture; the initial parameter values come
    from a seeded RNG, so the same seed gives bit-identical training (CPU, fixed
    thread count).
    """

    dtype: ClassVar[torch.dtype] = torch.float32

    @property
    def recipe(self) -> SgdRecipe:
        """Task configs extend :class:`SgdRecipe`: the config is the recipe."""
        return self.config

    @property
    def l2(self) -> float:
        return self.recipe.l2

    @property
    def retrain_batch(self) -> int:
        return self.recipe.retrain_batch

    def steps_per_epoch(self, n_kept: int) -> int:
        return steps_per_epoch(n_kept, self.recipe.batch_size)

    def make_model(self) -> nn.Module:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        if not hasattr(self, "_model"):
            self._model = self.make_model().to(self.device).eval()
        return self._model

    def initial_params(self, seed: int) -> Params:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "init"))
            model = self.make_model()
        return {k: v.detach().to(self.device) for k, v in model.named_parameters()}

    def trainable(self, params: Params) -> Params:
        """The parameters SGD updates (all by default; frozen ones stay in the model)."""
        return params

    def train(self, data: TaskData, seed: int | None = None) -> TrainedModel:
        seed = self.training_seed if seed is None else seed
        params, checkpoints = run_sgd(self.build_model(), self.trainable(self.initial_params(seed)), data.train,
                                      self.loss, self.recipe, seed=derive_seed(seed, "order"))
        model = self.build_model()
        return TrainedModel(params, checkpoints, {
            "train_accuracy": self.accuracy(model, params, data.train),
            "test_accuracy": self.accuracy(model, params, data.test),
        })

    def _replayed(self, base: TrainedModel | None, spec: RetrainSpec | None) -> tuple[Params, int, int | None,
                                                                                     float | None]:
        """``(start, order seed, max_steps, constant_lr)`` of θ̂'s own run, or of the warm run ``spec`` names."""
        if spec is not None and spec.mode == "warm":
            if base is None:
                raise ValueError("a warm replay starts from θ̂: pass the base model")
            return dict(base.params), self.warm_order_seed(spec), spec.steps, spec.lr_factor * self.recipe.lr
        return self.trainable(self.initial_params(self.training_seed)), derive_seed(self.training_seed, "order"), \
            None, None

    def recorded_run(self, data: TaskData, base: TrainedModel | None = None,
                     spec: RetrainSpec | None = None) -> RecordedRun:
        """θ̂'s run as :meth:`train` makes it (its seed's initialisation and batch order, the recipe's rates),
        or the warm control run from θ̂ that ``spec`` names."""
        start, seed, max_steps, lr = self._replayed(base, spec)
        theta0 = torch.cat([value.reshape(-1) for value in start.values()])
        return RecordedRun(start, recorded_run(self.recipe, theta0, len(data.train), seed=seed, max_steps=max_steps,
                                               constant_lr=lr))

    def replay_weighted(self, data: TaskData, weights: Tensor, base: TrainedModel | None = None,
                        spec: RetrainSpec | None = None) -> list[Params]:
        """Rows of ``weights [M, n]`` trained ``retrain_batch`` at a time as one stacked model; every member
        sees the run's batches (nothing is excluded, a weight of 0 silences a point)."""
        start, seed, max_steps, lr = self._replayed(base, spec)
        forward, found = self.stacked_forward(), []
        for first in range(0, len(weights), self.retrain_batch):
            rows = weights[first : first + self.retrain_batch].to(data.train.targets.device, self.dtype)
            empty = [torch.tensor([], dtype=torch.long)] * len(rows)
            found += run_sgd_stacked(forward, start, data.train, self.loss, self.recipe, seed=seed, excludes=empty,
                                     weights=rows, max_steps=max_steps, constant_lr=lr)
        return found

    def stacked_forward(self) -> StackedForward:
        """How M models run at once (see :func:`tasks.sgd.run_sgd_stacked`): the model's own
        ``forward_stacked(params, inputs)`` where it has one, else ``vmap`` over its forward."""
        model = self.build_model()
        return model.forward_stacked if hasattr(model, "forward_stacked") else vmapped_forward(model)

    def retrain_without(self, data: TaskData, base: TrainedModel, removals: Sequence[Tensor],
                        spec: RetrainSpec = EXACT) -> list[Retrained]:
        """One retrain per removal; with ``retrain_batch`` > 1, up to that many train together as one stacked
        model (removals of equal size, in order), the others alone."""
        excludes = [torch.as_tensor(removed, dtype=torch.long) for removed in removals]
        if spec.mode == "warm":
            start, seed = base.params, self.warm_order_seed(spec)
            max_steps, lr = spec.steps, spec.lr_factor * self.recipe.lr
        else:  # scratch (and "exact", which a non-convex task can only approximate this way)
            replicate = self.replicate_seed(spec.seed)
            start, seed = self.trainable(self.initial_params(replicate)), derive_seed(replicate, "order")
            max_steps, lr = None, None
        if self.retrain_batch == 1:
            lone = []
            for exclude in excludes:
                kept = Snapshots(spec.snapshots)
                params, _ = run_sgd(self.build_model(), start, data.train, self.loss, self.recipe, seed=seed,
                                    exclude=exclude, max_steps=max_steps, constant_lr=lr, after_step=kept)
                lone.append(Retrained(params, {"steps": float(spec.steps)}, kept.ordered()))
            return lone
        results: dict[int, Retrained] = {}
        by_size: dict[int, list[int]] = {}
        for i, exclude in enumerate(excludes):
            by_size.setdefault(len(exclude), []).append(i)
        forward = self.stacked_forward()
        for members in by_size.values():
            for first in range(0, len(members), self.retrain_batch):
                stack = members[first : first + self.retrain_batch]
                kept = Snapshots(spec.snapshots)
                trained = run_sgd_stacked(forward, start, data.train, self.loss, self.recipe, seed=seed,
                                          excludes=[excludes[i] for i in stack], max_steps=max_steps, constant_lr=lr,
                                          after_step=kept)
                results.update({i: Retrained(params, {"steps": float(spec.steps)}, snapshots)
                                for i, params, snapshots in zip(stack, trained, kept.members(len(stack)), strict=True)})
        return [results[i] for i in range(len(excludes))]
