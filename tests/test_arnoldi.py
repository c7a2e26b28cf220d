"""Arnoldi influence: exact IF at full rank, the top-eigenspace projection of the exact Hessian below it."""

import pytest
import torch
from torch import nn

from estimators.arnoldi import ArnoldiConfig, ArnoldiInfluence
from estimators.autodiff import FlatLoss, full_hessian, per_example_grads
from estimators.base import FitContext, NotApplicable
from estimators.influence import ExactConfig, ExactInfluence
from estimators.solvers import arnoldi_eigenpairs

# Both sides are exact in float64 up to the eigendecomposition's rounding, about κ(H)·u ≈ 1e-13 here (κ ≈ 1e3):
# 1e-8 is far above that and far below any truncation error (dropping one eigenpair moves scores by ≥ 1e-3).
RTOL = 1e-8


def fitted(toy, **options):
    estimator = ArnoldiInfluence(ArnoldiConfig(**options))
    estimator.fit(toy.ctx)
    return estimator


def test_full_rank_arnoldi_is_exact_influence(toy):
    size = FlatLoss.of(toy.ctx.model, toy.ctx.params, toy.ctx.loss).size
    arnoldi = fitted(toy, iterations=size, rank=size).score(toy.queries, toy.train_idx)
    exact = ExactInfluence(ExactConfig())
    exact.fit(toy.ctx)
    torch.testing.assert_close(arnoldi, exact.score(toy.queries, toy.train_idx), rtol=RTOL, atol=RTOL * 1e-2)


def test_low_rank_arnoldi_projects_on_the_exact_top_eigenvectors(toy):
    ctx = toy.ctx
    flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss)
    values, vectors = torch.linalg.eigh(full_hessian(flat, ctx.train, ctx.l2))
    top_values, top_vectors = values.flip(0)[:4], vectors.flip(1)[:, :4]  # [4], [P, 4]
    g_query, g_train = per_example_grads(flat, toy.queries), per_example_grads(flat, ctx.train)
    expected = (g_query @ top_vectors / top_values) @ (g_train @ top_vectors).T / ctx.n_train
    estimator = fitted(toy, iterations=flat.size, rank=4)
    torch.testing.assert_close(estimator._values, top_values, rtol=RTOL, atol=0)
    scores = estimator.score(toy.queries, toy.train_idx)
    torch.testing.assert_close(scores, expected.float(), rtol=1e-5, atol=1e-7)  # float32 scores
    assert estimator.diagnostics()["rank"] == 4 and estimator.diagnostics()["top_eigenvalue"] == pytest.approx(
        float(top_values[0]), rel=RTOL)


def test_the_iteration_finds_the_largest_eigenvalues_of_a_known_operator():
    spectrum = torch.tensor([9.0, 7.0, 5.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    matrix = rotation @ torch.diag(spectrum) @ rotation.T
    values, vectors = arnoldi_eigenpairs(lambda v: v @ matrix, 8, like=spectrum, iterations=8, rank=3)
    torch.testing.assert_close(values, spectrum[:3], rtol=1e-10, atol=0)
    torch.testing.assert_close(vectors @ vectors.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(vectors @ matrix, values[:, None] * vectors, rtol=0, atol=1e-9)


def test_rank_above_iterations_is_refused():
    with pytest.raises(ValueError, match="arnoldi needs 1 ≤ rank ≤ iterations, got rank=60, iterations=50"):
        ArnoldiConfig(iterations=50, rank=60)


def test_layer_gradients_need_a_known_mode_and_a_layer(toy):
    with pytest.raises(ValueError, match=r"unknown gradients 'dense'\. Valid: vmap, layers"):
        ArnoldiConfig(gradients="dense")
    with pytest.raises(ValueError, match="column_chunk"):
        ArnoldiConfig(column_chunk=0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ctx = FitContext(model, params, toy.ctx.loss, toy.ctx.l2, toy.ctx.train, seed=0)
    with pytest.raises(NotApplicable, match="Linear or Conv2d"):
        ArnoldiInfluence(ArnoldiConfig(parameters=("0.bias",), gradients="layers", iterations=2, rank=1)).fit(ctx)
