"""TracIn, grad-dot/cos and FastIF against exact references on toy-logreg."""

import dataclasses

import pytest
import torch

from estimators.autodiff import FlatLoss, per_example_grads
from estimators.base import NotApplicable
from estimators.fastif import FastIf, FastIfConfig
from estimators.influence import LissaConfig, LissaInfluence
from estimators.knn import IndexConfig, NeighbourIndex
from estimators.tracin import GradCos, GradDot, TracIn, TracInConfig
from tasks.base import Checkpoint


def fitted(cls, ctx, config=None):
    estimator = cls(config)
    estimator.fit(ctx)
    return estimator


def test_tracin_with_one_checkpoint_is_learning_rate_times_grad_dot(toy):
    ctx = dataclasses.replace(toy.ctx, checkpoints=(Checkpoint(toy.ctx.params, 0.37, 10),))
    tracin = fitted(TracIn, ctx).score(toy.queries, toy.train_idx)
    grad_dot = fitted(GradDot, ctx).score(toy.queries, toy.train_idx)
    torch.testing.assert_close(tracin, 0.37 * grad_dot, rtol=1e-6, atol=1e-9)


def test_tracin_sums_learning_rate_weighted_checkpoints(toy):
    checkpoints = toy.ctx.checkpoints
    assert len(checkpoints) >= 3  # the toy task records its SGD trajectory
    total = fitted(TracIn, toy.ctx).score(toy.queries, toy.train_idx).double()
    parts = [c.learning_rate * fitted(GradDot, dataclasses.replace(toy.ctx, params=c.params)).score(
        toy.queries, toy.train_idx).double() for c in checkpoints]
    torch.testing.assert_close(total, sum(parts), rtol=1e-5, atol=1e-8)
    last_two = fitted(TracIn, toy.ctx, TracInConfig(checkpoints=(-2, -1))).score(toy.queries, toy.train_idx).double()
    torch.testing.assert_close(last_two, parts[-2] + parts[-1], rtol=1e-5, atol=1e-8)


def test_tracin_refuses_a_task_without_checkpoints_and_bad_indices(toy):
    with pytest.raises(NotApplicable, match="no training checkpoints"):
        fitted(TracIn, dataclasses.replace(toy.ctx, checkpoints=()))
    with pytest.raises(ValueError, match=r"checkpoints \[9\] out of range"):
        fitted(TracIn, toy.ctx, TracInConfig(checkpoints=(9,)))


def test_self_influence_is_the_diagonal_of_train_on_train_scores(toy):
    idx = torch.arange(0, 60, 5)
    tracin = fitted(TracIn, toy.ctx)
    diagonal = tracin.score(toy.ctx.train.subset(idx), idx).diagonal()
    torch.testing.assert_close(tracin.self_influence(idx), diagonal, rtol=1e-5, atol=1e-8)
    assert bool((diagonal > 0).all())


def materialised(ctx, split, idx, names=None):
    """g_q·g_z and ‖g_z‖ from full per-example gradients (the reference the factorised path must equal)."""
    flat = FlatLoss.of(ctx.model, ctx.params, ctx.loss, names)
    query, train = per_example_grads(flat, split), per_example_grads(flat, ctx.train.subset(idx))
    return query @ train.T, query.norm(dim=1), train.norm(dim=1)


@pytest.mark.parametrize("names", [None, ("weight",)])
def test_a_linear_layers_gradient_products_are_factorised_and_exact(toy, names):
    """(δ_q·δ_z)(x̃_q·x̃_z) equals the materialised per-example gradients' dot product (to float64 rounding),
    for grad-dot, grad-cos, self-influence and every TracIn checkpoint; with the bias fixed, x̃ = x."""
    idx = torch.arange(0, 60, 3)
    ctx = dataclasses.replace(toy.ctx, default_parameters=names or ())
    dots, query_norms, train_norms = materialised(ctx, toy.queries, idx, names)
    grad_dot = fitted(GradDot, ctx)
    assert grad_dot.diagnostics()["factorised_stages"] == 1.0
    torch.testing.assert_close(grad_dot.score(toy.queries, idx).double(), dots, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(fitted(GradCos, ctx).score(toy.queries, idx).double(),
                               dots / (query_norms[:, None] * train_norms[None, :]), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad_dot.self_influence(idx).double(), train_norms**2, rtol=1e-6, atol=1e-12)
    tracin = fitted(TracIn, ctx)
    assert tracin.diagnostics()["factorised_stages"] == len(ctx.checkpoints)
    expected = sum(c.learning_rate * materialised(dataclasses.replace(ctx, params=c.params), toy.queries, idx, names)[0]
                   for c in ctx.checkpoints)
    torch.testing.assert_close(tracin.score(toy.queries, idx).double(), expected, rtol=1e-6, atol=1e-12)


def test_other_parameter_sets_are_not_factorised(toy):
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ctx = dataclasses.replace(toy.ctx, model=model, params=params, exact_hessian=None, checkpoints=())
    grad_dot = fitted(GradDot, ctx)
    assert grad_dot.diagnostics()["factorised_stages"] == 0.0
    torch.testing.assert_close(grad_dot.score(toy.queries, toy.train_idx).double(),
                               materialised(ctx, toy.queries, toy.train_idx)[0], rtol=1e-6, atol=1e-12)


def test_grad_cos_is_scale_free(toy):
    scores = fitted(GradCos, toy.ctx).score(toy.queries, toy.train_idx)
    assert float(scores.abs().max()) <= 1.0 + 1e-6
    grad_dot = fitted(GradDot, toy.ctx).score(toy.queries, toy.train_idx)
    assert torch.equal(torch.sign(scores), torch.sign(grad_dot))


LISSA = LissaConfig(depth=200, batch_size=30, scale=0.0)


def fastif_config(k, **kwargs):
    return FastIfConfig(k=k, depth=LISSA.depth, batch_size=LISSA.batch_size, **kwargs)


def test_fastif_with_k_equal_n_is_its_underlying_influence(toy):
    fast = fitted(FastIf, toy.ctx, fastif_config(k=60)).score(toy.queries, toy.train_idx)
    lissa = fitted(LissaInfluence, toy.ctx, LISSA).score(toy.queries, toy.train_idx)
    torch.testing.assert_close(fast, lissa, rtol=1e-6, atol=1e-9)


def test_fastif_scores_only_the_nearest_neighbours(toy):
    estimator = fitted(FastIf, toy.ctx, fastif_config(k=7))
    fast = estimator.score(toy.queries, toy.train_idx)
    lissa = fitted(LissaInfluence, toy.ctx, LISSA).score(toy.queries, toy.train_idx)
    distances = torch.cdist(toy.queries.inputs, toy.ctx.train.inputs)  # logreg: features are the inputs
    nearest = torch.zeros_like(fast, dtype=torch.bool)
    nearest.scatter_(1, distances.topk(7, largest=False).indices, True)
    torch.testing.assert_close(fast[nearest], lissa[nearest], rtol=1e-6, atol=1e-9)
    assert bool((fast[~nearest] == 0).all())
    assert estimator.diagnostics()["candidates_per_query"] == 7.0


def test_ivf_index_probing_every_cell_is_exact():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(9, 5, generator=torch.Generator().manual_seed(1))
    exact = NeighbourIndex(points, IndexConfig("exact"), seed=0).search(queries, 10)
    everything = NeighbourIndex(points, IndexConfig("ivf", n_lists=8, n_probe=8), seed=0).search(queries, 10)
    assert torch.equal(everything, exact)
    probe_one = NeighbourIndex(points, IndexConfig("ivf", n_lists=8, n_probe=1), seed=0).search(queries, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(probe_one, exact, strict=True)) / exact.numel()
    assert 0.3 < recall < 1.0  # approximate: finds most, not all


def test_fastif_rejects_unknown_feature_space_and_index(toy):
    with pytest.raises(NotApplicable, match="no 'cls' feature space"):
        fitted(FastIf, toy.ctx, fastif_config(k=5, features="cls"))
    with pytest.raises(ValueError, match=r"unknown kNN index 'hnsw'\. Valid: exact, ivf"):
        fitted(FastIf, toy.ctx, fastif_config(k=5, index="hnsw"))


def test_training_gradients_are_kept_between_score_calls_within_the_byte_budget(toy, monkeypatch):
    """A second score call (another protocol) reuses the training gradients: same scores, no new gradients
    for them; with no budget every call computes them again."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ctx = dataclasses.replace(toy.ctx, model=model, params=params, exact_hessian=None, checkpoints=())
    for budget, train_calls_after_first in ((1 << 30, 0), (0, 1)):
        monkeypatch.setattr(GradDot, "train_cache_bytes", budget)
        grad_dot = fitted(GradDot, ctx)
        stage = grad_dot.stages[0]
        calls = []
        counted = dataclasses.replace(
            stage, grads=lambda split, inner=stage.grads, log=calls: log.append(len(split)) or inner(split))
        grad_dot.stages = [counted]
        first = grad_dot.score(toy.queries, toy.train_idx)
        before = len(calls)
        second = grad_dot.score(toy.queries, toy.train_idx)
        assert torch.equal(first, second)
        train_chunks = len(toy.train_idx.split(grad_dot.config.column_chunk))
        # the queries' gradients, and the training chunks again only without a budget
        assert len(calls) - before == 1 + train_calls_after_first * train_chunks
