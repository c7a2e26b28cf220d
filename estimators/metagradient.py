"""Exact metagradients of a replayed SGD run with respect to the training points' weights (MAGIC's core).

Ilyas & Engstrom (2025, "MAGIC") fix a training run (initialisation and batch order) and differentiate a
query's measurement through every optimiser step. For the run

    g_t = (1/|B_t|) Σ_{i∈B_t} w_i ∇ℓ_i(θ_t) + λ θ_t,   v_{t+1} = μ v_t + g_t,   θ_{t+1} = θ_t − η_t v_{t+1}

(data weights ``w`` = 1 as trained; momentum μ; weight decay λ coupled into the gradient; v_0 = 0), the
reverse pass carries the adjoints of θ and of the momentum buffer backwards:

    ṽ_{t+1} = μ ṽ_{t+2} − η_t θ̄_{t+1},   ∂f/∂w_i += (1/|B_t|) ∇ℓ_i(θ_t)·ṽ_{t+1} (i ∈ B_t),
    θ̄_t = θ̄_{t+1} + H_t ṽ_{t+1}    (H_t: the step's weighted batch Hessian plus λI)

with θ̄_T = ∇f(θ_T) and ṽ_{T+1} = 0. The forward states are replayed from ``(θ, v)`` kept every
``checkpoint_every`` steps, so memory is O(P·T/k + P·k) per query. Every query is carried at once
(a ``[Q, P]`` adjoint; HVPs and gradient products vmapped with ``torch.func``).

Sign: removing point i sets w_i from 1 to 0, so a first-order prediction of the change in query loss is
``−∂f/∂w_i``; :func:`removal_scores` returns that (ifbench's convention: positive = the point helped).
The deep tasks' recipe gives its run as an :class:`SgdRun` (``Task.recorded_run``); the ``magic`` estimator
(:mod:`estimators.magic`) scores the deterministic track's protocols with it (:mod:`bench.groundtruth.replay`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from estimators.autodiff import FlatLoss, per_example_grads
from tasks.base import SgdRun, Split


def _step_gradient(flat: FlatLoss, train: Split, run: SgdRun, weights: Tensor, t: int, theta: Tensor) -> Tensor:
    """g_t at ``theta``: the weighted mean loss gradient of batch t plus λθ, ``[P]``."""
    idx = run.batches[t]
    inputs, targets, w = train.inputs[idx], train.targets[idx], weights[idx]
    loss = lambda th: (w * flat.batch_losses(th, inputs, targets)).sum() / len(idx)  # noqa: E731
    return grad(loss)(theta) + run.weight_decay * theta


def replay(flat: FlatLoss, train: Split, run: SgdRun, weights: Tensor | None = None, *,
           keep_every: int = 0) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """Run the recipe with data ``weights [n]`` (default 1): θ_T ``[P]`` and ``{t: (θ_t, v_t)}`` every
    ``keep_every`` steps (none at 0)."""
    weights = torch.ones(len(train), dtype=run.theta0.dtype) if weights is None else weights
    theta, velocity, kept = run.theta0.clone(), torch.zeros_like(run.theta0), {}
    for t in range(run.steps):
        if keep_every and t % keep_every == 0:
            kept[t] = (theta, velocity)
        theta, velocity = _sgd_step(flat, train, run, weights, t, theta, velocity)
    return theta, kept


def _sgd_step(flat: FlatLoss, train: Split, run: SgdRun, weights: Tensor, t: int, theta: Tensor,
              velocity: Tensor) -> tuple[Tensor, Tensor]:
    """Step t of the run: ``(θ_{t+1}, v_{t+1})`` from ``(θ_t, v_t)``."""
    velocity = run.momentum * velocity + _step_gradient(flat, train, run, weights, t, theta)
    return theta - run.learning_rates[t] * velocity, velocity


def _batch_hvp(flat: FlatLoss, train: Split, run: SgdRun, weights: Tensor, t: int, theta: Tensor,
               vectors: Tensor) -> Tensor:
    """``[Q, P]`` rows times H_t = ∇_θ g_t at ``theta`` (symmetric), forward-over-reverse."""
    step_gradient = lambda th: _step_gradient(flat, train, run, weights, t, th)  # noqa: E731
    return vmap(lambda v: jvp(step_gradient, (theta,), (v,))[1])(vectors)


def metagradient(flat: FlatLoss, train: Split, run: SgdRun, queries: Split, *, weights: Tensor | None = None,
                 checkpoint_every: int = 16) -> Tensor:
    """∂ loss(θ_T, z_q) / ∂ w_i for every query and training point: ``[Q, n]`` (exact up to floating point)."""
    return metagradient_and_end(flat, train, run, queries, weights=weights, checkpoint_every=checkpoint_every)[0]


def metagradient_and_end(flat: FlatLoss, train: Split, run: SgdRun, queries: Split, *, weights: Tensor | None = None,
                         checkpoint_every: int = 16) -> tuple[Tensor, Tensor]:
    """:func:`metagradient` ``[Q, n]`` and the replayed run's final parameters θ_T ``[P]``."""
    if checkpoint_every < 1:
        raise ValueError(f"metagradient: checkpoint_every must be ≥ 1, got {checkpoint_every}")
    weights = torch.ones(len(train), dtype=run.theta0.dtype) if weights is None else weights
    theta_end, kept = replay(flat, train, run, weights, keep_every=checkpoint_every)
    theta_bar = per_example_grads(flat, queries, theta=theta_end)  # [Q, P]
    velocity_bar = torch.zeros_like(theta_bar)  # ṽ_{t+2}: the momentum buffer's adjoint from later steps
    weight_bar = theta_bar.new_zeros(len(queries), len(train))
    for start in sorted(kept, reverse=True):
        thetas = _segment_states(flat, train, run, weights, start, kept[start], checkpoint_every)
        for t in reversed(range(start, start + len(thetas))):
            velocity_bar = run.momentum * velocity_bar - run.learning_rates[t] * theta_bar  # ṽ_{t+1}
            idx = run.batches[t]
            batch = per_example_grads(flat, train.subset(idx), theta=thetas[t - start])  # [b, P]
            contribution = (velocity_bar @ batch.T) / len(idx)  # [Q, b]: ∂/∂w_i of g_t·ṽ
            weight_bar.index_add_(1, idx, contribution)
            theta_bar = theta_bar + _batch_hvp(flat, train, run, weights, t, thetas[t - start], velocity_bar)
    return weight_bar, theta_end


def _segment_states(flat: FlatLoss, train: Split, run: SgdRun, weights: Tensor, start: int,
                    state: tuple[Tensor, Tensor], length: int) -> list[Tensor]:
    """θ_t for t in [start, start + length) ∩ [0, T), replayed from the kept ``(θ_start, v_start)``."""
    theta, velocity = state
    thetas = []
    for t in range(start, min(start + length, run.steps)):
        thetas.append(theta)
        theta, velocity = _sgd_step(flat, train, run, weights, t, theta, velocity)
    return thetas


def removal_scores(flat: FlatLoss, train: Split, run: SgdRun, queries: Split, *, checkpoint_every: int = 16) -> Tensor:
    """First-order change in each query's loss when each training point is removed (w_i: 1 → 0): ``[Q, n]``
    = −∂f/∂w (positive: the point helped the query)."""
    return -metagradient(flat, train, run, queries, checkpoint_every=checkpoint_every)
