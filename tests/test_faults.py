"""A results folder that is never silently wrong: a rewritten truth, a transient fault, a missing package,
failed cells on resume and a plug-in's sys.exit each end the way the README's reliability table says."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bench.atomic import arrays_digest
from bench.cli import main

SUITE = textwrap.dedent("""
    name = "toy"
    threads = 1
    bootstrap_resamples = 100

    [[tasks]]
    name = "toy-logreg"

    [[protocols]]
    name = "loo"
    n_removed = 30
""")

PLUGIN = textwrap.dedent('''
    import sys
    from bench.registry import registered
    from estimators.base import NotApplicable
    from estimators.influence import ExactInfluence

    @registered("zz-needs-package")
    class NeedsPackage(ExactInfluence):
        """Exact influence that needs an optional package."""
        def fit(self, ctx):
            try:
                import zz_optional_package  # noqa: F401
            except ImportError as err:
                raise NotApplicable("zz_optional_package is not installed") from err
            super().fit(ctx)

    @registered("zz-raises")
    class Raises(ExactInfluence):
        """Fails while fitting."""
        def fit(self, ctx):
            raise RuntimeError("broken on purpose")

    @registered("zz-exit")
    class Exit(ExactInfluence):
        """Calls sys.exit while fitting."""
        def fit(self, ctx):
            sys.exit(3)
''')


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "toy.toml").write_text(SUITE)
    (tmp_path / "plugin.py").write_text(PLUGIN)
    return tmp_path


def run(folder, results, *estimators, extra=()):
    return main(["run", "--suite", str(folder / "toy.toml"), "--results", str(folder / results), "--plugin",
                 str(folder / "plugin.py"), "--no-progress", "--no-isolate", "--estimators", *estimators, *extra])


def latest(results):
    cells = {}
    for line in (results / "records.jsonl").read_text().splitlines():
        record = json.loads(line)
        cells[record["estimator"]] = record
    return cells


def test_a_truth_rewritten_with_its_checksum_recomputed_is_not_used_for_new_cells(toy):
    assert run(toy, "clean", "grad-dot", "if-exact") == 0
    clean = latest(toy / "clean")
    assert run(toy, "tampered", "grad-dot") == 0
    [path] = (toy / "tampered" / "cache" / "groundtruth").glob("*.npz")
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["actual"] = -arrays["actual"]  # the negated truth, with an embedded checksum that matches it
    payload = {k: v for k, v in arrays.items() if not k.startswith("__")}
    arrays["__sha256__"] = np.array(arrays_digest(payload))
    with path.open("wb") as file:
        np.savez(file, **arrays)
    assert run(toy, "tampered", "if-exact") == 0  # a new estimator alone: the folder's records still count
    tampered = latest(toy / "tampered")
    assert tampered["if-exact"]["truth_digest"] == tampered["grad-dot"]["truth_digest"] == clean["if-exact"]["truth_digest"]
    assert tampered["if-exact"]["metrics"] == clean["if-exact"]["metrics"]  # judged against the truth, not its negation


def test_a_truth_that_still_differs_after_recomputing_stops_the_run_naming_the_file(toy, capsys):
    assert run(toy, "r", "grad-dot") == 0
    path = toy / "r" / "records.jsonl"
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(json.dumps({**record, "truth_digest": "0" * 64}) + "\n")  # judged against another truth
    capsys.readouterr()
    assert run(toy, "r", "if-exact") == 3
    err = capsys.readouterr().err
    assert "computed again differs from the one this folder's records were judged against" in err
    assert str(toy / "r" / "cache" / "groundtruth") in err
    assert len(path.read_text().splitlines()) == 1  # nothing judged against the other truth


def test_a_disk_full_while_saving_the_truth_is_retried_by_the_same_command(toy, monkeypatch, capsys):
    import bench.cache

    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full(path, arrays, *, compressed=False):  # the ground truth's writer, on a full disk
        bench.cache.atomic_write(path, no_space)

    original = bench.cache.atomic_savez
    monkeypatch.setattr(bench.cache, "atomic_savez", full)
    assert run(toy, "r", "grad-dot") == 1
    [record] = latest(toy / "r").values()
    assert (record["status"], record["cause"]) == ("failed", "environment")
    assert "No space left on device" in record["error"] and str(toy / "r" / "cache" / "groundtruth") in record["error"]
    monkeypatch.setattr(bench.cache, "atomic_savez", original)
    capsys.readouterr()
    assert run(toy, "r", "grad-dot") == 0  # the fault is gone: the same command runs the cell again
    assert latest(toy / "r")["grad-dot"]["status"] == "ok"
    err = capsys.readouterr().err
    assert "ran again: toy-logreg/loo/grad-dot: it failed on a fault of the environment" in err
    assert "1 cell(s) run, 0 already finished" in err


def test_a_not_applicable_for_a_missing_package_runs_once_the_package_imports(toy, monkeypatch):
    assert run(toy, "r", "zz-needs-package") == 0
    [record] = latest(toy / "r").values()
    assert (record["status"], record["missing_module"]) == ("not-applicable", "zz_optional_package")
    assert run(toy, "r", "zz-needs-package") == 0  # still missing: the cell stands
    assert len((toy / "r" / "records.jsonl").read_text().splitlines()) == 1
    (toy / "site").mkdir()
    (toy / "site" / "zz_optional_package.py").write_text("")
    monkeypatch.syspath_prepend(str(toy / "site"))
    assert run(toy, "r", "zz-needs-package") == 0
    assert latest(toy / "r")["zz-needs-package"]["status"] == "ok"


def test_a_resume_over_failed_cells_exits_non_zero_and_says_so(toy, capsys):
    assert run(toy, "r", "zz-raises", "grad-dot") == 1
    capsys.readouterr()
    assert run(toy, "r", "zz-raises", "grad-dot") == 1  # nothing ran, but the folder still holds a failed cell
    err = capsys.readouterr().err
    assert "0 cell(s) run, 2 already finished (1 of them failed: --retry-failed runs them again)" in err
    assert "1 cell(s) of this plan are failed" in err
    [record] = [r for r in latest(toy / "r").values() if r["status"] == "failed"]
    assert record["cause"] == "cell" and "broken on purpose" in record["error"]


def test_sys_exit_in_process_fails_its_cell_and_the_run_goes_on(toy, capsys):
    assert run(toy, "r", "zz-exit", "grad-dot") == 1
    cells = latest(toy / "r")
    assert cells["grad-dot"]["status"] == "ok"
    assert (cells["zz-exit"]["status"], cells["zz-exit"]["cause"]) == ("failed", "cell")
    assert cells["zz-exit"]["truth_digest"] == cells["grad-dot"]["truth_digest"] is not None
    assert cells["zz-exit"]["base_digest"] == cells["grad-dot"]["base_digest"] is not None
    assert "the estimator called sys.exit(3)" in cells["zz-exit"]["error"] and "in this cell" in cells["zz-exit"]["error"]
    assert "zz-exit" in capsys.readouterr().err


def test_more_removals_than_training_points_are_refused_before_anything_is_written(toy, capsys):
    (toy / "toy.toml").write_text(SUITE.replace("n_removed = 30", "n_removed = 100000"))
    assert run(toy, "r", "grad-dot") == 2
    assert "n_removed must be in 2..60" in capsys.readouterr().err
    assert not (toy / "r").exists()


def test_cuda_without_a_gpu_is_refused_before_the_folder_is_made(toy, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    assert run(toy, "r", "grad-dot", extra=("--device", "cuda")) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err and not (toy / "r").exists()


def test_a_malformed_suite_is_refused_before_torch_is_imported(tmp_path):
    (tmp_path / "bad.toml").write_text('name = "x\n')
    code = ("import sys; from bench.cli import main; code = main(['run', '--suite', sys.argv[1]]); "
            "print('torch' in sys.modules, code)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bad.toml")], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["False", "2"], out.stderr
    assert "malformed TOML" in out.stderr


def test_files_are_created_with_the_users_umask_and_a_held_folder_is_not_rewritten(toy, capsys):
    previous = os.umask(0o027)  # not the usual 022: the mode must follow whatever the user set
    try:
        assert run(toy, "r", "grad-dot") == 0
    finally:
        os.umask(previous)
    written = [p for p in (toy / "r").rglob("*") if p.is_file() and p.name != ".lock"]
    assert any(p.suffix == ".npz" for p in written) and any(p.suffix == ".safetensors" for p in written)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o640)}
    from bench.store import exclusive

    with exclusive(toy / "r"):
        assert main(["leaderboard", "--results", str(toy / "r"), "--no-figures"]) == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert main(["leaderboard", "--results", str(toy / "r"), "--no-figures"]) == 0


@pytest.mark.parametrize(("estimator", "option", "message"), [
    ("fastif", "k = 0", "k must be ≥ 1, got 0"),
    ("gif", "ratio = 2.0", "ratio must be in (0, 1]"),
    ("group-if-1", 'solver = "nope"', "unknown solver 'nope'. Valid: auto, cg, exact"),
    ("if-lissa", "damping = 5.0", "damping must be in [0, 1)"),
    ("if-cg", "tol = 0.0", "tol must be > 0"),
    ("if-exact", "damping = -1.0", "damping must be ≥ 0"),
])
def test_bad_estimator_options_are_refused_at_planning(toy, capsys, estimator, option, message):
    (toy / "toy.toml").write_text(SUITE + f"\n[estimator_options.{estimator}]\n{option}\n")
    assert run(toy, "r", estimator) == 2
    err = capsys.readouterr().err
    assert f"estimator {estimator}: {message}" in err and not (toy / "r").exists()


def _raised(function):
    try:
        function()
    except Exception as err:
        return err
    raise AssertionError("did not raise")


def test_only_what_an_error_was_raised_from_decides_its_cause():
    from bench.failures import cause_of
    from estimators.base import NotApplicable

    def fallback_fails():
        try:
            import zz_absent_package  # noqa: F401
        except ImportError:
            raise ValueError("the fallback's own bug") from None

    def name_missing_from_a_module():
        from json import zz_no_such_name  # noqa: F401

    def not_installed():
        try:
            import zz_absent_package.sub  # noqa: F401
        except ImportError as err:
            raise NotApplicable("zz_absent_package is not installed") from err

    def handled_disk_full_then_a_bug():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            pass
        raise KeyError("bug")

    assert cause_of(_raised(fallback_fails)) == {"cause": "cell"}
    assert cause_of(_raised(name_missing_from_a_module)) == {"cause": "cell"}
    assert cause_of(_raised(not_installed)) == {"cause": "environment", "missing_module": "zz_absent_package"}
    assert cause_of(_raised(handled_disk_full_then_a_bug)) == {"cause": "cell"}
    assert cause_of(OSError(errno.EACCES, "Permission denied")) == {"cause": "environment"}
