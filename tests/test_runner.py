"""End to end on toy-logreg: records, resume after a kill, failures recorded, caches checked."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bench.cli import main

SUITE = textwrap.dedent("""
    name = "toy"
    seed = 0
    threads = 1
    bootstrap_resamples = 100

    [[tasks]]
    name = "toy-logreg"
    preset = "default"

    [[protocols]]
    name = "loo"
    n_removed = 30
""")

PLUGINS = textwrap.dedent('''
    import os
    import torch
    from bench.registry import registered
    from estimators.base import Estimator
    from estimators.influence import ExactInfluence

    @registered("zz-crash")
    class Crash(Estimator):
        """Raises while scoring."""
        def fit(self, ctx): pass
        def score(self, queries, train_idx): raise RuntimeError("boom")

    @registered("zz-nan")
    class Nan(ExactInfluence):
        """Returns NaN scores."""
        def score(self, queries, train_idx):
            scores = super().score(queries, train_idx)
            scores[0, 0] = float("nan")
            return scores

    @registered("zz-sleep")
    class Sleep(ExactInfluence):
        """Sleeps while scoring when IFBENCH_TEST_SLEEP is set (to interrupt a run mid-cell)."""
        def score(self, queries, train_idx):
            if os.environ.get("IFBENCH_TEST_SLEEP"):
                import time
                time.sleep(120)
            return super().score(queries, train_idx)

    @registered("zz-kill")
    class Kill(ExactInfluence):
        """Kills the whole process (as a crash or Ctrl-C would) when IFBENCH_TEST_KILL is set."""
        def score(self, queries, train_idx):
            if os.environ.get("IFBENCH_TEST_KILL"):
                os._exit(137)
            return super().score(queries, train_idx)
''')


@pytest.fixture
def setup(tmp_path):
    suite, plugin = tmp_path / "toy.toml", tmp_path / "plugins.py"
    suite.write_text(SUITE)
    plugin.write_text(PLUGINS)
    return suite, plugin, tmp_path / "results"


def records(results):
    return [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]


def run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing(setup):
    suite, plugin, results = setup
    args = ["run", "--suite", str(suite), "--results", str(results), "--plugin", str(plugin), "--no-progress",
            "--estimators", "if-exact", "random", "zz-kill", "--no-isolate"]  # the kill takes the run itself down
    first = run_cli(*args, env_extra={"IFBENCH_TEST_KILL": "1"})
    assert first.returncode == 137, first.stderr
    before = records(results)
    assert sorted(r["estimator"] for r in before) == ["if-exact", "random"]
    groundtruth = next((results / "cache" / "groundtruth").glob("*.npz"))
    stamp = groundtruth.stat().st_mtime_ns

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    after = records(results)
    assert after[:2] == before  # finished cells untouched
    assert [r["estimator"] for r in after[2:]] == ["zz-kill"]  # only the missing cell ran
    assert groundtruth.stat().st_mtime_ns == stamp  # ground truth reused from the cache
    assert "1 cell(s) run, 2 already finished" in second.stderr


@pytest.mark.slow
def test_a_new_metrics_version_rescores_finished_cells_on_cached_ground_truth(setup, monkeypatch, capsys):
    import bench.metrics

    suite, _, results = setup
    args = ["run", "--suite", str(suite), "--results", str(results), "--estimators", "if-exact", "--no-progress"]
    assert main(args) == 0
    groundtruth = next((results / "cache" / "groundtruth").glob("*.npz"))
    stamp = groundtruth.stat().st_mtime_ns
    monkeypatch.setattr(bench.metrics, "VERSION", bench.metrics.VERSION + 1)
    capsys.readouterr()
    assert main(args) == 0
    assert "1 cell(s) run, 0 already finished" in capsys.readouterr().err
    first, second = records(results)
    assert first["cell_key"] != second["cell_key"] and first["metrics"] == second["metrics"]
    assert groundtruth.stat().st_mtime_ns == stamp  # only the judging is redone:
    assert second["prediction_reused"] and second["profile"] == first["profile"]  # no refit, the recorded cost stands


def test_score_time_is_the_estimators_own(setup, monkeypatch):
    """The metrics (two-way bootstrap) are timed apart: a slow judge does not slow the estimator's score time."""
    import time

    from bench.groundtruth.loo import LeaveOneOut

    suite, _, results = setup
    original = LeaveOneOut.judge

    def slow_judge(self, prediction, ev):
        time.sleep(1.0)
        return original(self, prediction, ev)

    monkeypatch.setattr(LeaveOneOut, "judge", slow_judge)  # in this process: the cell must run here too
    assert main(["run", "--suite", str(suite), "--results", str(results), "--estimators", "random", "--no-progress",
                 "--no-isolate"]) == 0
    (record,) = records(results)
    assert record["metrics_s"] >= 1.0 and record["profile"]["score_s"] < 1.0


def test_failures_are_recorded_and_the_run_goes_on(setup, capsys):
    suite, plugin, results = setup
    code = main(["run", "--suite", str(suite), "--results", str(results), "--plugin", str(plugin), "--no-progress",
                 "--estimators", "zz-crash", "zz-nan", "if-exact"])
    assert code == 1  # finished, with failed cells: not 0, and not 2 (refused before work)
    by_name = {r["estimator"]: r for r in records(results)}
    assert by_name["zz-crash"]["status"] == "failed" and "RuntimeError: boom" in by_name["zz-crash"]["error"]
    assert by_name["zz-nan"]["status"] == "failed" and "1 non-finite" in by_name["zz-nan"]["error"]
    assert by_name["if-exact"]["status"] == "ok" and by_name["if-exact"]["metrics"]["pearson"] > 0.9
    board = (results / "leaderboard.md").read_text()
    assert "failed: score failed: RuntimeError: boom" in board
    assert "2 failed" in capsys.readouterr().err
    out = results.parent / "default-out"
    assert main(["leaderboard", "--results", str(results), "--no-figures"]) == 0  # --out defaults into the results
    assert (results / "leaderboard.md").read_text().startswith("# ifbench leaderboard") and not out.exists()


def test_record_schema(setup):
    suite, _, results = setup
    assert main(["run", "--suite", str(suite), "--results", str(results), "--estimators", "if-cg", "--no-progress"]) == 0
    (record,) = records(results)
    for key in ("schema_version", "task", "protocol", "estimator", "status", "error", "metrics", "ci", "profile",
                "config_hash", "git_commit", "versions"):
        assert key in record
    assert set(record["metrics"]) == {"pearson", "spearman", "kendall", "top_k_overlap"}
    assert {"fit_s", "score_s", "peak_mem_mb"} <= set(record["profile"])
    low, high = record["ci"]["pearson"]
    assert low <= record["metrics"]["pearson"] <= high


@pytest.mark.slow
def test_same_command_gives_same_numbers(setup):
    suite, _, results = setup
    for folder in ("a", "b"):
        assert main(["run", "--suite", str(suite), "--results", str(results / folder), "--estimators", "if-lissa",
                     "random", "--no-progress"]) == 0
    a, b = records(results / "a"), records(results / "b")
    assert [r["metrics"] for r in a] == [r["metrics"] for r in b]


@pytest.mark.slow
def test_altered_cache_values_are_detected_and_recomputed(setup, caplog):
    """A cached model whose weights were changed with the header intact (still loadable) and a ground truth whose
    numbers were rewritten are both caught by their checksums, recomputed, and give the clean numbers again."""
    import numpy as np

    suite, _, results = setup
    args = ["run", "--suite", str(suite), "--results", str(results), "--estimators", "if-exact", "--no-progress"]
    assert main(args) == 0
    first = records(results)[0]["metrics"]
    (weights,) = (results / "cache" / "models").glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one byte of the last tensor's values: safetensors still loads it
    weights.write_bytes(bytes(data))
    (truth,) = (results / "cache" / "groundtruth").glob("*.npz")
    with np.load(truth) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["actual"] = arrays["actual"] * 1.5
    np.savez(truth.open("wb"), **arrays)
    (results / "records.jsonl").unlink()
    assert main(args) == 0
    assert records(results)[0]["metrics"] == first
    assert "has changed since it was written" in caplog.text
    assert caplog.text.count("checksum mismatch") == 2


@pytest.mark.slow
def test_editing_a_plugin_reruns_its_cells(setup, capsys):
    suite, plugin, results = setup
    args = ["run", "--suite", str(suite), "--results", str(results), "--plugin", str(plugin), "--estimators", "zz-nan",
            "if-exact", "--no-progress"]
    main(args)
    plugin.write_text(PLUGINS.replace('scores[0, 0] = float("nan")', "pass"))  # the plug-in is fixed
    capsys.readouterr()
    assert main(args) == 0
    assert "1 cell(s) run, 1 already finished" in capsys.readouterr().err  # its cell only; if-exact's is kept
    assert records(results)[-1]["estimator"] == "zz-nan" and records(results)[-1]["status"] == "ok"


@pytest.mark.slow
def test_corrupt_cache_is_recomputed_not_reused(setup, caplog):
    suite, _, results = setup
    args = ["run", "--suite", str(suite), "--results", str(results), "--estimators", "if-exact", "--no-progress"]
    assert main(args) == 0
    first = records(results)[0]["metrics"]
    for path in (results / "cache").rglob("*.*"):
        path.write_bytes(b"garbage")
    (results / "records.jsonl").unlink()
    assert main(args) == 0
    assert records(results)[0]["metrics"] == first
    assert "corrupt cached" in caplog.text


def test_unknown_names_exit_nonzero_and_write_nothing(tmp_path, capsys):
    results = tmp_path / "out"
    assert main(["run", "--estimators", "nope", "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert "unknown estimator 'nope'" in err and "if-exact" in err and "random" in err
    assert not results.exists()
    assert main(["run", "--tasks", "mnist-logreg", "--protocols", "lo", "--results", str(results)]) == 2
    assert "Did you mean 'loo'" in capsys.readouterr().err
    assert not results.exists()


def test_bad_option_and_preset_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(SUITE.replace('preset = "default"', 'preset = "huge"'))
    assert main(["run", "--suite", str(bad), "--results", str(tmp_path / "r")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    bad.write_text(SUITE + "\n[estimator_options.if-cg]\ntoll = 1e-3\n")
    assert main(["run", "--suite", str(bad), "--results", str(tmp_path / "r")]) == 2
    assert "Did you mean 'tol'" in capsys.readouterr().err
    narrowed = ["run", "--suite", str(bad), "--results", str(tmp_path / "r"), "--estimators", "random"]
    assert main(narrowed) == 2 and "Did you mean 'tol'" in capsys.readouterr().err  # checked even when not run
    bad.write_text(SUITE + "\n[estimator_options.if-cgg]\ntol = 1e-3\n")
    assert main(["run", "--suite", str(bad), "--results", str(tmp_path / "r")]) == 2
    assert "unknown estimator 'if-cgg'" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text(SUITE + "\n[estimator_options.if-cg]\ntol = 1e-3\n")
    assert main(["run", "--suite", str(good), "--results", str(tmp_path / "ok"), "--estimators", "random",
                 "--no-progress"]) == 0  # the suite's options for estimators left out are no obstacle


@pytest.mark.slow
def test_a_cached_model_keeps_its_parameter_order(tmp_path):
    """safetensors sorts names; the closed-form Hessian flattens in model order (weight, bias). A re-run
    that loads θ̂ from the cache must give if-exact the same scores as the run that trained it."""
    from bench.cache import pack_trained, unpack_trained
    from estimators.base import FitContext
    from estimators.influence import ExactInfluence
    from tasks.logreg import ToyLogReg

    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.replace('name = "toy"', 'name = "toy"\nestimators = ["if-exact"]'))
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["run", "--suite", str(suite), "--results", str(first), "--no-progress"]) == 0
    import shutil

    shutil.copytree(first / "cache", second / "cache")  # θ̂ and the ground truth come from the cache
    assert main(["run", "--suite", str(suite), "--results", str(second), "--no-progress"]) == 0
    metrics = [json.loads((d / "records.jsonl").read_text().splitlines()[0])["metrics"] for d in (first, second)]
    assert metrics[0] == metrics[1]

    task = ToyLogReg(ToyLogReg.presets["default"], seed=0)
    data = task.load_data()
    base = task.train(data)
    restored = unpack_trained(*pack_trained(base, task.name), device="cpu")
    assert list(restored.params) == list(base.params) == ["weight", "bias"]
    shuffled = {"bias": base.params["bias"], "weight": base.params["weight"]}  # an order the closed form does not use
    scores = []
    for params in (base.params, shuffled):
        estimator = ExactInfluence()
        estimator.fit(FitContext(task.build_model(), params, task.loss, task.l2, data.train, 0,
                                 exact_hessian=lambda p=params: task.exact_hessian(p, data)))
        scores.append(estimator.score(data.queries, torch.arange(10)))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-6, atol=1e-9)


def test_suite_names_are_folder_names_not_paths():
    from bench.preflight import slug

    assert slug("default") == "default" and slug("my suite v2") == "my-suite-v2"
    for name in ("/some/absolute/path", "../../..", "a/../../b", "..", ""):
        folder = slug(name)
        assert "/" not in folder and folder not in ("", ".", "..") and not folder.startswith(".")


def test_an_unwritable_results_path_is_refused_before_any_work(tmp_path, capsys):
    from bench.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["run", "--suite", "smoke", "--tasks", "mnist-logreg", "--results", str(blocker)]) == 2
    assert f"results path {blocker} exists and is not a folder" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", "--tasks", "mnist-logreg", "--results", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_a_second_run_on_a_busy_results_folder_is_refused(setup, capsys):
    from bench.store import exclusive

    suite, _, results = setup
    with exclusive(results):  # as a first `ifbench run` would hold it
        assert main(["run", "--suite", str(suite), "--results", str(results), "--estimators", "random",
                     "--no-progress"]) == 2
    assert "is in use by ifbench run, pid" in capsys.readouterr().err
    assert not (results / "records.jsonl").exists()
    assert main(["run", "--suite", str(suite), "--results", str(results), "--estimators", "random", "--no-progress"]) == 0


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_keeps_finished_cells(setup):
    import signal
    import time

    suite, plugin, results = setup
    env = {**os.environ, "IFBENCH_TEST_SLEEP": "1"}

    def default_sigint() -> None:
        # A background job of a non-interactive shell (`pytest &`, nohup) starts with SIGINT ignored, and its
        # children inherit that: Python then installs no KeyboardInterrupt handler, as a program should not.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, "-m", "bench", "run", "--suite", str(suite), "--results", str(results),
                                "--plugin", str(plugin), "--estimators", "random", "zz-sleep", "--no-progress"],
                               stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while not (results / "records.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # random's cell is written; zz-sleep is now sleeping in its score
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "interrupted; 1 cell(s) finished and kept" in stderr and "Traceback" not in stderr
    assert [r["estimator"] for r in records(results)] == ["random"]


@pytest.mark.parametrize(("options", "message"), [
    ("n_queries = 0", "task mnist-logreg: n_queries must be in 1..n_test=500, got 0"),
    ("n_train = -10", "task mnist-logreg: n_train must be ≥ 2, got -10"),
    ("l2 = nan", "task mnist-logreg: l2 must be a finite number ≥ 0, got nan"),
])
def test_bad_task_values_are_one_line_before_any_work(tmp_path, capsys, options, message):
    suite, results = tmp_path / "bad.toml", tmp_path / "results"
    suite.write_text(f'name = "bad"\nestimators = ["random"]\n[[tasks]]\nname = "mnist-logreg"\npreset = "smoke"\n'
                     f'{options}\n[[protocols]]\nname = "loo"\n')
    assert main(["run", "--suite", str(suite), "--results", str(results), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not results.exists()


@pytest.mark.parametrize(("source", "message"), [
    ("def broken(:\n    pass\n", "does not parse: invalid syntax ("),
    ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError: No module named 'not_a_module_anywhere' ("),
])
def test_a_broken_plugin_is_one_line_naming_where(tmp_path, capsys, source, message):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text(source)
    assert main(["list", "--plugin", str(plugin)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and f"{plugin}:1)" in err and len(err.splitlines()) == 1


def test_scores_must_be_float32():
    import torch

    from bench.groundtruth.base import validate_scores

    assert validate_scores(torch.zeros(2, 3), (2, 3)) is None
    assert "expected torch.float32" in validate_scores(torch.zeros(2, 3, dtype=torch.float64), (2, 3))
