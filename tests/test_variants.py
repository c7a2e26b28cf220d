"""Estimator variants: a registered estimator run under another name with its own options, on chosen tasks."""

import json
import textwrap

import pytest

from bench.catalog import default_registries
from bench.cli import main
from bench.config import ConfigError, parse_suite
from bench.planning import plan_suite

SUITE = textwrap.dedent("""
    name = "variants"
    seed = 0
    threads = 1
    bootstrap_resamples = 100
    estimators = ["if-exact", "if-exact-damped", "if-exact-elsewhere"]

    [[tasks]]
    name = "toy-logreg"
    preset = "default"

    [[tasks]]
    name = "mnist-logreg"
    preset = "smoke"
    n_train = 200

    [[protocols]]
    name = "loo"
    n_removed = 20

    [estimator_options.if-exact]
    max_parameters = 9000

    [estimator_variants.if-exact-damped]
    of = "if-exact"
    damping = 0.5

    [estimator_variants.if-exact-elsewhere]
    of = "if-exact"
    tasks = ["mnist-logreg"]
""")


def _plan(text: str):
    import tomllib

    return plan_suite(parse_suite(tomllib.loads(text), "test"), default_registries(entry_points=False))


def test_a_variant_is_its_estimator_with_the_suites_options_then_its_own():
    plan = _plan(SUITE)
    planned = {e.name: e for e in plan.estimators}
    assert planned["if-exact-damped"].cls is planned["if-exact"].cls
    assert planned["if-exact-damped"].config.damping == 0.5 and planned["if-exact"].config.damping == 0.0
    assert planned["if-exact-damped"].config.max_parameters == 9000  # the suite's options for if-exact carry over
    assert planned["if-exact-elsewhere"].runs_on("mnist-logreg") and not planned["if-exact-elsewhere"].runs_on("toy-logreg")
    everything = _plan(SUITE.replace('estimators = ["if-exact", "if-exact-damped", "if-exact-elsewhere"]',
                                     'estimators = ["all"]'))
    assert {"if-exact-damped", "if-exact-elsewhere", "if-exact", "grad-dot"} <= {e.name for e in everything.estimators}


@pytest.mark.parametrize(("table", "message"), [
    ('[estimator_variants.x]\ndamping = 0.5', "estimator variant 'x' needs of = \"ESTIMATOR\""),
    ('[estimator_variants.x]\nof = "if-exakt"', "of = 'if-exakt' is not a registered estimator"),
    ('[estimator_variants.grad-dot]\nof = "if-exact"', "'grad-dot' is already a registered estimator's name"),
    ('[estimator_variants.x]\nof = "if-exact"\ntasks = ["rt-bertt"]', "unknown task 'rt-bertt'. Did you mean 'rt-bert'?"),
    ('[estimator_variants.x]\nof = "if-exact"\ndampin = 0.5', "unknown option 'dampin' for estimator variant x"),
    ('[estimator_variants.x]\nof = "if-exact"\ntasks = "toy-logreg"', "tasks must be a list of task names"),
])
def test_a_bad_variant_is_refused_with_the_reason(table, message):
    text = SUITE.split("[estimator_variants.if-exact-damped]")[0] + table
    with pytest.raises(ConfigError, match=None) as caught:
        _plan(text)
    assert message in str(caught.value)


def test_variants_run_as_their_own_rows_only_on_their_tasks(tmp_path):
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE)
    results = tmp_path / "results"
    assert main(["run", "--suite", str(suite), "--results", str(results), "--tasks", "toy-logreg",
                 "--no-progress"]) == 0
    records = {r["estimator"]: r for r in map(json.loads, (results / "records.jsonl").read_text().splitlines())}
    assert set(records) == {"if-exact", "if-exact-damped"}  # if-exact-elsewhere runs on mnist-logreg only
    damped, plain = records["if-exact-damped"], records["if-exact"]
    assert damped["status"] == plain["status"] == "ok" and damped["variant_of"] == "if-exact" and "variant_of" not in plain
    assert damped["estimator_config"]["damping"] == 0.5
    assert damped["metrics"]["pearson"] != plain["metrics"]["pearson"]  # its options reached the estimator
    board = (results / "leaderboard.md").read_text()
    assert "`if-exact-damped`" in board and "`if-exact-damped` is `if-exact` with damping = 0.5" in board
