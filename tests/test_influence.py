"""Influence estimators against exact references on toy-logreg (60 points, solved to 1e-12)."""

import numpy as np
import pytest
import torch

from bench import metrics
from bench.catalog import default_registries
from bench.conformance import check_estimator
from bench.registry import registered
from estimators.baselines import RandomScores
from estimators.influence import CgConfig, CgInfluence, ExactConfig, ExactInfluence, LissaConfig, LissaInfluence


def fitted(cls, toy, config=None):
    estimator = cls(config)
    estimator.fit(toy.ctx)
    return estimator


def test_exact_influence_is_the_derivative_of_retraining(toy):
    """Down-weight z by ε and retrain exactly: Δloss/ε → (1/n) g_qᵀ H⁻¹ g_z (the removal direction)."""
    task, data = toy.task, toy.task.load_data()
    base = task.train(data)
    eps, points = 1e-5, torch.arange(0, 60, 7)
    weights = torch.ones(len(points), 60, dtype=torch.float64)
    weights[torch.arange(len(points)), points] = 1 - eps
    model = task.build_model()
    base_loss = task.per_example_loss(model, base.params, toy.queries)
    retrained = task.retrain_weighted(data, base, weights)
    derivative = torch.stack([(task.per_example_loss(model, r.params, toy.queries) - base_loss) / eps for r in retrained], 1)
    scores = fitted(ExactInfluence, toy).score(toy.queries, points).double()
    torch.testing.assert_close(scores, derivative.float().double(), rtol=2e-3, atol=1e-6)


def test_exact_influence_tracks_brute_force_leave_one_out(toy):
    scores = fitted(ExactInfluence, toy).score(toy.queries, toy.train_idx).numpy()
    per_query = metrics.per_query(scores, toy.actual)["pearson"]
    assert np.nanmean(per_query) > 0.9  # measured 0.954: a removal of 1/60 is not infinitesimal
    # first order: same sign for every sizeable effect
    big = np.abs(toy.actual) > 0.1 * np.abs(toy.actual).max()
    assert (np.sign(scores[big]) == np.sign(toy.actual[big])).mean() > 0.95


def test_autodiff_hessian_path_equals_closed_form(toy):
    closed = fitted(ExactInfluence, toy).score(toy.queries, toy.train_idx)
    generic = fitted(ExactInfluence, toy, ExactConfig(parameters=("weight", "bias"))).score(toy.queries, toy.train_idx)
    torch.testing.assert_close(generic, closed, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["if-exact", "group-if-1", "gif"])
def test_a_task_without_a_closed_form_hessian_gets_the_autodiff_one(toy, name):
    """Every non-convex task's context offers ``exact_hessian`` returning None (no closed form): the dense
    Hessian estimators fall back to autodiff on all parameters and agree with the closed form."""
    import dataclasses

    cls = default_registries(entry_points=False).estimators.get(name)
    no_closed_form = dataclasses.replace(toy.ctx, exact_hessian=lambda: None)
    fallback, closed = cls(cls.Config()), cls(cls.Config())
    fallback.fit(no_closed_form)
    closed.fit(toy.ctx)
    assert fallback.diagnostics()["closed_form_hessian"] == 0.0 and closed.diagnostics()["closed_form_hessian"] == 1.0
    torch.testing.assert_close(fallback.score(toy.queries, toy.train_idx), closed.score(toy.queries, toy.train_idx),
                               rtol=1e-5, atol=1e-7)


def test_cg_and_lissa_converge_to_exact(toy):
    exact = fitted(ExactInfluence, toy).score(toy.queries, toy.train_idx)
    cg = fitted(CgInfluence, toy, CgConfig(tol=1e-10, dtype="")).score(toy.queries, toy.train_idx)  # task's float64
    torch.testing.assert_close(cg, exact, rtol=1e-4, atol=1e-7)
    lissa = fitted(LissaInfluence, toy, LissaConfig(depth=3000, batch_size=60, dtype="float64"))
    torch.testing.assert_close(lissa.score(toy.queries, toy.train_idx), exact, rtol=1e-3, atol=1e-6)


def test_float32_cg_meets_its_tolerance_up_to_float32_rounding(toy):
    """The default float32 solve, checked in float64 against the exact Hessian: the true relative residual is
    at most tol plus the gap finite precision opens between CG's recursive and true residuals, bounded by
    (iterations + 1)·κ(H)·ε₃₂ (Greenbaum 1989; the constant is 1 for these small dimensions)."""
    tol = 1e-4
    cg = fitted(CgInfluence, toy, CgConfig(tol=tol))
    assert cg.flat.theta().dtype == torch.float32 and toy.ctx.params["weight"].dtype == torch.float64
    grads = cg.grads(toy.queries)
    solution = cg.inverse_hvp(grads).double()
    hessian = toy.ctx.exact_hessian()
    eigenvalues = torch.linalg.eigvalsh(hessian)
    kappa = float(eigenvalues[-1] / eigenvalues[0])
    residual = (solution @ hessian - grads.double()).norm(dim=1) / grads.double().norm(dim=1)
    iterations = cg.diagnostics()["cg_iterations"]
    assert float(residual.max()) <= tol + (iterations + 1) * kappa * torch.finfo(torch.float32).eps
    # the parameter update comes back in the task's dtype
    assert all(v.dtype == torch.float64 for v in cg.update(toy.train_idx[:3]).values())
    with pytest.raises(ValueError, match="dtype must be one of"):
        CgConfig(dtype="half")


def test_stochastic_lissa_is_close_and_reproducible(toy):
    exact = fitted(ExactInfluence, toy).score(toy.queries, toy.train_idx).numpy()
    config = LissaConfig(depth=800, batch_size=20, repeats=2)
    first = fitted(LissaInfluence, toy, config).score(toy.queries, toy.train_idx)
    second = fitted(LissaInfluence, toy, config).score(toy.queries, toy.train_idx)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert np.nanmean(metrics.per_query(first.numpy(), exact)["pearson"]) > 0.9


def test_lissa_with_too_small_scale_fails_loudly(toy):
    with pytest.raises(Exception, match="diverged"):
        fitted(LissaInfluence, toy, LissaConfig(scale=1e-3, depth=500)).score(toy.queries, toy.train_idx)


def test_random_baseline_is_uncorrelated(toy):
    scores = fitted(RandomScores, toy).score(toy.queries, toy.train_idx).numpy()
    assert abs(np.nanmean(metrics.per_query(scores, toy.actual)["pearson"])) < 0.15


BUILTIN = default_registries().estimators


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if BUILTIN.get(name).peer else name
                                  for name in BUILTIN.names()])  # the peers' libraries are slow to start
def test_builtin_estimators_conform(name):
    """Every registered estimator passes ``ifbench check-estimator`` (the list is the registry's, not hand-kept)."""
    checks = check_estimator(BUILTIN.get(name))
    assert all(check.passed for check in checks), [c for c in checks if not c.passed]


def test_every_seed_estimator_is_registered():
    assert {"if-exact", "if-cg", "if-lissa", "tracin", "grad-dot", "grad-cos", "fastif", "group-if-1", "group-if-2",
            "gif", "fif", "pif"} <= set(BUILTIN.names())


def test_conformance_catches_a_flipped_sign():
    @registered("flipped")
    class Flipped(ExactInfluence):
        def score(self, queries, train_idx):
            return -super().score(queries, train_idx)

    checks = check_estimator(Flipped)
    assert {c.name for c in checks if not c.passed} == {"agreement with exact LOO"}
    assert "sign convention is flipped" in next(c.detail for c in checks if not c.passed)


def test_conformance_reports_its_steps_and_passes_quietly():
    from bench.conformance import STEPS

    seen = []
    checks = check_estimator(BUILTIN.get("if-exact"), step=seen.append)
    assert seen == list(STEPS) and all(c.passed for c in checks)
    assert not any("flipped" in c.detail for c in checks)  # no sign-flip hint on a pass
