"""Warm retrains keep their shorter lengths on the way: the snapshot at s steps is the warm run of s steps,
bit for bit (constant rate, a batch order that does not depend on the run's length), alone or stacked."""

import dataclasses

import numpy as np
import pytest
import torch

from bench.groundtruth.retrain_length import RetrainLengthConfig
from bench.groundtruth.retraining import retrain_effects
from tasks.base import RetrainSpec
from tasks.logreg import ToyLogReg
from tasks.resnet import MnistResNet


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("retrain_batch", [1, 3])
def test_a_deep_warm_runs_snapshots_are_the_shorter_runs(retrain_batch):
    task = MnistResNet(dataclasses.replace(MnistResNet.presets["smoke"], n_train=200, retrain_batch=retrain_batch), seed=2)
    data = task.load_data()
    base = task.train(data)
    removals = [torch.tensor([3]), torch.tensor([17]), torch.tensor([40])]
    spec = RetrainSpec("warm", 1, 6, 0.5, snapshots=(2, 4))
    got = task.retrain_without(data, base, removals, spec)
    for position, steps in enumerate(spec.snapshots):
        alone = task.retrain_without(data, base, removals, spec.at(steps))
        for mine, expected in zip(got, alone, strict=True):
            assert_same(mine.snapshots[position], expected.params)
    for mine, expected in zip(got, task.retrain_without(data, base, removals, spec.at(6)), strict=True):
        assert_same(mine.params, expected.params)
    assert not torch.equal(got[0].snapshots[0]["fc.weight"], got[0].params["fc.weight"])  # the lengths differ


class ToyWithoutSnapshots(ToyLogReg):
    """A task that ignores ``snapshots`` (as a plug-in might): the shorter lengths must run on their own."""

    def retrain_without(self, data, base, removals, spec=None):
        return [dataclasses.replace(r, snapshots=()) for r in super().retrain_without(data, base, removals, spec)]


@pytest.mark.parametrize("task_class", [ToyLogReg, ToyWithoutSnapshots])
def test_retrain_effects_of_a_snapshot_spec_are_those_of_each_length_in_turn(task_class):
    task = task_class(ToyLogReg.presets["default"], seed=0)
    data = task.load_data()
    base = task.train(data)
    removals = [torch.tensor([i]) for i in (0, 5, 9, 30)]
    specs = [RetrainSpec("warm", s, 9, 0.1, snapshots=(3, 6)) for s in range(2)]
    together, _ = retrain_effects(task, data, base, removals, specs, progress=False)
    one_by_one = [retrain_effects(task, data, base, removals, [spec.at(steps) for spec in specs],
                                  progress=False)[0] for steps in (3, 6, 9)]
    np.testing.assert_array_equal(together, np.concatenate(one_by_one, axis=2))
    assert np.abs(one_by_one[0] - one_by_one[2]).max() > 0  # three lengths, three different truths


@pytest.mark.parametrize(("spec", "message"), [
    (dict(mode="scratch", steps=6, snapshots=(2,)), "snapshots must be increasing step counts in 1..5 of a warm retrain"),
    (dict(mode="warm", steps=6, snapshots=(4, 2)), "got (4, 2)"),
    (dict(mode="warm", steps=6, snapshots=(6,)), "1..5"),
    (dict(mode="warm", steps=6, snapshots=(0, 2)), "1..5"),
])
def test_snapshots_outside_a_warm_run_are_refused(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RetrainSpec(**spec)


def test_retrain_lengths_must_increase():
    with pytest.raises(ValueError, match=r"epochs must be increasing .* got \[2.0, 1.0\]"):
        RetrainLengthConfig(epochs=(2.0, 1.0))
