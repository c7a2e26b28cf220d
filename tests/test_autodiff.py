import pytest
import torch
from torch import nn

from estimators.autodiff import FlatLoss, full_hessian, hvp_operator, per_example_grads
from tasks.base import Split
from tasks.logreg import flatten, objective_grads, objective_hessian, objective_hvps


def tiny_mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    split = Split(torch.randn(17, 3, dtype=torch.float64), torch.randint(0, 2, (17,)))
    flat = FlatLoss.of(model, params, lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    return model, params, split, flat


def test_per_example_grads_match_a_python_loop():
    model, _, split, flat = tiny_mlp_problem()
    fast = per_example_grads(flat, split, chunk=4)
    for i in range(len(split)):
        model.zero_grad()
        nn.functional.cross_entropy(model(split.inputs[i : i + 1]), split.targets[i : i + 1]).backward()
        slow = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(fast[i], slow)


def test_hvp_operator_matches_dense_hessian():
    _, _, split, flat = tiny_mlp_problem()
    dense = full_hessian(flat, split, l2=0.3, chunk=5)
    vectors = torch.randn(4, flat.size, dtype=torch.float64)
    torch.testing.assert_close(hvp_operator(flat, split, 0.3, chunk=6)(vectors), vectors @ dense)
    torch.testing.assert_close(dense, dense.T)


@pytest.mark.parametrize("columns", [1, 7, 10_000])
def test_dense_hessian_in_column_blocks_is_torch_func_hessian(columns):
    _, _, split, flat = tiny_mlp_problem()
    theta = flat.theta()
    reference = torch.func.hessian(lambda t: flat.batch_losses(t, split.inputs, split.targets).mean())(theta)
    reference = reference + 0.3 * torch.eye(flat.size, dtype=theta.dtype)
    torch.testing.assert_close(full_hessian(flat, split, l2=0.3, chunk=5, columns=columns), reference)


def test_parameter_subset_restricts_the_hessian():
    model, params, split, flat = tiny_mlp_problem()
    last = FlatLoss.of(model, params, flat.loss, ["2.weight", "2.bias"])
    assert last.size == 12
    full = full_hessian(flat, split, l2=0.0)
    torch.testing.assert_close(full_hessian(last, split, l2=0.0), full[-12:, -12:])


def test_logreg_closed_forms_match_autodiff():
    torch.manual_seed(1)
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    model = nn.Linear(4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    weights = torch.rand(30, dtype=torch.float64)
    theta = flatten(params)

    def objective(t):
        w, b = t[:12].view(3, 4), t[12:]
        return (weights * nn.functional.cross_entropy(x @ w.T + b, y, reduction="none")).sum() / 30 + 0.05 * t @ t

    hessian = torch.func.hessian(objective)(theta)
    torch.testing.assert_close(objective_hessian(theta, x, y, weights, 30, 0.1), hessian)
    torch.testing.assert_close(objective_grads(theta[None], x, y, weights[None], 30, 0.1)[0], torch.func.grad(objective)(theta))
    v = torch.randn(2, 15, dtype=torch.float64)
    torch.testing.assert_close(objective_hvps(theta.repeat(2, 1), v, x, y, weights.repeat(2, 1), 30, 0.1), v @ hessian)
