"""Cell isolation: an estimator that exits, hangs, outgrows its memory, kills or crashes its own process
fails its cell with the reason; the run finishes, and the other cells are as they would be in-process."""

import json
import textwrap

import pytest

from bench.cli import main

pytestmark = pytest.mark.slow  # spawned cell workers, end to end

SUITE = textwrap.dedent("""
    name = "toy"
    threads = 1
    bootstrap_resamples = 100

    [[tasks]]
    name = "toy-logreg"

    [[protocols]]
    name = "loo"
    n_removed = 30

    [[protocols]]
    name = "lds"
    n_subsets = 20
""")

MISBEHAVING = textwrap.dedent('''
    import ctypes, os, signal, sys, time
    import torch
    from bench.registry import registered
    from estimators.influence import ExactInfluence

    @registered("zz-exit")
    class Exit(ExactInfluence):
        """Calls sys.exit while fitting."""
        def fit(self, ctx):
            sys.exit(3)

    @registered("zz-hang")
    class Hang(ExactInfluence):
        """Never returns from scoring."""
        def score(self, queries, train_idx):
            time.sleep(600)

    @registered("zz-hog")
    class Hog(ExactInfluence):
        """Allocates (and touches) 6 GB while fitting."""
        def fit(self, ctx):
            self.hoard = [torch.ones(2**28) for _ in range(6)]

    @registered("zz-sigkill")
    class SigKill(ExactInfluence):
        """Kills its own process (as the out-of-memory killer would)."""
        def score(self, queries, train_idx):
            os.kill(os.getpid(), signal.SIGKILL)

    @registered("zz-segfault")
    class Segfault(ExactInfluence):
        """Reads address 0."""
        def score(self, queries, train_idx):
            ctypes.string_at(0)
''')

REASONS = {
    "zz-exit": "the estimator ended its worker process (exit code 3)",
    "zz-hang": "exceeded the time limit (cell_timeout_s = 10 s)",
    "zz-hog": "exceeded the memory cap (cell_memory_mb = 2000;",
    "zz-sigkill": "the worker was killed by SIGKILL",
    "zz-segfault": "the worker crashed with SIGSEGV (segmentation fault)",
}


def records(results):
    return [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]


@pytest.fixture
def toy(tmp_path):
    suite, plugin = tmp_path / "toy.toml", tmp_path / "misbehaving.py"
    suite.write_text(SUITE)
    plugin.write_text(MISBEHAVING)
    return suite, plugin, tmp_path


def test_misbehaving_estimators_fail_their_cells_and_the_run_finishes(toy, capsys):
    suite, plugin, tmp = toy
    isolated = tmp / "isolated"
    code = main(["run", "--suite", str(suite), "--results", str(isolated), "--plugin", str(plugin), "--no-progress",
                 "--estimators", "zz-exit", "grad-dot", "zz-hang", "zz-hog", "zz-sigkill", "zz-segfault", "if-exact",
                 "--cell-timeout-s", "10", "--cell-memory-mb", "2000"])
    assert code == 1  # finished, with failed cells
    got = records(isolated)
    assert len(got) == 14 and len({(r["protocol"], r["estimator"]) for r in got}) == 14  # every cell once
    for record in got:
        if record["estimator"] in REASONS:
            assert record["status"] == "failed"
            assert REASONS[record["estimator"]] in record["error"], record["error"]
            first = record["protocol"] == "loo"  # the estimator's first cell is where it failed
            assert ("in this cell" if first else "in its cell loo/") in record["error"]
        else:
            assert record["status"] == "ok", record["error"]
    assert "10 failed" in capsys.readouterr().err

    in_process = tmp / "in-process"
    assert main(["run", "--suite", str(suite), "--results", str(in_process), "--no-progress", "--no-isolate",
                 "--estimators", "grad-dot", "if-exact"]) == 0
    expected = {(r["protocol"], r["estimator"]): r["metrics"] for r in records(in_process)}
    assert {(r["protocol"], r["estimator"]): r["metrics"] for r in got if r["status"] == "ok"} == expected


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--cell-timeout-s", "0", "cell_timeout_s must be a positive number of seconds, got 0.0"),
    ("--cell-memory-mb", "-1", "cell_memory_mb must be ≥ 0 (0: no cap), got -1.0"),
])
def test_bad_cell_limits_are_refused_before_any_work(toy, capsys, flag, value, message):
    suite, _, tmp = toy
    assert main(["run", "--suite", str(suite), "--results", str(tmp / "r"), flag, value, "--no-progress"]) == 2
    assert message in capsys.readouterr().err and not (tmp / "r").exists()
