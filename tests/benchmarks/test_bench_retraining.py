"""Retraining speed (pytest-benchmark; disabled by default, run with --benchmark-enable): SGD steps of
mnist-resnet's smoke recipe, one model alone vs 8 stacked vs 4 stacks of 8 over 2 one-thread worker processes.
``ifbench throughput`` reports the same as retrains per second at full sizes."""

import pytest
import torch

from tasks.resnet import MnistResNet
from tasks.sgd import run_sgd, run_sgd_stacked

STEPS = 5


@pytest.fixture(scope="module")
def resnet():
    task = MnistResNet(MnistResNet.presets["smoke"], seed=0)
    return task, task.load_data(), task.initial_params(0)


def test_one_model_steps(benchmark, resnet):
    task, data, start = resnet
    params, _ = benchmark(run_sgd, task.build_model(), start, data.train, task.loss, task.recipe, seed=1,
                          exclude=torch.tensor([0]), max_steps=STEPS, constant_lr=0.01)
    assert params.keys() == start.keys()


@pytest.mark.parametrize("models", [8])
def test_stacked_model_steps(benchmark, resnet, models):
    task, data, start = resnet
    members = benchmark(run_sgd_stacked, task.stacked_forward(), start, data.train, task.loss, task.recipe, seed=1,
                        excludes=[torch.tensor([i]) for i in range(models)], max_steps=STEPS, constant_lr=0.01)
    assert len(members) == models


@pytest.mark.slow
def test_stacks_over_two_worker_processes(benchmark, resnet):
    from bench.executors import LocalProcesses, RetrainChunk, RetrainProblem
    from tasks.base import RetrainSpec, TrainedModel

    task, data, start = resnet
    problem = RetrainProblem(task, data, TrainedModel(task.trainable(start)), threads=1)
    spec = RetrainSpec("warm", 1, STEPS, 0.1)
    chunks = [RetrainChunk((0, 8 * c), spec, tuple(torch.tensor([8 * c + i]) for i in range(8))) for c in range(4)]
    with LocalProcesses(2) as pool:
        list(pool.run(problem, chunks))  # the workers' start is not timed
        results = benchmark(lambda: list(pool.run(problem, chunks)))
    assert sorted(r.key for r in results) == [c.key for c in chunks]
