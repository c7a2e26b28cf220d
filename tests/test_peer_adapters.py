"""Each peer adapter against ifbench's implementation of the same quantity on toy-logreg (needs ifbench[peers];
skipped, with the reason shown, where a library is not installed)."""

import dataclasses

import pytest
import torch

from bench.catalog import default_registries
from estimators.base import FitContext, NotApplicable
from tasks.base import Split

pytestmark = pytest.mark.slow  # the peers' libraries: seconds each to import and start

REGISTRY = default_registries(entry_points=False).estimators
ADAPTERS = [name for name in REGISTRY.names() if REGISTRY.get(name).peer]
#: adapters whose library computes another quantity on toy-logreg, each tested below on a problem where it does not
NOT_ON_TOY = {"captum-arnoldi"}  # toy-logreg's Krylov space is exhausted at 11 dimensions; captum keeps 10
#: the module a library installs, where it is not its name
IMPORT_NAME = {"traker": "trak"}
#: Both sides compute the same quantity; the difference is float rounding (float32 outputs, rtol 1e-5)
#: except where a side solves iteratively, CG to its tolerance (ours 1e-5 relative, so 1e-4 here), or computes
#: in float32 throughout: dattri's DataInf (sums of n = 60 terms, each ~ε₃₂ relative: 60·6e-8 < 1e-5, so 1e-4);
#: LiSSA's float32 recursion, full-batch on toy-logreg's 60 points (each step's rounding ε₃₂ is carried with the
#: contraction 1 − λ_min/scale, so it sums to ≤ ε₃₂·scale/λ_min = 6e-8 · 1.25 · κ(H) (κ = 159) ≈ 1.2e-5, so 1e-4);
#: traker's kernel inverse in float32 (relative error ≤ κ·ε₃₂ = 1528 · 6e-8 ≈ 9e-5 on toy-logreg, so 1e-4).
TOLERANCE = {"dattri-if-cg": 1e-4, "dattri-datainf": 1e-4, "dattri-if-lissa": 1e-4, "traker-trak": 1e-4}


def fitted(cls, ctx, options=None):
    estimator = cls(dataclasses.replace(cls.Config(), **options) if options else None)
    estimator.fit(ctx)
    return estimator


def test_every_adapter_names_a_registered_counterpart():
    assert {"captum-tracincp", "captum-tracincp-fast", "dattri-if-explicit", "dattri-if-cg", "dattri-datainf",
            "dattri-if-lissa", "dattri-trak", "kronfluence-ekfac", "kronfluence-kfac", "kronfluence-identity",
            "traker-trak", "captum-arnoldi"} <= set(ADAPTERS)
    for name in ADAPTERS:
        cls = REGISTRY.get(name)
        assert cls.counterpart in REGISTRY and not REGISTRY.get(cls.counterpart).peer


@pytest.mark.parametrize("name", [name for name in ADAPTERS if name not in NOT_ON_TOY])
def test_adapter_scores_follow_ours(toy, name):
    cls = REGISTRY.get(name)
    pytest.importorskip(IMPORT_NAME.get(cls.peer, cls.peer), reason=f"{cls.peer} is not installed (pip install 'ifbench[peers]')")
    ours = fitted(REGISTRY.get(cls.counterpart), toy.ctx, cls.counterpart_options)
    peer = fitted(cls, toy.ctx)
    idx = torch.tensor([3, 0, 41, 17, 59, 8])
    expected = ours.score(toy.queries, idx)
    got = peer.score(toy.queries, idx)
    assert got.shape == expected.shape and got.dtype == torch.float32
    rtol = TOLERANCE.get(name, 1e-5)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def separated_regression():
    """Linear regression (squared error, P = 30) whose Hessian has three well-separated top eigenvalues above 27
    distinct small ones: Arnoldi's top Ritz pairs converge within 20 steps from any start, and the Krylov space
    is not exhausted."""
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(29, 29, generator=generator, dtype=torch.float64))[0]
    spread = torch.cat([torch.tensor([3.0, 2.0, 1.4]), torch.linspace(0.7, 0.2, 26)]).double()
    inputs = torch.randn(200, 29, generator=generator, dtype=torch.float64) * spread @ basis.T
    targets = torch.randn(200, 1, generator=generator, dtype=torch.float64)
    model = torch.nn.Linear(29, 1).double()
    params = {k: 0.1 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in model.named_parameters()}
    loss = lambda outputs, targets: 0.5 * (outputs - targets).pow(2).sum(1)  # noqa: E731
    ctx = FitContext(model, params, loss, 0.01, Split(inputs, targets), seed=0)
    queries = Split(torch.randn(5, 29, generator=generator, dtype=torch.float64) @ basis.T,
                    torch.randn(5, 1, generator=generator, dtype=torch.float64))
    return ctx, queries


def test_captum_arnoldi_follows_ours_where_its_krylov_space_is_not_exhausted():
    """Both keep H's top three eigenpairs (converged: the Lanczos error bound is far below float32 rounding)."""
    pytest.importorskip("captum", reason="captum is not installed (pip install 'ifbench[peers]')")
    ctx, queries = separated_regression()
    options = {"iterations": 20, "rank": 3}
    ours = fitted(REGISTRY.get("arnoldi"), ctx, options)
    peer = fitted(REGISTRY.get("captum-arnoldi"), ctx, options)
    columns = torch.arange(0, 200, 7)
    expected = ours.score(queries, columns)
    torch.testing.assert_close(peer.score(queries, columns), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    exact = fitted(REGISTRY.get("if-exact"), ctx).score(queries, columns)
    assert (exact - expected).abs().max() > 0.01 * exact.abs().max()  # rank 3 < P: the comparison is not exact IF's


@pytest.mark.parametrize("name", ADAPTERS)
def test_an_adapter_on_a_parameter_subset_is_not_applicable_and_says_where_it_runs(toy, name):
    cls = REGISTRY.get(name)
    pytest.importorskip(IMPORT_NAME.get(cls.peer, cls.peer), reason=f"{cls.peer} is not installed (pip install 'ifbench[peers]')")
    subset = dataclasses.replace(toy.ctx, default_parameters=("weight",))
    with pytest.raises(NotApplicable, match=r"attributes a whole model; this task's estimators work on \['weight'\] "
                                            r"\(run on its head view\)"):
        cls().fit(subset)
