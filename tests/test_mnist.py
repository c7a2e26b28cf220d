"""The real MNIST task: loader counts, and the smoke suite's acceptance thresholds end to end."""

import json

import numpy as np
import pytest
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


@pytest.mark.slow
def test_smoke_suite_meets_acceptance(tmp_path):
    results = tmp_path / "smoke"
    assert main(["run", "--suite", "smoke", "--results", str(results), "--no-progress"]) == 0
    lines = (results / "records.jsonl").read_text().splitlines()
    records = {r["estimator"]: r for r in map(json.loads, lines) if r["task"] == "mnist-logreg"}
    assert {r["task"] for r in map(json.loads, lines)} == {"mnist-logreg", "mnist-resnet", "rt-bert"}
    assert records["loss"]["status"] == "not-applicable"  # self-influence only: no loo row
    pearson = {name: r["metrics"]["pearson"] for name, r in records.items() if r["status"] == "ok"}
    assert pearson["if-exact"] >= 0.95
    assert abs(pearson["if-cg"] - pearson["if-exact"]) <= 0.02
    assert pearson["if-lissa"] >= 0.80  # the smoke suite runs LiSSA shallower (depth 300) for speed
    assert abs(pearson["random"]) <= 0.1 or records["random"]["ci"]["pearson"][0] <= 0 <= records["random"]["ci"]["pearson"][1]
    assert records["if-exact"]["task_diagnostics"]["test_accuracy"] > 0.85
    assert records["if-exact"]["groundtruth_diagnostics"]["max_retrain_grad_norm"] <= 1e-10


def _published_records() -> list[dict]:
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "leaderboard" / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_published_leaderboard_meets_the_default_acceptance():
    """The committed leaderboard (generated from the default suite) meets issue #2's thresholds."""
    records = _published_records()
    logreg = {r["estimator"]: r for r in records if r["task"] == "mnist-logreg" and r["protocol"] == "loo"}
    # loss: self-influence only; magic: a convex task is solved to its optimum, with no recorded run to replay
    assert {name for name, r in logreg.items() if r["status"] != "ok"} == {"loss", "magic"}
    assert all(r["preset"] == "default" for r in logreg.values())
    pearson = {name: r["metrics"]["pearson"] for name, r in logreg.items() if r["status"] == "ok"}
    assert pearson["if-exact"] >= 0.95 and abs(pearson["if-cg"] - pearson["if-exact"]) <= 0.02
    assert pearson["if-lissa"] >= 0.90 and abs(pearson["random"]) <= 0.1
    accuracy = {r["task"]: r["task_diagnostics"]["test_accuracy"] for r in records}
    assert set(accuracy) == {"mnist-logreg", "mnist-resnet", "rt-bert"}
    # the same code and seeds train θ̂ to 97.2% on one CPU and 96.4% on another (an AMD EPYC): deep θ̂ depends on
    # the machine's kernels, so the bar is one both measured machines meet
    assert accuracy["mnist-resnet"] >= 0.96 and accuracy["rt-bert"] >= 0.75


def test_published_leaderboard_has_every_estimator_on_every_cell_of_the_default_suite():
    """Issues #4 and #5: every registered estimator × every (task, protocol) of the default suite is
    published, scored with a profile where it applies and marked not applicable (never failed) elsewhere."""
    from bench.catalog import default_registries
    from bench.config import load_suite
    from bench.planning import own_estimators

    suite = load_suite("default")
    expected = {(t.name, p) for t in suite.tasks for p in t.protocols}
    records = _published_records()
    cells = {(r["task"], r["protocol"], r["estimator"]): r for r in records}
    registry = default_registries()
    for task, protocol in expected:
        for name in own_estimators(registry):  # what the default suite's "all" runs (peers' adapters are not in it)
            record = cells[task, protocol, name]
            assert record["status"] in ("ok", "not-applicable"), (task, protocol, name, record["error"])
            needs = registry.protocols.get(protocol).needs
            applicable = bool(needs & registry.estimators.get(name).capabilities)
            if record["status"] == "ok":
                assert record["profile"]["fit_s"] >= 0 and record["profile"]["score_s"] >= 0
            # not applicable exactly where the estimator lacks what the protocol needs, says so itself, or a
            # configured limit refused it (over a limit)
            assert (record["status"] == "ok") == applicable or record.get("reason") in ("estimator", "limit"), \
                (task, protocol, name)


def test_published_deep_cells_pool_three_base_models_under_their_ceiling():
    """Issue #10: every seed-averaged deep cell is repeated on ≥ 3 base models, a deterministic one on as many
    as its protocol's ``first_base_models`` says (issue #26: whole replayed runs), and every ranked pooled value
    lies at or below its pooled noise ceiling's upper bound."""
    from bench.config import load_suite
    from bench.pooling import pool_base_models

    records = _published_records()
    caps = {p.name: dict(p.options).get("first_base_models") for p in load_suite("default").protocols}
    deep = {}
    for r in records:
        if r["task"] != "mnist-logreg":
            deep.setdefault((r["task"], r["protocol"], r["estimator"]), set()).add(r["base_model"])
    assert deep and all(len(bases) == caps[key[1]] if caps.get(key[1]) else len(bases) >= 3
                        for key, bases in deep.items())
    assert any(caps.get(key[1]) for key in deep)  # the deterministic track is published
    ranked = [r for r in pool_base_models(records) if r.status == "ok" and r.informative
              and r.groundtruth_diagnostics.get(f"ceiling_{r.headline}_ci")]
    assert any(r.task != "mnist-logreg" for r in ranked)
    for r in ranked:
        upper = r.groundtruth_diagnostics[f"ceiling_{r.headline}_ci"][1]
        assert r.metrics[r.headline] <= upper, r.cell
