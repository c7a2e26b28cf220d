"""kill -9 at three points of a run (training θ̂, retraining its ground truth, scoring a cell): the same command
run again finishes the run with one record per cell, equal to an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # each test runs the CLI in subprocesses end to end

SUITE = textwrap.dedent("""
    name = "toy"
    threads = 1
    bootstrap_resamples = 100
    estimators = ["if-exact", "grad-dot", "random"]

    [[tasks]]
    name = "toy-logreg"

    [[protocols]]
    name = "loo"
    n_removed = 30

    [[protocols]]
    name = "lds"
    n_subsets = 20
""")

#: Imported as a plug-in by the run's own process: SIGKILLs it at the point IFBENCH_TEST_KILL_AT names.
KILLER = textwrap.dedent('''
    import os, signal
    from estimators.baselines import RandomScores
    from tasks.logreg import ToyLogReg

    AT = os.environ.get("IFBENCH_TEST_KILL_AT")

    def killing(method):
        def wrapper(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return wrapper

    if AT == "training":
        ToyLogReg.train = killing(ToyLogReg.train)
    elif AT == "ground truth":
        ToyLogReg.retrain_without = killing(ToyLogReg.retrain_without)
    elif AT == "scoring":
        RandomScores.score = killing(RandomScores.score)
''')


def _run(suite, results, plugin, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != "IFBENCH_TEST_KILL_AT"}
    if kill_at:
        env["IFBENCH_TEST_KILL_AT"] = kill_at
    args = [sys.executable, "-m", "bench", "run", "--suite", str(suite), "--results", str(results), "--plugin",
            str(plugin), "--no-progress", "--no-isolate"]  # the kill takes the run's own process down
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def _records(results):
    path = results / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability")
    (folder / "toy.toml").write_text(SUITE)
    (folder / "killer.py").write_text(KILLER)
    reference = _run(folder / "toy.toml", folder / "reference", folder / "killer.py")
    assert reference.returncode == 0, reference.stderr
    return folder, {(r["protocol"], r["estimator"]): r["metrics"] for r in _records(folder / "reference")}


@pytest.mark.parametrize(("kill_at", "kept"), [("training", 0), ("ground truth", 0), ("scoring", 4)])
def test_kill_9_then_the_same_command_finishes_with_nothing_lost_or_duplicated(files, kill_at, kept):
    folder, reference = files
    results = folder / kill_at.replace(" ", "-")
    killed = _run(folder / "toy.toml", results, folder / "killer.py", kill_at)
    assert killed.returncode == -signal.SIGKILL
    before = _records(results)
    assert len(before) == kept  # scoring: loo and lds cells of if-exact and grad-dot finished before random's
    resumed = _run(folder / "toy.toml", results, folder / "killer.py")
    assert resumed.returncode == 0, resumed.stderr
    after = _records(results)
    assert after[: len(before)] == before  # finished cells untouched
    cells = [(r["protocol"], r["estimator"]) for r in after]
    assert len(cells) == len(set(cells)) == len(reference)  # each cell once
    for cell, record in zip(cells, after, strict=True):  # caches written by another process: equal to ~1e-14
        assert record["metrics"] == pytest.approx(reference[cell], rel=1e-9, abs=1e-12), cell
