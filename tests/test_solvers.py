import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.solvers import SolverDivergedError, cholesky_solve, conjugate_gradient, lissa, top_eigenvalue


def spd(dim: int, seed: int, floor: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T / dim + floor * torch.eye(dim, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(2, 30), seed=st.integers(0, 10_000), rhs=st.integers(1, 4))
def test_cg_matches_exact_solve(dim, seed, rhs):
    h = spd(dim, seed)
    v = torch.randn(rhs, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    x, info = conjugate_gradient(lambda m: m @ h, v, tol=1e-10, max_iter=10 * dim)
    torch.testing.assert_close(x, cholesky_solve(h, v), rtol=1e-6, atol=1e-8)
    assert info.relative_residual <= 1e-10


def test_preconditioned_cg_with_exact_preconditioner_takes_one_step():
    h = spd(20, 0)
    v = torch.randn(3, 20, dtype=torch.float64)
    x, info = conjugate_gradient(lambda m: m @ h, v, tol=1e-10, precondition=lambda r: cholesky_solve(h, r))
    assert info.iterations == 1
    torch.testing.assert_close(x, cholesky_solve(h, v))


def test_cg_rejects_indefinite_operator():
    h = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="positive definite"):
        conjugate_gradient(lambda m: m @ h, torch.tensor([[0.0, 1.0]], dtype=torch.float64))


def test_lissa_converges_to_inverse_hvp():
    h = spd(10, 3, floor=0.5)
    v = torch.randn(2, 10, dtype=torch.float64)
    scale = 1.2 * top_eigenvalue(lambda m: m @ h, 10, like=v, iterations=200)
    estimate = lissa(lambda m, step: m @ h, v, scale=scale, depth=3000)
    torch.testing.assert_close(estimate, cholesky_solve(h, v), rtol=1e-6, atol=1e-8)


def test_lissa_damping_shifts_the_solution_by_damping_times_scale():
    h = spd(8, 4, floor=0.5)
    v = torch.randn(1, 8, dtype=torch.float64)
    scale, damping = 10.0, 0.01
    estimate = lissa(lambda m, step: m @ h, v, scale=scale, damping=damping, depth=4000)
    shifted = h + damping * scale * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(estimate, cholesky_solve(shifted, v), rtol=1e-6, atol=1e-8)


def test_lissa_detects_divergence_and_names_the_remedy():
    h = spd(6, 5) * 50
    with pytest.raises(SolverDivergedError, match="raise 'scale'"):
        lissa(lambda m, step: m @ h, torch.ones(1, 6, dtype=torch.float64), scale=1.0, depth=2000)


def test_top_eigenvalue():
    h = spd(12, 6)
    expected = float(torch.linalg.eigvalsh(h)[-1])
    assert top_eigenvalue(lambda m: m @ h, 12, like=h, iterations=300) == pytest.approx(expected, rel=1e-4)
