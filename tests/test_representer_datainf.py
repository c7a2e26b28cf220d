"""Representer points and DataInf against exact references on toy-logreg and a small two-layer network."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from bench.conformance import check_estimator
from estimators.autodiff import FlatLoss, per_example_grads
from estimators.base import FitContext, NotApplicable
from estimators.datainf import DataInf, DataInfConfig, layer_slices
from estimators.representer import Representer, RepresenterConfig, augmented


def fitted(cls, ctx, config):
    estimator = cls(config)
    estimator.fit(ctx)
    return estimator


def logit_slopes_by_hand(ctx, split):
    """δ = softmax(logits) − onehot(y): ∂ℓ/∂logits of cross-entropy, ``[b, C]``."""
    logits = split.inputs.double() @ ctx.params["weight"].double().T + ctx.params["bias"].double()
    return torch.softmax(logits, 1) - nn.functional.one_hot(split.targets, logits.shape[1]).double()


def test_representer_at_a_stationary_layer_is_influence_with_the_hessian_replaced_by_l2(toy):
    ctx = toy.ctx
    rep = fitted(Representer, ctx, RepresenterConfig())
    info = rep.diagnostics()
    assert info["fine_tune_shift"] == 0.0  # θ̂ already has ‖∇J‖ ≤ 1e-12: nothing to fine-tune
    n, l2 = ctx.n_train, ctx.l2
    expected = (logit_slopes_by_hand(ctx, toy.queries) @ logit_slopes_by_hand(ctx, ctx.train).T) * (
        augmented(toy.queries.inputs.double()) @ augmented(ctx.train.inputs.double()).T) / (l2 * n)
    scores = rep.score(toy.queries, toy.train_idx)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-9)  # float32 output
    # the same as g_qᵀ g_z / (l2·n) with full per-example gradients of [W, b]
    flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss)
    grads = per_example_grads(flat, ctx.train)
    by_grads = per_example_grads(flat, toy.queries) @ grads.T / (l2 * n)
    torch.testing.assert_close(scores.double(), by_grads, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(rep.self_influence(toy.train_idx[:10]),
                               torch.diagonal(rep.score(ctx.train.subset(toy.train_idx[:10]), toy.train_idx[:10])))


def test_representer_fine_tunes_a_layer_off_its_optimum_until_the_decomposition_holds(toy):
    generator = torch.Generator().manual_seed(3)
    moved = {k: v + 0.5 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in toy.ctx.params.items()}
    ctx = dataclasses.replace(toy.ctx, params=moved)
    config = RepresenterConfig(grad_tol=1e-10)
    rep = fitted(Representer, ctx, config)
    info = rep.diagnostics()
    assert info["fine_tune_grad_norm"] <= config.grad_tol and info["fine_tune_shift"] > 0.01
    # [W, b] − Σ α_i [f_i, 1] = ∇J / l2 exactly, so its norm is at most √(entries)·grad_tol/l2
    entries = info["n_parameters"]
    layer_norm = float(rep.layer.norm())
    assert info["representer_residual"] * layer_norm <= math.sqrt(entries) * config.grad_tol / ctx.l2
    # the fine-tuned layer is the objective's unique optimum: θ̂'s head (found from anywhere)
    theta = torch.cat([toy.ctx.params["weight"], toy.ctx.params["bias"][:, None]], 1).double()
    assert float((rep.layer - theta).abs().max()) < 1e-7


def test_representer_needs_a_linear_last_layer(toy):
    model = nn.Sequential(nn.Linear(4, 3)).double()
    params = {f"0.{k}": v for k, v in toy.ctx.params.items()}
    ctx = dataclasses.replace(toy.ctx, model=model, params=params, exact_hessian=None)
    with pytest.raises(NotApplicable, match="one nn\\.Linear"):
        fitted(Representer, ctx, RepresenterConfig())
    with pytest.raises(ValueError, match="grad_tol"):
        RepresenterConfig(grad_tol=0.0)


def explicit_datainf(grads_by_layer, query_by_layer, scale):
    """(1/n) Σ_l q_lᵀ [(1/n) Σ_i (g_il g_ilᵀ + λ_l I)⁻¹] g_zl with each per-example inverse formed densely."""
    total = 0.0
    for grads, queries in zip(grads_by_layer, query_by_layer, strict=True):
        n, d = grads.shape
        damping = scale * float((grads**2).sum()) / (n * d)
        inverse = sum(torch.linalg.inv(torch.outer(g, g) + damping * torch.eye(d, dtype=grads.dtype)) for g in grads) / n
        total = total + queries @ inverse @ grads.T / n
    return total


def test_datainf_equals_its_formula_with_every_inverse_formed(toy):
    ctx = toy.ctx
    est = fitted(DataInf, ctx, DataInfConfig())
    flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss)
    grads, queries = per_example_grads(flat, ctx.train), per_example_grads(flat, toy.queries)
    expected = explicit_datainf([grads], [queries], 0.1)
    scores = est.score(toy.queries, toy.train_idx)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-9)
    assert est.diagnostics()["layers"] == 1.0
    idx = toy.train_idx[:10]
    torch.testing.assert_close(est.self_influence(idx), torch.diagonal(est.score(ctx.train.subset(idx), idx)))


def test_datainf_is_block_diagonal_over_a_networks_layers(toy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ctx = FitContext(model, params, toy.ctx.loss, toy.ctx.l2, toy.ctx.train, seed=0)
    est = fitted(DataInf, ctx, DataInfConfig(damping_scale=0.3))
    assert est.diagnostics()["layers"] == 2.0
    flat = FlatLoss.of(model, params, ctx.loss)
    grads, queries = per_example_grads(flat, ctx.train), per_example_grads(flat, toy.queries)
    cut = 4 * 5 + 5
    expected = explicit_datainf([grads[:, :cut], grads[:, cut:]], [queries[:, :cut], queries[:, cut:]], 0.3)
    torch.testing.assert_close(est.score(toy.queries, toy.train_idx).double(), expected, rtol=1e-5, atol=1e-9)


def test_datainf_from_layer_gradients_equals_the_kept_matrix(toy):
    """gradients = 'layers' (per-example layer gradients a chunk at a time, never an [n, P] matrix) gives the scores,
    self-influence and damping of the [n, P] path, in float64, with chunks that do not divide n and a shuffled
    column order; a 1-column chunk exercises the per-chunk pass of self-influence."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ctx = FitContext(model, params, toy.ctx.loss, toy.ctx.l2, toy.ctx.train, seed=0)
    kept = fitted(DataInf, ctx, DataInfConfig(damping_scale=0.3, parameters=("*",)))
    streamed = fitted(DataInf, ctx, DataInfConfig(damping_scale=0.3, parameters=("*",), gradients="layers",
                                                  grad_chunk=5, column_chunk=7))
    columns = torch.randperm(ctx.n_train, generator=torch.Generator().manual_seed(1))
    # float64 throughout and float32 output: equal within a few float32 ulps
    torch.testing.assert_close(streamed.score(toy.queries, columns), kept.score(toy.queries, columns),
                               rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(streamed.self_influence(columns[:9]), kept.self_influence(columns[:9]),
                               rtol=1e-6, atol=1e-12)
    assert streamed.streamed.damping == pytest.approx(kept.damping, rel=1e-12)
    assert streamed.diagnostics() == kept.diagnostics() == {"n_parameters": 43.0, "layers": 2.0}
    one = fitted(DataInf, ctx, DataInfConfig(damping_scale=0.3, parameters=("*",), gradients="layers", column_chunk=1))
    torch.testing.assert_close(one.self_influence(columns[:3]), kept.self_influence(columns[:3]), rtol=1e-6, atol=1e-12)


def test_datainf_layers_needs_a_layer_and_a_known_gradient_mode(toy):
    model = nn.Sequential(nn.Linear(4, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ctx = FitContext(model, params, toy.ctx.loss, toy.ctx.l2, toy.ctx.train, seed=0)
    with pytest.raises(NotApplicable, match="Linear or Conv2d"):
        fitted(DataInf, ctx, DataInfConfig(parameters=("0.bias",), gradients="layers"))
    with pytest.raises(ValueError, match=r"unknown gradients 'dense'\. Valid: vmap, layers"):
        DataInfConfig(gradients="dense")
    with pytest.raises(ValueError, match="column_chunk"):
        DataInfConfig(column_chunk=0)


def test_layer_slices_group_a_modules_parameters():
    assert layer_slices(("a.weight", "a.bias", "b.weight"), [6, 2, 3]) == {"a": slice(0, 8), "b": slice(8, 11)}
    assert layer_slices(("weight", "bias"), [6, 2]) == {"": slice(0, 8)}
    with pytest.raises(ValueError, match="not adjacent"):
        layer_slices(("a.weight", "b.weight", "a.bias"), [1, 1, 1])


@pytest.mark.parametrize("cls", [Representer, DataInf])
def test_conformance_check_passes(cls):
    checks = check_estimator(cls)
    assert all(check.passed for check in checks), [c for c in checks if not c.passed]


def test_datainf_damping_must_be_positive():
    with pytest.raises(ValueError, match="damping_scale"):
        DataInfConfig(damping_scale=0.0)

