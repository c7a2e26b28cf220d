"""Speed benchmarks (pytest-benchmark). Disabled by default; run with --benchmark-enable."""

import pytest
import torch

from estimators.autodiff import FlatLoss, hvp_operator, per_example_grads
from estimators.solvers import conjugate_gradient, lissa
from tasks.logreg import MnistLogReg, flatten, objective_hvps


@pytest.fixture(scope="module")
def mnist_smoke():
    task = MnistLogReg(MnistLogReg.presets["smoke"], seed=0)
    data = task.load_data()
    params = {k: v.detach() for k, v in task.build_model().named_parameters()}
    return task, data, params


def test_per_example_grads(benchmark, mnist_smoke):
    task, data, params = mnist_smoke
    flat = FlatLoss.of(task.build_model(), params, task.loss)
    grads = benchmark(per_example_grads, flat, data.train.subset(range(256)))
    assert grads.shape == (256, 7850)


def test_autodiff_hvp_vs_closed_form(benchmark, mnist_smoke):
    task, data, params = mnist_smoke
    flat = FlatLoss.of(task.build_model(), params, task.loss)
    vectors = torch.randn(20, flat.size, dtype=torch.float64)
    result = benchmark(hvp_operator(flat, data.train, task.l2), vectors)
    ones = torch.ones(20, len(data.train), dtype=torch.float64)
    theta = flatten(params).repeat(20, 1)
    closed = objective_hvps(theta, vectors, data.train.inputs, data.train.targets, ones, len(data.train), task.l2)
    torch.testing.assert_close(result, closed)


def test_one_cg_iteration(benchmark, mnist_smoke):
    """One conjugate-gradient iteration for 20 right-hand sides: one batched HVP plus vector updates."""
    task, data, params = mnist_smoke
    flat = FlatLoss.of(task.build_model(), params, task.loss)
    matvec, vectors = hvp_operator(flat, data.train, task.l2), torch.randn(20, flat.size, dtype=torch.float64)
    solution, info = benchmark(conjugate_gradient, matvec, vectors, tol=0.0, max_iter=1)
    assert info.iterations == 1 and solution.shape == vectors.shape


def test_one_lissa_step(benchmark, mnist_smoke):
    """One LiSSA recursion step for 20 vectors on a 256-point mini-batch Hessian."""
    task, data, params = mnist_smoke
    flat = FlatLoss.of(task.build_model(), params, task.loss)
    batch = hvp_operator(flat, data.train.subset(range(256)), task.l2)
    vectors = torch.randn(20, flat.size, dtype=torch.float64)
    estimate = benchmark(lissa, lambda v, step: batch(v), vectors, scale=10.0, depth=1)
    assert estimate.shape == vectors.shape
