"""The real MNIST task: loader counts, and the smoke suite's acceptance thresholds end to end."""

import json

import numpy as np
import torch

from bench.cli import main
from tasks.datasets import load_mnist_5k
from tasks.logreg import MnistLogReg


def test_mnist_loader_counts_and_balance():
    pixels, labels = load_mnist_5k()
    assert pixels.shape == (5000, 784) and labels.shape == (5000,)
    assert np.bincount(labels).tolist() == [500] * 10
    assert pixels.min() == 0.0 and pixels.max() == 1.0


def test_splits_are_seeded_and_disjoint():
    task = MnistLogReg(MnistLogReg.presets["smoke"], seed=0)
    first, second = task.load_data(), task.load_data()
    assert torch.equal(first.train.inputs, second.train.inputs) and torch.equal(first.query_idx, second.query_idx)
    other = MnistLogReg(MnistLogReg.presets["smoke"], seed=1).load_data()
    assert not torch.equal(first.train.targets, other.train.targets)
    assert len(first.train) == 1000 and len(first.test) == 500 and len(first.query_idx) == 20
    # no test image is also a training image
    train_rows = {row.tobytes() for row in first.train.inputs.numpy()}
    assert not any(row.tobytes() in train_rows for row in first.test.inputs.numpy())


def test_smoke_suite_meets_acceptance(tmp_path):
    results = tmp_path / "smoke"
    assert main(["run", "--suite", "smoke", "--results", str(results), "--no-progress"]) == 0
    records = {r["estimator"]: r for r in map(json.loads, (results / "records.jsonl").read_text().splitlines())}
    pearson = {name: r["metrics"]["pearson"] for name, r in records.items()}
    assert pearson["if-exact"] >= 0.95
    assert abs(pearson["if-cg"] - pearson["if-exact"]) <= 0.02
    assert pearson["if-lissa"] >= 0.90
    assert abs(pearson["random"]) <= 0.1 or records["random"]["ci"]["pearson"][0] <= 0 <= records["random"]["ci"]["pearson"][1]
    assert records["if-exact"]["task_diagnostics"]["test_accuracy"] > 0.85
    assert records["if-exact"]["groundtruth_diagnostics"]["max_retrain_grad_norm"] <= 1e-10
