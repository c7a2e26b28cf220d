"""Shared logic of the non-convex tasks trained by the SGD recipe (:mod:`tasks.sgd`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from bench.seeding import derive_seed
from tasks.base import EXACT, Params, Retrained, RetrainSpec, Task, TaskData, TrainedModel
from tasks.sgd import SgdRecipe, run_sgd, steps_per_epoch


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
        seed = self.seed if seed is None else seed
        params, checkpoints = run_sgd(self.build_model(), self.trainable(self.initial_params(seed)), data.train,
                                      self.loss, self.recipe, seed=derive_seed(seed, "order"))
        model = self.build_model()
        return TrainedModel(params, checkpoints, {
            "train_accuracy": self.accuracy(model, params, data.train),
            "test_accuracy": self.accuracy(model, params, data.test),
        })

    def retrain_without(self, data: TaskData, base: TrainedModel, removals: Sequence[Tensor],
                        spec: RetrainSpec = EXACT) -> list[Retrained]:
        results = []
        for removed in removals:
            exclude = torch.as_tensor(removed, dtype=torch.long)
            if spec.mode == "warm":
                params, _ = run_sgd(self.build_model(), base.params, data.train, self.loss, self.recipe,
                                    seed=self.warm_order_seed(spec), exclude=exclude, max_steps=spec.steps,
                                    constant_lr=spec.lr_factor * self.recipe.lr)
            else:  # scratch (and "exact", which a non-convex task can only approximate this way)
                seed = self.replicate_seed(spec.seed)
                params, _ = run_sgd(self.build_model(), self.trainable(self.initial_params(seed)), data.train, self.loss,
                                    self.recipe, seed=derive_seed(seed, "order"), exclude=exclude)
            results.append(Retrained(params, {"steps": float(spec.steps)}))
        return results
