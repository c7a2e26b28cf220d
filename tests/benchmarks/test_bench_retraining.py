"""Retraining speed (pytest-benchmark; disabled by default, run with --benchmark-enable): SGD steps of
mnist-resnet's smoke recipe, one model alone vs 8 stacked. ``ifbench throughput`` reports the same as
retrains per second at full sizes."""

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
