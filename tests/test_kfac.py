"""K-FAC and EK-FAC: exact where the curvature is Kronecker-factored, EK-FAC's eigenvalues the closer fit."""

import dataclasses

import pytest
import torch
from torch import nn

from estimators.autodiff import FlatLoss, full_hessian, per_example_grads
from estimators.base import FitContext
from estimators.kfac import Ekfac, Kfac, KfacConfig
from tasks.base import Split


def fitted(cls, ctx, **options):
    estimator = cls(KfacConfig(**options))
    estimator.fit(ctx)
    return estimator


def squared_error(outputs, targets):
    return 0.5 * (outputs - targets).pow(2).sum(1)


@pytest.fixture(scope="module")
def regression():
    """Linear regression with squared error: the Hessian is exactly (mean x̃x̃ᵀ) ⊗ I (x̃ = [x, 1]), so
    K-FAC and EK-FAC are exact there."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(50, 4, generator=generator, dtype=torch.float64) + 0.3
    targets = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    model = nn.Linear(4, 3).double()
    params = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in model.named_parameters()}
    ctx = FitContext(model, params, squared_error, 0.05, Split(inputs, targets), seed=0)
    queries = Split(torch.randn(6, 4, generator=generator, dtype=torch.float64),
                    torch.randn(6, 3, generator=generator, dtype=torch.float64))
    return ctx, queries


def exact_influence(ctx, queries):
    flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss)
    hessian = full_hessian(flat, ctx.train, ctx.l2)
    query_grads, train_grads = per_example_grads(flat, queries), per_example_grads(flat, ctx.train)
    return query_grads @ torch.linalg.solve(hessian, train_grads.T) / len(ctx.train)


@pytest.mark.parametrize("cls", [Kfac, Ekfac])
def test_exact_on_a_kronecker_factored_hessian(regression, cls):
    ctx, queries = regression
    estimator = fitted(cls, ctx)
    scores = estimator.score(queries, torch.arange(len(ctx.train)))
    assert estimator.diagnostics() == {"layers": 1.0, "n_parameters": 15.0, "n_parameters_left_out": 0.0}
    torch.testing.assert_close(scores.double(), exact_influence(ctx, queries), rtol=1e-5, atol=1e-8)  # float32 scores


def dense_curvature(estimator) -> torch.Tensor:
    """The estimator's curvature as a dense matrix (l2 shift removed): invert its inverse-HVP on the identity."""
    size = estimator.flat.size
    inverse = estimator.inverse_hvp(torch.eye(size, dtype=torch.float64))
    return torch.linalg.inv(inverse) - estimator.ctx.l2 * torch.eye(size, dtype=torch.float64)


def test_ekfac_fits_the_gauss_newton_matrix_at_least_as_well_as_kfac(toy):
    """On multinomial logistic regression the Hessian (its own Gauss–Newton matrix) is not Kronecker-factored;
    in K-FAC's eigenbasis EK-FAC's eigenvalues minimise the Frobenius error (George et al. 2018)."""
    flat = FlatLoss.of(toy.ctx.model, toy.ctx.params, toy.ctx.loss)
    exact = full_hessian(flat, toy.ctx.train, 0.0).double()
    kfac_error = (dense_curvature(fitted(Kfac, toy.ctx)) - exact).norm()
    ekfac_error = (dense_curvature(fitted(Ekfac, toy.ctx)) - exact).norm()
    assert ekfac_error <= kfac_error * (1 + 1e-9)
    assert kfac_error > 1e-6 * exact.norm()  # not exact here: the comparison means something


def test_conv_layers_are_unfolded_like_the_convolution():
    """A Conv2d layer's per-example gradient is Σ_positions s aᵀ over unfolded patches: EK-FAC's
    curvature then equals the per-example gradients' second moment in its eigenbasis (its definition)."""
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()
    params = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * 0.3 for k, v in model.named_parameters()}
    train = Split(torch.randn(20, 2, 5, 5, generator=generator, dtype=torch.float64), torch.arange(20) % 4)
    ctx = FitContext(model, params, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), 0.01, train, seed=0)
    estimator = fitted(Ekfac, ctx)
    conv = estimator.layers[0]
    # the true per-example gradients, by autograd, in the layer's eigenbasis: with labels drawn from the model,
    # E_y[g gᵀ]; here the expectation is written out over the 4 classes with their probabilities
    flat = FlatLoss.of(model, params, ctx.loss, ("0.weight", "0.bias"))
    with torch.no_grad():
        probabilities = torch.softmax(functional_outputs(model, params, train.inputs), 1)
    expected = torch.zeros_like(conv.curvature)
    for c in range(4):
        grads = per_example_grads(flat, dataclasses.replace(train, targets=torch.full((20,), c)))
        rotated = conv.q_s.T @ conv.matrices(grads) @ conv.q_a
        expected += (probabilities[:, c, None, None] * rotated.pow(2)).sum(0) / 20
    torch.testing.assert_close(conv.curvature, expected, rtol=1e-8, atol=1e-12)


def functional_outputs(model, params, inputs):
    return torch.func.functional_call(model, params, (inputs,))


def test_norm_parameters_are_left_out_and_counted():
    generator = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    params = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * 0.3 for k, v in model.named_parameters()}
    train = Split(torch.randn(12, 1, 5, 5, generator=generator, dtype=torch.float64), torch.arange(12) % 3)
    ctx = FitContext(model, params, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), 0.01, train, seed=0)
    every = fitted(Ekfac, ctx, parameters=tuple(params))
    default = fitted(Ekfac, ctx)
    assert every.diagnostics() == default.diagnostics() == {"layers": 2.0, "n_parameters": 40.0 + 111.0,
                                                           "n_parameters_left_out": 8.0}
    idx = torch.arange(12)
    torch.testing.assert_close(every.score(train, idx), default.score(train, idx))


def float32_model(d_in: int, d_out: int, n: int, seed: int):
    """A float32 Linear softmax model on random data: (ctx, queries)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(d_in, d_out)
    params = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in model.named_parameters()}
    train = Split(torch.randn(n, d_in, generator=generator), torch.arange(n) % d_out)
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    queries = Split(torch.randn(4, d_in, generator=generator), torch.arange(4) % d_out)
    return FitContext(model, params, loss, 0.01, train, seed=0), queries


@pytest.mark.parametrize("cls", [Kfac, Ekfac])
def test_chunked_scores_equal_the_unchunked_ones(cls):
    """Scores a chunk of training gradients at a time equal (1/n) (H⁻¹G_q) G_trainᵀ with every gradient at once.
    Both are float32 inner products of length-P vectors whose training gradients differ by one rounding (a
    Linear layer's per-example gradient is one product s·a per entry, here from the layer's signals, there from
    vmapped autograd); Higham's bound for a length-P float32 dot product, |fl(x·y) − x·y| ≤ γ_P Σ|x_i y_i| with
    γ_P = P·u/(1 − P·u), u = 2⁻²⁴, taken twice (once for each side) covers both."""
    ctx, queries = float32_model(30, 5, 90, seed=3)
    estimator = fitted(cls, ctx, column_chunk=7, grad_chunk=5)
    chunked = estimator.score(queries, torch.arange(90))
    train_grads = per_example_grads(estimator.flat, ctx.train, chunk=90)
    solved = estimator.inverse_hvp(per_example_grads(estimator.flat, queries, chunk=4)).float() / 90
    unchunked = solved @ train_grads.T
    size, unit = estimator.flat.size, 2.0**-24
    gamma = size * unit / (1 - size * unit)
    bound = 2 * gamma * (solved.abs() @ train_grads.abs().T)
    assert ((chunked - unchunked).abs() <= bound).all()
    assert chunked.abs().max() > 100 * bound.max()  # the bound is tight enough to mean something


@pytest.mark.slow
def test_chunked_scoring_never_holds_an_n_by_p_matrix():
    """P = 1.0 M parameters and n = 1,000 training points: their gradients at once would take 4.0 GB (7.7 GB of
    peak when one chunk holds all of n); the chunked score holds the queries' [4, P] and one chunk of 64 gradients
    (0.26 GB, plus the layer signals and matmul transients), so its measured peak stays under half of that matrix."""
    from bench.phase_cost import profiled

    ctx, queries = float32_model(2000, 500, 1000, seed=4)
    estimator = fitted(Kfac, ctx, column_chunk=64, grad_chunk=32, fisher="empirical")  # 1 backward pass, not 500
    matrix_mb = 1000 * estimator.flat.size * 4 / 2**20
    with profiled("cpu") as profile:
        scores = estimator.score(queries, torch.arange(1000))
    assert scores.shape == (4, 1000) and torch.isfinite(scores).all()
    assert profile.rss_increase_mb < matrix_mb / 2, (profile.rss_increase_mb, matrix_mb)


def test_layer_gradients_equal_autograd_per_example_gradients():
    """Scoring takes each covered layer's per-example gradient as Σ_positions s aᵀ from one batched backward
    pass: equal (float64) to vmapped autograd on a conv + GroupNorm + linear network, the norm left out."""
    generator = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(27, 4)).double()
    params = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * 0.5 for k, v in model.named_parameters()}
    train = Split(torch.randn(11, 2, 5, 5, generator=generator, dtype=torch.float64), torch.arange(11) % 4)
    ctx = FitContext(model, params, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), 0.01, train, seed=0)
    estimator = fitted(Ekfac, ctx, grad_chunk=4)
    torch.testing.assert_close(estimator._grads(train), per_example_grads(estimator.flat, train), rtol=1e-10, atol=1e-12)


def test_the_empirical_fisher_factors_are_moments_of_the_observed_label_gradients(toy):
    """fisher = "empirical": S is the second moment of ∇_logits ℓ = softmax − onehot(y) at the observed labels,
    and EK-FAC's eigenvalues are the mean squared per-example gradients in the Kronecker eigenbasis."""
    ctx = toy.ctx
    estimator = fitted(Ekfac, ctx, fisher="empirical")
    (layer,) = estimator.layers
    logits = torch.func.functional_call(ctx.model, ctx.params, (ctx.train.inputs,)).double()
    delta = torch.softmax(logits, 1) - nn.functional.one_hot(ctx.train.targets, logits.shape[1]).double()
    torch.testing.assert_close(layer.s_moment, delta.T @ delta / len(ctx.train))
    rotated = layer.q_s.T @ layer.matrices(per_example_grads(estimator.flat, ctx.train).double()) @ layer.q_a
    torch.testing.assert_close(layer.curvature, rotated.pow(2).mean(0))
    true_fisher = fitted(Ekfac, ctx).layers[0]
    assert not torch.allclose(true_fisher.s_moment, layer.s_moment, rtol=1e-3)  # the choice changes the factors


def test_an_unknown_fisher_names_the_choices():
    with pytest.raises(ValueError, match="fisher must be one of 'true', 'empirical', got 'sampled'"):
        KfacConfig(fisher="sampled")
