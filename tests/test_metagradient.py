"""MAGIC's metagradient against finite differences of the replayed run, on a small float64 MLP.

Tolerances: a central difference with step h has truncation error h²/6 · |f'''| and rounding error
≈ ε·|f|/h. With h = 1e-5 in float64 (ε = 2.2e-16), |f| ≈ 1 and |f'''| well below 10³ on this model
(its weights' third derivatives through 10 steps of lr ≤ 0.1), both are below 2e-7, so 1e-6 absolute holds
with room on any machine.
"""

import pytest
import torch

from estimators.autodiff import FlatLoss
from estimators.metagradient import SgdRun, metagradient, removal_scores, replay
from tasks.base import Split


def _problem(momentum, weight_decay, steps=10, n=6, batch=3):
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = lambda outputs, targets: torch.nn.functional.cross_entropy(outputs, targets, reduction="none")  # noqa: E731
    flat = FlatLoss.of(model, params, loss)
    train = Split(torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randint(0, 3, (n,), generator=generator))
    queries = Split(torch.randn(3, 3, generator=generator, dtype=torch.float64), torch.randint(0, 3, (3,), generator=generator))
    batches = tuple(torch.randperm(n, generator=generator)[:batch] for _ in range(steps))
    rates = tuple(0.1 * (1 - t / (2 * steps)) for t in range(steps))  # a decaying schedule
    return flat, train, queries, SgdRun(flat.theta(), batches, rates, momentum, weight_decay)


def _query_losses(flat, train, run, queries, weights):
    theta, _ = replay(flat, train, run, weights)
    return flat.batch_losses(theta, queries.inputs, queries.targets)


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01)],
                         ids=["sgd", "momentum", "momentum-weight-decay"])
def test_the_metagradient_is_the_finite_difference_of_the_replayed_run(momentum, weight_decay):
    flat, train, queries, run = _problem(momentum, weight_decay)
    exact = metagradient(flat, train, run, queries, checkpoint_every=5)  # [Q, n]
    h, ones = 1e-5, torch.ones(len(train), dtype=torch.float64)
    for i in range(len(train)):
        step = torch.zeros_like(ones)
        step[i] = h
        difference = (_query_losses(flat, train, run, queries, ones + step)
                      - _query_losses(flat, train, run, queries, ones - step)) / (2 * h)
        torch.testing.assert_close(exact[:, i], difference, rtol=0, atol=1e-6)
    assert exact.abs().max() > 1e-3  # the points matter: the comparison is not of zeros


def test_checkpointing_changes_nothing_but_memory():
    flat, train, queries, run = _problem(0.9, 0.01)
    every_step = metagradient(flat, train, run, queries, checkpoint_every=1)
    for k in (3, 5, 10, 100):  # a last segment shorter than k, one segment, more than the run
        torch.testing.assert_close(metagradient(flat, train, run, queries, checkpoint_every=k), every_step,
                                   rtol=1e-12, atol=1e-14)


def test_a_removal_is_predicted_to_second_order():
    """Down-weighting point i by ε changes the loss by −ε ∂f/∂w_i + O(ε²): the error falls 4× when ε halves."""
    flat, train, queries, run = _problem(0.9, 0.01)
    scores = removal_scores(flat, train, run, queries)
    ones = torch.ones(len(train), dtype=torch.float64)
    base = _query_losses(flat, train, run, queries, ones)
    i = int(scores.abs().sum(0).argmax())
    errors = []
    for eps in (0.2, 0.1):
        weights = ones.clone()
        weights[i] = 1 - eps
        actual = _query_losses(flat, train, run, queries, weights) - base
        errors.append(float((actual - eps * scores[:, i]).abs().max()))
    assert 3.0 < errors[0] / errors[1] < 5.0


def test_a_bad_run_is_refused_naming_the_value():
    flat, train, queries, run = _problem(0.0, 0.0)
    with pytest.raises(ValueError, match="10 batches but 9 learning rates"):
        SgdRun(run.theta0, run.batches, run.learning_rates[:-1])
    with pytest.raises(ValueError, match="momentum must be in"):
        SgdRun(run.theta0, run.batches, run.learning_rates, momentum=1.0)
    with pytest.raises(ValueError, match="checkpoint_every must be ≥ 1, got 0"):
        metagradient(flat, train, run, queries, checkpoint_every=0)


def test_the_deep_recipe_is_replayed_step_for_step():
    """tasks.sgd.recorded_run describes run_sgd's own run: replaying it reaches run_sgd's θ (float64 rounding)."""
    from tasks.sgd import SgdRecipe, recorded_run, run_sgd

    flat, train, _, _ = _problem(0.0, 0.0)
    recipe = SgdRecipe(epochs=3, batch_size=4, lr=0.1, momentum=0.9, l2=1e-3)
    trained, _ = run_sgd(flat.model, flat.params, train, flat.loss, recipe, seed=7)
    run = recorded_run(recipe, flat.theta(), len(train), seed=7)
    assert run.steps == 3 * 2  # 6 points in batches of 4: two steps an epoch
    replayed, _ = replay(flat, train, run)
    torch.testing.assert_close(replayed, torch.cat([trained[n].reshape(-1) for n in flat.names]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(replayed, flat.theta())  # it trained
