"""Random-effects intervals, rank bands, agreement and "does not separate" (bench.ranking), on synthetic columns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.leaderboard import render_markdown
from bench.ranking import Z95, agreeing, random_effects_interval, rank_bands, separation
from bench.records import as_records


def _conditional(values, errors):
    """The interval pooling used before #24: mean ± 1.96·√(Σ se²)/B (uncertainty given these base models)."""
    half = Z95 * np.sqrt(np.sum(np.square(errors))) / len(errors)
    return np.mean(values) - half, np.mean(values) + half


@pytest.mark.parametrize("shared", [False, True])
def test_the_random_effects_interval_covers_the_mean_over_base_models(shared):
    """θ̂_b = μ + u_b (u_b ~ N(0, τ²): which base model was drawn) + within-model error (se σ, shared by every
    base model when the queries and columns are, or independent). 4,000 draws put the coverage within ±0.7% (two
    binomial standard errors at 95%) of its true value; the t-interval alone covers 95% exactly under normality."""
    generator = np.random.default_rng(0)
    mu, tau, sigma, count, draws = 0.5, 0.1, 0.03, 5, 4000
    covered = {"random effects": 0, "conditional": 0}
    errors = np.full(count, sigma)
    for _ in range(draws):
        within = generator.normal(0, sigma) if shared else generator.normal(0, sigma, count)
        values = mu + generator.normal(0, tau, count) + within
        for name, rule in (("random effects", random_effects_interval), ("conditional", _conditional)):
            low, high = rule(values, errors)
            covered[name] += low <= mu <= high
    assert 0.93 <= covered["random effects"] / draws <= 0.995
    assert covered["conditional"] / draws < 0.5  # it describes these base models, not the mean over θ̂


def _record(name, per_query, value=None, protocol="lds", headline="lds", ci=None):
    per_query = [list(map(float, row)) for row in np.atleast_2d(per_query)]
    mean = float(np.nanmean(per_query)) if value is None else value
    record = {"cell_key": f"{protocol}/{name}", "task": "t", "protocol": protocol, "estimator": name, "status": "ok",
              "headline": headline,
              "metrics": {headline: mean}, "ci": {headline: ci or [mean - 0.05, mean + 0.05]},
              "base_models": len(per_query), "ceiling": 0.9, "informative": True, "columns": [],
              "groundtruth_diagnostics": {"from_scratch": 1.0}}
    if len(per_query) > 1:
        record["per_query_by_base"] = per_query
    else:
        record["per_query"] = {headline: per_query[0]}
    return as_records([record])[0]


def test_estimators_closer_than_their_paired_interval_share_a_band_and_clearly_different_ones_do_not():
    generator = np.random.default_rng(1)
    leader = 0.6 + generator.normal(0, 0.2, (3, 100))
    close = leader - 0.005 + generator.normal(0, 0.1, (3, 100))  # 0.005 behind; the paired noise ≈ 0.006 s.e.
    far = leader - 0.2 + generator.normal(0, 0.1, (3, 100))
    floor = generator.normal(0, 0.2, (3, 100))
    records = [_record("a", leader), _record("b", close), _record("c", far), _record("random", floor)]
    bands = rank_bands(records)
    assert bands == {"a": 1, "b": 1, "c": 2, "random": 3}
    assert separation(records, bands) is None


def test_a_paired_comparison_sees_through_a_shared_query_difficulty():
    """Every estimator finds the same queries hard; a constant 0.02 lead is significant paired, though the two
    estimators' own intervals overlap widely."""
    generator = np.random.default_rng(2)
    difficulty = generator.normal(0.5, 0.3, 100)
    records = [_record("a", difficulty + 0.02 + generator.normal(0, 0.01, 100)),
               _record("b", difficulty + generator.normal(0, 0.01, 100))]
    assert rank_bands(records) == {"a": 1, "b": 2}


def test_a_column_where_the_loss_baseline_beats_every_estimator_is_not_ranked():
    generator = np.random.default_rng(3)
    records = [_record(name, generator.normal(mean, 0.05, 50), protocol="mislabel", headline="auc")
               for name, mean in (("loss", 0.95), ("if-cg", 0.9), ("tracin", 0.8), ("random", 0.5))]
    assert "loss" in separation(records, rank_bands(records))
    board = render_markdown([*records, _record("x", [0.1, 0.2], protocol="other", headline="auc")])
    section = board[board.index("## t · mislabel") :]
    assert "does not separate" in section.splitlines()[0]
    assert "| – | `if-cg` |" in section and "| 1 |" not in section.split("## t · other")[0]


def test_a_column_where_every_estimator_ties_with_the_leader_does_not_separate():
    generator = np.random.default_rng(4)
    shared = generator.normal(0.5, 0.3, 40)
    records = [_record(name, shared + generator.normal(0, 0.2, 40)) for name in ("a", "b", "c")]
    records.append(_record("random", generator.normal(0, 0.3, 40)))
    bands = rank_bands(records)
    assert {bands[n] for n in "abc"} == {1} and bands["random"] > 1
    assert "every estimator" in separation(records, bands)


def test_estimators_that_agree_on_every_query_are_one_quantity():
    generator = np.random.default_rng(5)
    exact = generator.normal(0.9, 0.05, 100)
    records = [_record("if-exact", exact), _record("if-cg", exact + 1e-5), _record("group-if-1", exact - 2e-4),
               _record("if-lissa", exact - 0.01)]
    assert agreeing(records) == {"if-exact": "if-cg", "group-if-1": "if-cg"}  # under the highest of them


def test_the_overview_gives_one_aggregate_per_kind_of_ground_truth():
    """A deep estimator without a convex value still gets its from-scratch score; the kinds are never averaged."""
    generator = np.random.default_rng(6)

    def column(task, protocol, diagnostics, values, ceiling):
        found = []
        for name, mean in values.items():
            record = _record(name, generator.normal(mean, 0.05, 60), protocol=protocol, headline="lds")
            found.append(dataclasses.replace(
                record, task=task, ceiling=ceiling, groundtruth_diagnostics=diagnostics,
                protocol_config={"retrain": "warm", "warm_epochs": 1.0, "warm_lr_factor": 0.1}))
        return found

    records = [*column("convex", "loo", {"exact_retraining": 1.0}, {"a": 0.9, "b": 0.3, "random": 0.0}, 1.0),
               *column("deep", "lds-scratch", {"from_scratch": 1.0}, {"a": 0.2, "b": 0.4, "c": 0.6, "random": 0.0}, 0.8),
               *column("deep", "lds", {"warm_steps": 30.0}, {"a": 0.7, "b": 0.6, "c": 0.3, "random": 0.0}, 0.9),
               *column("deep", "group", {"warm_steps": 30.0}, {"a": 0.5, "b": 0.5, "c": 0.5, "random": 0.0}, 0.9)]
    lines = render_markdown(records).splitlines()
    assert any(line.endswith("Shown but not aggregated (not ranked, or no noise ceiling on their headline): "
                             "deep · group.") for line in lines)  # every estimator in band 1: does not separate
    start = lines.index("## Overview")
    header = lines[start + 4]
    assert header.startswith("| estimator | score / ceiling: from scratch (deep) | score / ceiling: fine-tune response "
                             "(deep) | score / ceiling: exact (convex) |")
    table = [line for line in lines[start:lines.index("## Quality versus cost")] if line.startswith("| `")]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:5]] for row in table}
    assert [row.split("|")[1].strip() for row in table][:3] == ["`c`", "`b`", "`a`"]  # by the from-scratch score
    assert cells["`c`"][2] == "–" and cells["`c`"][0] != "–"  # no convex value, still a deep score
    assert abs(float(cells["`a`"][2]) - 0.9) < 0.03 and abs(float(cells["`a`"][0]) - 0.25) < 0.05
    assert "## deep · lds-scratch · from scratch" in lines and "## deep · lds · fine-tune response" in lines


def test_bands_never_rise_down_the_column():
    """c is consistently 0.02 behind a (significant, paired); b is lower still on average but so noisy that it is
    not significantly behind a. Compared with the column's leader alone, b would get band 1 below c's band 2."""
    generator = np.random.default_rng(7)
    shared = generator.normal(0.5, 0.2, 100)
    records = [_record("a", shared + 0.10 + generator.normal(0, 0.005, 100)),
               _record("c", shared + 0.08 + generator.normal(0, 0.005, 100)),
               _record("b", shared + 0.07 + generator.normal(0, 0.3, 100))]
    assert rank_bands(records) == {"a": 1, "c": 2, "b": 2}


def test_the_t_quantiles_the_report_takes_without_scipy_stats_are_scipy_stats_own():
    """The interval and the scaling slope use scipy.special.stdtrit and closed-form least squares so that
    rendering does not import scipy.stats; both must equal scipy.stats' answers (float64 rounding only)."""
    import scipy.stats

    from bench.scaling_report import fit_slope

    values, errors = [0.61, 0.47, 0.70, 0.52], [0.02, 0.03, 0.01, 0.02]
    t = scipy.stats.t.ppf(0.975, len(values) - 1)
    between = t * np.std(values, ddof=1) / np.sqrt(len(values))
    half = np.hypot(between, Z95 * np.sqrt(np.mean(np.square(errors))))
    assert random_effects_interval(values, errors) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    rng = np.random.default_rng(0)
    xs = [100.0, 200.0, 400.0, 800.0, 1600.0]
    ys = [3.0 * x**1.4 * f for x, f in zip(xs, rng.uniform(0.8, 1.25, len(xs)), strict=True)]
    slope, reference = fit_slope(xs, ys), scipy.stats.linregress(np.log(xs), np.log(ys))
    reference_half = scipy.stats.t.ppf(0.975, len(xs) - 2) * reference.stderr
    assert slope.slope == pytest.approx(reference.slope, rel=1e-12)
    assert slope.intercept == pytest.approx(reference.intercept, rel=1e-12)
    assert (slope.low, slope.high) == pytest.approx((reference.slope - reference_half, reference.slope + reference_half))
