"""TRAK's ensemble of independently trained models, its Kronecker-factored projection, and layer gradients
for the gradient-similarity rows: against exact references on networks small enough to take every gradient."""

import dataclasses

import pytest
import torch
from torch import nn

from bench.context import independent_seed
from estimators.autodiff import FlatLoss, per_example_grads
from estimators.base import FitContext, NotApplicable
from estimators.layers import covered_layers
from estimators.projection import KroneckerSketch
from estimators.tracin import GradDot, GradDotConfig, TracIn, TracInConfig
from estimators.trak import Trak, TrakConfig, margin, margin_roots
from tasks.base import Checkpoint, Split


def fitted(ctx, **options):
    estimator = Trak(TrakConfig(**options))
    estimator.fit(ctx)
    return estimator


def mlp_context(seed: int = 3) -> FitContext:
    """A two-layer tanh network with biases on 3 classes (every parameter in a Linear layer), float64."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    params = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * 0.7 for k, v in model.named_parameters()}
    train = Split(torch.randn(40, 5, generator=generator, dtype=torch.float64), torch.arange(40) % 3)
    return FitContext(model, params, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), 0.01, train,
                      seed=0)


def test_an_ensemble_of_copies_of_one_model_is_the_one_model_trak(toy):
    """models = N whose 'independent' models are θ̂ itself: the ensemble mean of N equal terms, so the scores
    equal one-model TRAK's up to float64 rounding (shown in float32: within one ulp)."""
    asked = []

    def copies(index):
        asked.append(index)
        return toy.ctx.params

    ctx = dataclasses.replace(toy.ctx, train_independent=copies)
    one = fitted(toy.ctx, projection_dim=0).score(toy.queries, toy.train_idx)
    ensemble = fitted(ctx, projection_dim=0, models=4)
    assert asked == [1, 2, 3] and ensemble.diagnostics()["models"] == 4.0
    assert ensemble.diagnostics()["independent_models"] == 3.0
    torch.testing.assert_close(ensemble.score(toy.queries, toy.train_idx), one, rtol=2**-23, atol=0)


def test_independent_members_change_the_scores(toy):
    """Members trained elsewhere (here: θ̂ moved at random; a shift shared by every class would not move the
    softmax) enter the mean: the scores are not one-model TRAK's."""
    generator = torch.Generator().manual_seed(1)
    moved = {k: v + 0.3 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in toy.ctx.params.items()}
    ctx = dataclasses.replace(toy.ctx, train_independent=lambda index: moved)
    one = fitted(toy.ctx, projection_dim=0).score(toy.queries, toy.train_idx)
    assert not torch.allclose(fitted(ctx, projection_dim=0, models=2).score(toy.queries, toy.train_idx), one, rtol=1e-3)


def test_an_ensemble_needs_a_context_that_trains(toy):
    with pytest.raises(NotApplicable, match="independently trained"):
        fitted(dataclasses.replace(toy.ctx, train_independent=None), models=2)
    assert toy.ctx.in_dtype(torch.float32).train_independent is None  # trained in the task's dtype, not this one
    assert not Trak.runs_on_head_view(TrakConfig(models=2)) and not Trak.runs_on_head_view(TrakConfig(projection="kronecker"))


def test_bad_trak_options_name_the_value():
    with pytest.raises(ValueError, match="projection must be one of 'dense', 'kronecker', got 'sparse'"):
        TrakConfig(projection="sparse")
    with pytest.raises(ValueError, match="models=0"):
        TrakConfig(models=0)


def test_independent_seeds_differ_by_member_and_base_model():
    class Stub:
        def __init__(self, training_seed):
            self.training_seed = training_seed

    seeds = {independent_seed(Stub(s), m) for s in (0, 1) for m in (1, 2, 3)}
    assert len(seeds) == 6 and independent_seed(Stub(0), 1) == independent_seed(Stub(0), 1)
    with pytest.raises(ValueError, match="index must be ≥ 1"):
        independent_seed(Stub(0), 0)


def test_kronecker_sketch_with_sides_at_least_as_wide_is_no_projection():
    """Sides no narrower than the layers keep every gradient entry (reordered per layer), so the kernel and
    the scores are no-projection TRAK's, on a network whose parameters are all in Linear layers."""
    ctx = mlp_context()
    queries = Split(ctx.train.inputs[:6] + 0.1, ctx.train.targets[:6])
    idx = torch.arange(40)
    exact = fitted(ctx, projection_dim=0, parameters=("*",)).score(queries, idx)
    sketched = fitted(ctx, projection="kronecker", side_dim=64, parameters=("*",))
    assert sketched.diagnostics()["features"] == sketched.diagnostics()["n_parameters"] == 3 * 8 + 7 * 6
    torch.testing.assert_close(sketched.score(queries, idx), exact, rtol=1e-6, atol=1e-9)


def test_kronecker_sketch_is_the_kronecker_projection_of_each_layers_gradient():
    """Narrow sides: each layer's features are vec(P_s G P_aᵀ) of its per-example margin gradient G ``[d_out, D]``
    (bias as the last column), G taken by vmapped autograd."""
    ctx = mlp_context()
    layers = covered_layers(ctx.model, ctx.params, ())
    names = tuple(ctx.params)
    sketch = KroneckerSketch.draw(ctx.model, ctx.params, names, layers, 2, seed=11)
    found = sketch.features(ctx.train, margin_roots, batch=7)
    flat = FlatLoss.of(ctx.model, ctx.params, margin, names)
    grads = per_example_grads(flat, ctx.train)
    assert all(p_s is not None and p_a is not None for p_s, p_a in sketch.sides)  # every side wider than 2
    expected = [(p_s @ layer.matrices(grads) @ p_a.T).flatten(1) for layer, (p_s, p_a) in zip(layers, sketch.sides, strict=True)]
    assert found.shape == (40, 2 * 2 * len(layers))
    torch.testing.assert_close(found, torch.cat(expected, dim=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("names", [("*",), ("2",)])
def test_layer_gradients_give_grad_dot_its_vmap_scores(names):
    """gradients = "layers" (batched backward passes, no vmap) scores what vmapped per-example gradients score."""
    ctx = mlp_context()
    queries = Split(ctx.train.inputs[:5] * 0.5, ctx.train.targets[:5])
    idx = torch.arange(40)
    scores = {}
    for gradients in ("vmap", "layers"):
        estimator = GradDot(GradDotConfig(parameters=names, gradients=gradients, column_chunk=16, grad_chunk=6))
        estimator.fit(ctx)
        scores[gradients] = estimator.score(queries, idx)
        assert estimator.diagnostics()["n_parameters"] == (3 * 8 + 7 * 6 if names == ("*",) else 3 * 8)
    torch.testing.assert_close(scores["layers"], scores["vmap"], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="unknown gradients 'loop'"):
        GradDotConfig(gradients="loop")


def test_layer_gradients_at_a_checkpoint_saved_in_another_order_give_tracin_its_vmap_scores():
    """A checkpoint whose parameters were saved in reverse order (the bias before its weight) is read in the
    model's order: TracIn over it scores what vmapped gradients score."""
    ctx = mlp_context()
    reverse = dict(reversed([(k, v * 0.9) for k, v in ctx.params.items()]))
    ctx = dataclasses.replace(ctx, checkpoints=(Checkpoint(reverse, 0.5, 10), Checkpoint(ctx.params, 0.1, 20)))
    queries = Split(ctx.train.inputs[:4], ctx.train.targets[:4])
    scores = {}
    for gradients in ("vmap", "layers"):
        estimator = TracIn(TracInConfig(parameters=("*",), gradients=gradients, column_chunk=16))
        estimator.fit(ctx)
        scores[gradients] = estimator.score(queries, torch.arange(40))
    torch.testing.assert_close(scores["layers"], scores["vmap"], rtol=1e-6, atol=1e-9)
