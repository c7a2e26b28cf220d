"""Stacked retraining (several models trained as one) against lone runs of the same recipe.

Exactness is checked in float64, where the only difference between a stacked member and its lone run is
the summation order of the kernels: each step's gradient then differs by about (reduction length) × u64
relative, and the tolerance below follows from that bound over the run's steps. In float32 the same
arithmetic differs by rounding only (measured on mnist-resnet's default warm retrains: effects agree at
r = 0.9998, differences 0.05% of their spread; see README).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tasks.base import RetrainSpec, Split
from tasks.resnet import MnistResNet
from tasks.sgd import run_sgd, run_sgd_stacked, total_steps, vmapped_forward

U64 = torch.finfo(torch.float64).eps / 2
STEPS = 6


@pytest.fixture(scope="module")
def small():
    """mnist-resnet's smoke task, its model in float64 and 256 of its training points."""
    task = MnistResNet(MnistResNet.presets["smoke"], seed=3)
    data = task.load_data()
    train = data.train.subset(torch.arange(256))
    model = task.make_model().double().eval()
    params = {k: v.double() for k, v in task.initial_params(3).items()}
    return task, model, params, Split(train.inputs.double(), train.targets)


def tolerance(params: dict[str, torch.Tensor], train: Split, steps: int, lr: float, momentum: float) -> float:
    """|θ_stacked − θ_lone| bound: per step each gradient entry sums ≤ batch × pixels products, so it may
    differ by that many u64 times the largest parameter-scale term (taken as 10, the loss' gradient scale on
    unit-normalised inputs, with a 10× margin); momentum sums the differences of ≤ 1/(1−β) steps."""
    reduction = 64 * train.inputs[0].numel()
    return steps * lr / (1 - momentum) * reduction * U64 * 10 * 10


@pytest.mark.parametrize("stacked", ["forward_stacked", "vmap"])
def test_stacked_members_equal_lone_runs(small, stacked):
    task, model, params, train = small
    recipe = dataclasses.replace(task.recipe, batch_size=64)
    forward = model.forward_stacked if stacked == "forward_stacked" else vmapped_forward(model)
    excludes = [torch.tensor([0, 5]), torch.tensor([7, 100]), torch.tensor([200, 255])]
    lr = 0.05
    together = run_sgd_stacked(forward, params, train, task.loss, recipe, seed=11, excludes=excludes,
                               max_steps=STEPS, constant_lr=lr)
    atol = tolerance(params, train, STEPS, lr, recipe.momentum)
    assert atol < 1e-8  # far below any effect of removing a point
    moved = 0.0
    for exclude, member in zip(excludes, together, strict=True):
        alone, _ = run_sgd(model, params, train, task.loss, recipe, seed=11, exclude=exclude, max_steps=STEPS,
                           constant_lr=lr)
        torch.testing.assert_close(member, alone, rtol=0, atol=atol)
        moved = max(moved, max(float((alone[k] - params[k]).abs().max()) for k in params))
    assert moved > 1e3 * atol  # the runs trained: agreement is not two copies of the start


def test_stacked_scratch_runs_follow_the_cosine_schedule(small):
    """Without ``max_steps`` members run the whole recipe (cosine rate) from their start, like lone runs."""
    task, model, params, train = small
    recipe = dataclasses.replace(task.recipe, batch_size=64, epochs=1)
    excludes = [torch.tensor([1]), torch.tensor([2])]
    together = run_sgd_stacked(model.forward_stacked, params, train, task.loss, recipe, seed=4, excludes=excludes)
    steps = total_steps(recipe, len(train) - 1, None)
    for exclude, member in zip(excludes, together, strict=True):
        alone, _ = run_sgd(model, params, train, task.loss, recipe, seed=4, exclude=exclude)
        torch.testing.assert_close(member, alone, rtol=0, atol=tolerance(params, train, steps, recipe.lr, recipe.momentum))


def test_stacked_members_must_leave_out_equally_many_points(small):
    task, model, params, train = small
    with pytest.raises(ValueError, match="equally many points, got sizes \\[1, 2\\]"):
        run_sgd_stacked(model.forward_stacked, params, train, task.loss, task.recipe, seed=0,
                        excludes=[torch.tensor([1]), torch.tensor([2, 3])], max_steps=1)


def test_retrain_without_stacks_by_size_and_keeps_the_order():
    """Removals of mixed sizes, stacked 3 at a time: every result is its own removal's (closest to the lone
    retrain of that removal, which differ from each other far more than stacking's rounding)."""
    config = dataclasses.replace(MnistResNet.presets["smoke"], n_train=300)
    lone, stacked = MnistResNet(config, seed=5), MnistResNet(dataclasses.replace(config, retrain_batch=3), seed=5)
    data = lone.load_data()
    base = lone.train(data)
    removals = [torch.arange(0, 60), torch.tensor([3]), torch.arange(100, 160), torch.tensor([7]),
                torch.tensor([9]), torch.tensor([11])]
    spec = RetrainSpec("warm", 0, 8, 0.5)
    expected = lone.retrain_without(data, base, removals, spec)
    got = stacked.retrain_without(data, base, removals, spec)
    flat = [torch.cat([r.params[k].flatten() for k in sorted(r.params)]) for r in expected]
    for i, result in enumerate(got):
        mine = torch.cat([result.params[k].flatten() for k in sorted(result.params)])
        distances = torch.stack([(mine - other).norm() for other in flat])
        assert int(distances.argmin()) == i
        assert float(distances[i]) < 1e-3 * float(distances.sort().values[1])


@pytest.mark.slow
def test_throughput_command_reports_each_configuration(capsys):
    from bench.cli import main

    assert main(["throughput", "--tasks", "mnist-resnet", "--preset", "smoke", "--stacks", "2", "4", "--steps", "2",
                 "--repeats", "1", "--threads", "1", "--workers", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mnist-resnet")]
    assert [row.split("|")[4:6] for row in rows] == [[" one at a time ", " 4 "], [" stacked ", " 2 "], [" stacked ", " 4 "],
                                                     [" 2 workers × 1 thread, stacks of 8 ", " 32 "]]
    assert rows[0].rstrip().endswith("| 1.00 |")  # the ratio's reference
    assert all(float(row.split("|")[6]) > 0 for row in rows)


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "mnist-logreg"], "task 'mnist-logreg' is not trained by SGD"),
    (["--stacks", "0"], "--stacks, --steps, --repeats and --workers must be ≥ 1"),
    (["--workers", "0"], "--stacks, --steps, --repeats and --workers must be ≥ 1, got [1, 8, 32], 10, 3, 0"),
    (["--tasks", "mnist-resnet", "--preset", "huge"], "unknown preset 'huge' for task 'mnist-resnet'"),
])
def test_throughput_refuses_bad_requests(capsys, args, message):
    from bench.cli import main

    assert main(["throughput", *args]) == 2
    assert message in capsys.readouterr().err
