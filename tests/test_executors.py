"""Retrains on the three executors (in process, local worker processes, a Dask cluster) give bit-identical
ground truth and records; a retrain worker that dies is replaced, its chunks run again, and the run finishes."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.config import ConfigError, load_suite, with_overrides
from bench.executors import InProcess, LocalProcesses
from bench.groundtruth.retraining import retrain_effects
from tasks.base import RetrainSpec

SUITE = textwrap.dedent("""
    name = "toy"
    threads = 1
    bootstrap_resamples = 100
    estimators = ["if-exact", "random"]

    [[tasks]]
    name = "toy-logreg"

    [[protocols]]
    name = "loo"
    n_removed = 30

    [[protocols]]
    name = "lds"
    n_subsets = 20
""")

#: Imported as a plug-in (so in every retrain worker too): the first exact retrain anywhere kills its own
#: process (SIGKILL, as the out-of-memory killer would), once per run: IFBENCH_TEST_DIE_ONCE names a marker file.
DIES_ONCE = textwrap.dedent('''
    import os, signal
    from tasks.logreg import ToyLogReg

    MARKER = os.environ.get("IFBENCH_TEST_DIE_ONCE")
    original = ToyLogReg.retrain_without

    def dies_once(self, *args, **kwargs):
        if MARKER and not os.path.exists(MARKER):
            open(MARKER, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    ToyLogReg.retrain_without = dies_once
''')

#: what may differ between runs of the same cells: clocks, memory, where the retrains ran
VARYING = {"profile", "created_at", "seconds", "metrics_s", "retrain_workers", "train_seconds"}


def _records(results):
    return [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]


def _comparable(value):
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _ground_truth_arrays(results):
    arrays = {}
    for path in sorted((results / "cache" / "groundtruth").glob("*.npz")):
        with np.load(path) as npz:
            arrays.update({f"{path.name}:{key}": npz[key] for key in npz.files if key != "__meta__"})  # meta: clocks
    return arrays


@pytest.mark.slow
def test_in_process_local_workers_and_dask_give_identical_records(tmp_path):
    suite = tmp_path / "toy.toml"
    suite.write_text(SUITE)
    runs = {"in process": [], "2 workers": ["--workers", "2"], "dask local:2": ["--scheduler", "local:2"]}
    for name, flags in runs.items():
        assert main(["run", "--suite", str(suite), "--results", str(tmp_path / name), "--no-progress", *flags]) == 0
    reference = _records(tmp_path / "in process")
    arrays = _ground_truth_arrays(tmp_path / "in process")
    assert len(reference) == 4 and arrays
    for name in ("2 workers", "dask local:2"):
        records = _records(tmp_path / name)
        assert _comparable(records) == _comparable(reference), name
        other = _ground_truth_arrays(tmp_path / name)
        assert other.keys() == arrays.keys()
        for key, array in arrays.items():
            assert np.array_equal(other[key], array), (name, key)  # bit for bit
        assert {r["groundtruth_diagnostics"]["retrain_workers"] for r in records} == {2.0}
    assert {r["groundtruth_diagnostics"]["retrain_workers"] for r in reference} == {1.0}


@pytest.mark.slow
def test_stacked_warm_retrains_are_bit_identical_in_worker_processes():
    """mnist-resnet's warm retrains train ``retrain_batch`` models as one stack: a chunk is a stack, so the
    workers train the very same stacks as the in-process path."""
    from tasks.resnet import MnistResNet

    torch.set_num_threads(1)
    config = MnistResNet.presets["smoke"]
    task = MnistResNet(dataclasses.replace(config, n_train=120, n_test=40, n_queries=6), seed=3)
    data = task.load_data()
    base = task.train(data)
    removals = [torch.tensor([i]) for i in range(11)]  # with retrain_batch 8: a full stack and a partial one
    specs = [RetrainSpec("warm", s, 6, 0.1) for s in range(2)]
    assert task.retrain_batch == 8
    alone, _ = retrain_effects(task, data, base, removals, specs, progress=False, executor=InProcess())
    with LocalProcesses(2) as pool:
        spread, _ = retrain_effects(task, data, base, removals, specs, progress=False, executor=pool)
    assert alone.shape == (2, 6, 11) and np.abs(alone).max() > 0
    assert np.array_equal(alone, spread)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--workers", "2"], ["--scheduler", "local:2"]], ids=["workers", "dask"])
def test_a_retrain_worker_that_dies_is_replaced_and_the_run_finishes(tmp_path, flags):
    suite, plugin, marker = tmp_path / "toy.toml", tmp_path / "dies_once.py", tmp_path / "died"
    suite.write_text(SUITE)
    plugin.write_text(DIES_ONCE)
    env = {**os.environ, "IFBENCH_TEST_DIE_ONCE": str(marker)}
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--suite", str(suite), "--results",
                          str(tmp_path / "results"), "--plugin", str(plugin), "--no-progress", *flags],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert marker.exists()  # a worker did die
    records = _records(tmp_path / "results")
    assert sorted((r["protocol"], r["estimator"], r["status"]) for r in records) == [
        ("lds", "if-exact", "ok"), ("lds", "random", "ok"), ("loo", "if-exact", "ok"), ("loo", "random", "ok")]

    main(["run", "--suite", str(suite), "--results", str(tmp_path / "alone"), "--no-progress"])
    assert _comparable(records) == _comparable(_records(tmp_path / "alone"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"workers": 0}, "workers must be a whole number ≥ 1 (1: retrains in this process), got 0"),
    ({"workers": 2, "scheduler": "local:2"}, "give workers (2) or scheduler ('local:2'), not both"),
    ({"scheduler": "local:none"}, "scheduler 'local:none': local:N needs a worker count N ≥ 1"),
    ({"scheduler": "my-cluster:8786"}, "scheduler 'my-cluster:8786' is neither local:N nor a Dask scheduler's address"),
])
def test_bad_workers_or_scheduler_is_refused_naming_the_value(overrides, message):
    with pytest.raises(ConfigError) as err:
        with_overrides(load_suite("smoke"), **overrides)
    assert message in str(err.value)


def test_workers_do_not_enter_cache_keys(tmp_path, capsys):
    """A run with --workers 2 on a folder finished in process finds every cell done (the numbers are the same)."""
    suite = tmp_path / "toy.toml"
    suite.write_text(SUITE)
    args = ["run", "--suite", str(suite), "--results", str(tmp_path / "r"), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--workers", "2"]) == 0
    assert "0 cell(s) run, 4 already finished" in capsys.readouterr().err


def test_a_worker_adopts_the_shipped_factor_instead_of_factorising_again(monkeypatch):
    import pickle

    from bench.executors import RetrainChunk, RetrainProblem, run_chunk
    from tasks.base import EXACT
    from tasks.logreg import ToyLogReg

    task = ToyLogReg(ToyLogReg.presets["default"], seed=0)
    data = task.load_data()
    base = task.train(data)
    warm = RetrainSpec("warm", seed=0, steps=5)
    assert task.retrain_state(data, base, [warm]) is None  # SGD retrains use no factor
    problem = RetrainProblem(task, data, base, 1, task.retrain_state(data, base, [EXACT, warm]))
    chunk = RetrainChunk((0, 0), EXACT, (torch.tensor([0]), torch.tensor([1, 2])))
    in_process = run_chunk(problem, chunk)
    shipped = pickle.loads(pickle.dumps(problem))  # as a worker receives it: the task without its caches
    assert not hasattr(shipped.task, "_factor")

    def refactorise(*args, **kwargs):
        raise AssertionError("the worker factorised the Hessian again")

    monkeypatch.setattr(torch.linalg, "cholesky", refactorise)
    in_worker = run_chunk(shipped, chunk)
    np.testing.assert_array_equal(in_worker.losses, in_process.losses)
    assert in_worker.grad_norms == in_process.grad_norms
