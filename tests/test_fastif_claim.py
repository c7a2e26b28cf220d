"""FastIF is judged on its claim: at if-lissa's own LiSSA settings, the preselection alone differs."""

import dataclasses

import pytest

from bench.catalog import default_registries
from bench.claims import SOLVER_FIELDS
from bench.config import load_suite
from bench.planning import plan_suite
from estimators.influence import LissaConfig


@pytest.mark.parametrize("suite_name", ["smoke", "default", "full"])
def test_every_shipped_suite_runs_fastif_at_if_lissas_settings(suite_name):
    plan = plan_suite(load_suite(suite_name), default_registries())
    configs = {e.name: e.config for e in plan.estimators}
    if "fastif" not in configs or "if-lissa" not in configs:
        pytest.fail(f"suite {suite_name} runs {sorted(configs)}: the FastIF comparison needs both")
    fast, lissa = configs["fastif"], configs["if-lissa"]
    assert {f: getattr(fast, f) for f in SOLVER_FIELDS} == {f: getattr(lissa, f) for f in SOLVER_FIELDS}


def test_fastif_defaults_are_lissas_defaults():
    from estimators.fastif import FastIfConfig

    fast, lissa = FastIfConfig(), LissaConfig()
    assert {f: getattr(fast, f) for f in SOLVER_FIELDS} == {f: getattr(lissa, f) for f in SOLVER_FIELDS}
    assert {f.name for f in dataclasses.fields(FastIfConfig)} >= set(SOLVER_FIELDS)


def _record(name, config, recall, headline_value, seconds, n_columns=100, task="t", protocol="loo"):
    from bench.records import as_records

    return as_records([{
        "cell_key": f"{protocol}/{name}", "task": task, "protocol": protocol, "estimator": name, "status": "ok",
        "headline": "pearson", "metrics": {"pearson": headline_value, "top_k_overlap": recall},
        "ci": {"pearson": [headline_value - 0.05, headline_value + 0.05]}, "base_models": 1, "ceiling": 1.0,
        "informative": True, "columns": ["spearman", "top_k_overlap"], "n_columns": n_columns, "top_k": 10,
        "estimator_config": config, "profile": {"fit_s": 1.0, "score_s": seconds - 1.0},
        "groundtruth_diagnostics": {"exact_retraining": 1.0}}])[0]


LISSA = {"depth": 1500, "batch_size": 256, "repeats": 1, "scale": 0.0, "damping": 0.0, "parameters": []}


def test_the_claim_section_sets_fastifs_speed_up_beside_both_recalls_at_equal_settings():
    from bench.claims import render_fastif

    groups = {("t", "loo"): [_record("if-lissa", LISSA, 0.86, 0.95, 30.0),
                             _record("fastif", {**LISSA, "k": 1000}, 0.41, 0.57, 7.5)]}
    text = "\n".join(render_fastif(groups))
    assert "at equal LiSSA settings (depth 1500, batch 256, repeats 1)" in text
    assert "differ by the preselection (1000 candidates per query) alone" in text
    assert "| t · loo (Pearson) | 0.950 · 0.860 · 30 | 0.570 · 0.410 · 7.50 | 4.00× |" in text


def test_the_claim_section_says_when_the_settings_differ_and_skips_columns_without_recall():
    from bench.claims import render_fastif

    fast = _record("fastif", {**LISSA, "depth": 200, "k": 1000}, 0.41, 0.57, 7.5)
    groups = {("t", "loo"): [_record("if-lissa", LISSA, 0.86, 0.95, 30.0), fast]}
    text = "\n".join(render_fastif(groups))
    assert "at different LiSSA settings (fastif vs if-lissa: depth 200 vs 1500)" in text
    assert "the comparison is not the paper's" in text and "alone" not in text
    few = {("t", "group"): [_record("if-lissa", LISSA, 0.9, 0.9, 3.0, n_columns=10, protocol="group"),
                            _record("fastif", LISSA, 0.9, 0.9, 3.0, n_columns=10, protocol="group")]}
    assert render_fastif(few) == []  # 10 columns and k = 10: every column is in the top k
