"""Each peer adapter against ifbench's implementation of the same quantity on toy-logreg (needs ifbench[peers];
skipped, with the reason shown, where a library is not installed)."""

import dataclasses

import pytest
import torch

from bench.catalog import default_registries

REGISTRY = default_registries(entry_points=False).estimators
ADAPTERS = [name for name in REGISTRY.names() if REGISTRY.get(name).peer]
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
            "traker-trak"} <= set(ADAPTERS)
    for name in ADAPTERS:
        cls = REGISTRY.get(name)
        assert cls.counterpart in REGISTRY and not REGISTRY.get(cls.counterpart).peer


@pytest.mark.parametrize("name", ADAPTERS)
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
