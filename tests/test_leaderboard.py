"""The leaderboard renders from a fixed set of records exactly as the golden file says.

Regenerate after an intended change with ``IFBENCH_UPDATE_GOLDEN=1 pytest tests/test_leaderboard.py``.
"""

import dataclasses
import os
import shutil
from pathlib import Path

from bench.cli import main
from bench.leaderboard import render_markdown
from bench.store import ResultsStore

GOLDEN = Path(__file__).parent / "golden"


def test_markdown_matches_golden_file():
    markdown = render_markdown(ResultsStore(GOLDEN).records(), figures={("mnist-logreg", "loo"): "figures/x.png"})
    expected = GOLDEN / "leaderboard.md"
    if os.environ.get("IFBENCH_UPDATE_GOLDEN"):
        expected.write_text(markdown)
    assert markdown == expected.read_text()


def test_ranking_latest_records_and_failures():
    lines = render_markdown(ResultsStore(GOLDEN).records()).splitlines()
    first_section = lines.index("## mnist-logreg · loo · exact")
    rows = [line for line in lines[first_section:] if line.startswith("| ") and "rank" not in line]
    assert rows[0].startswith("| 1 | `if-exact`") and rows[1].startswith("| 2 | `if-lissa`")
    assert rows[2].startswith("| 3 | `random` | 0.020")  # the later of two records for one cell
    assert rows[3].startswith("| – | `if-cg` | failed: score failed: RuntimeError: a \\| b |")


def test_cli_writes_leaderboard_with_figure(tmp_path, toy):
    # a real results folder: records plus the artifact the figure is drawn from
    import numpy as np

    results = tmp_path / "results"
    shutil.copytree(GOLDEN, results, ignore=shutil.ignore_patterns("*.md"))
    ResultsStore(results).save_artifact("k2", np.asarray(toy.actual, dtype=np.float32), np.asarray(toy.actual, dtype=np.float32))
    out = tmp_path / "board" / "README.md"
    assert main(["leaderboard", "--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "![mnist-logreg loo: predicted vs actual](figures/mnist-logreg--loo.png)" in text
    assert (out.parent / "figures" / "mnist-logreg--loo.png").stat().st_size > 1000


def test_leaderboard_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["leaderboard", "--results", str(tmp_path), "--out", str(tmp_path / "x.md")]) == 2
    assert "run `ifbench run` first" in capsys.readouterr().err


def test_cli_publishes_only_the_records_shown(tmp_path):
    import json

    results = tmp_path / "results"
    shutil.copytree(GOLDEN, results, ignore=shutil.ignore_patterns("*.md"))
    out = tmp_path / "board" / "README.md"
    assert main(["leaderboard", "--results", str(results), "--out", str(out), "--no-figures", "--records"]) == 0
    published = [json.loads(line) for line in (out.parent / "records.jsonl").read_text().splitlines()]
    assert len(published) == 10  # eleven records, two of them for one cell
    assert [r["metrics"]["pearson"] for r in published if r["estimator"] == "random" and r["protocol"] == "loo"] == [0.02]
    assert not (out.parent / "profile.json").exists() and "## Scaling profile" not in out.read_text()

    from bench import scaling

    scaling.save([scaling.Point("grad-dot", "n", 250, 7850, 0.01, 0.02, 5.0, repeats=3, n_queries=10)],
                 scaling.SweepConfig(), results)
    assert main(["leaderboard", "--results", str(results), "--out", str(out), "--no-figures", "--records"]) == 0
    assert (out.parent / "profile.json").read_text() == (results / "profile.json").read_text()  # its measurements
    assert "## Scaling profile" in out.read_text()


def test_top_k_overlap_is_hidden_when_trivial():
    records = [dataclasses.replace(r, n_columns=4) for r in ResultsStore(GOLDEN).records()]
    rows = [line for line in render_markdown(records).splitlines() if line.startswith("| 1 |")]
    assert rows and all(row.split("|")[6].strip() == "–" for row in rows)


def test_overview_aggregates_only_ranked_columns_and_orders_by_fraction_of_ceiling():
    lines = render_markdown(ResultsStore(GOLDEN).records()).splitlines()
    start = lines.index("## Overview")
    table = [line for line in lines[start:lines.index("## Quality versus cost")] if line.startswith("| `")]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in table}
    # one aggregate: the exact (convex) kind, over mnist-logreg · loo (ceiling 1); loo-warm's two estimators tie
    # (it does not separate) and loo-scratch is uninformative, so neither is aggregated nor ranked
    assert "score / ceiling: exact (convex)" in lines[start + 4] and "fine-tune" not in lines[start + 4]
    assert cells["`if-exact`"][0] == "0.980" and cells["`if-lissa`"][0] == "0.950"
    assert [row.split("|")[1].strip() for row in table] == ["`if-exact`", "`if-lissa`", "`random`", "`if-cg`"]
    assert cells["`if-exact`"][3] == cells["`if-lissa`"][3] == "0.300"  # does not separate: unranked
    assert cells["`if-exact`"][1] == "0.980 (1)" and cells["`random`"][1] == "0.020 (3)"  # bands 1, 2, 3
    assert cells["`if-exact`"][4] == "0.100"  # the uninformative column is not ranked
    assert cells["`if-cg`"][0] == "–" and cells["`if-cg`"][1] == "failed"  # no aggregate without every column


def test_uninformative_sections_say_so_and_rank_nothing():
    lines = render_markdown(ResultsStore(GOLDEN).records()).splitlines()
    start = lines.index("## mnist-resnet · loo-scratch · from scratch (uninformative)")
    section = lines[start:]
    assert any(line.startswith("**Uninformative:** the noise ceiling's lower bound (0.050) is below 0.2") for line in section)
    rows = [line for line in section if line.startswith("| ") and "`" in line]
    assert rows and all(row.startswith("| – |") for row in rows)
    warm = lines[lines.index("## mnist-resnet · loo-warm · fine-tune response (does not separate)"):start]
    assert "| – | *noise ceiling* | 0.500 (0.400 – 0.600) |" in "\n".join(warm)
    assert any("scored against the mean of 2 retraining seeds (seed-vs-seed agreement r = 0.330)" in line for line in warm)


def test_quality_and_cost_marks_the_pareto_front():
    """An estimator is starred when no other is both better (score / ceiling) and cheaper (fit + scores)."""
    def record(name, value, fit_s, score_s, protocol="loo"):
        return {"cell_key": f"{protocol}/{name}", "task": "t", "protocol": protocol, "estimator": name, "status": "ok",
                "headline": "pearson",
                "metrics": {"pearson": value}, "ceiling": 0.5, "informative": True,
                "profile": {"fit_s": fit_s, "score_s": score_s}}

    records = [record("a", 0.45, 8.0, 1.0), record("b", 0.25, 0.5, 0.5), record("c", 0.2, 4.0, 1.0),
               record("a", 0.35, 8.0, 2.0, "lds"), record("b", 0.25, 0.5, 0.5, "lds"), record("c", 0.1, 4.0, 1.0, "lds")]
    lines = render_markdown(records).splitlines()
    rows = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in lines[lines.index("## Quality versus cost"):]
            if row.startswith("| `")}
    # a: mean(0.45/0.5, 0.35/0.5) = 0.8 at 8 + 1 + 2 s (one fit, both scorings)
    assert rows == {"`a`": "0.800 · 11 ★", "`b`": "0.500 · 1.50 ★", "`c`": "0.300 · 6.00"}


def test_a_configured_limit_is_shown_as_over_a_limit_not_as_not_applicable():
    """A cap (max_parameters) that refused a method is named as such, in the section and the overview."""
    def record(name, protocol, **fields):
        return {"cell_key": f"{protocol}/{name}", "task": "t", "protocol": protocol, "estimator": name,
                "headline": "pearson", "ceiling": 1.0, "groundtruth_diagnostics": {"exact_retraining": 1.0}, **fields}

    capped = {"status": "not-applicable", "reason": "limit", "limit": "max_parameters = 500,000",
              "error": "1,773,698 parameters in the covered layers exceed max_parameters=500,000"}
    lacking = {"status": "not-applicable", "reason": "capability", "error": "loo needs single; x provides group"}
    records = [record(name, protocol, status="ok", metrics={"pearson": value}, ci={"pearson": [value - .1, value + .1]})
               for protocol in ("loo", "lds") for name, value in (("a", 0.9), ("b", 0.5))]
    records += [record("ekfac", p, **capped) for p in ("loo", "lds")] + [record("x", p, **lacking) for p in ("loo", "lds")]
    board = render_markdown(records)
    assert "| – | `ekfac` | over a limit (max_parameters = 500,000): 1,773,698 parameters" in board
    overview = [line for line in board.splitlines() if line.startswith("| `ekfac`") or line.startswith("| `x`")]
    assert "over limit" in overview[0] and "n/a" not in overview[0] and "n/a" in overview[1]
    assert "Not applicable (loo needs single): `x`." in board


def test_an_ensemble_states_its_models_and_their_training_from_its_records():
    """The *Ensembles* line reads each ensemble's size, its independently trained members and their training
    time from the records (means over base models), and is absent when no estimator trained members."""
    def record(name, base_model, diagnostics):
        return {"cell_key": f"lds/{name}/{base_model}", "task": "t", "protocol": "lds", "estimator": name,
                "base_model": base_model, "headline": "pearson", "ceiling": 1.0, "status": "ok",
                "groundtruth_diagnostics": {"exact_retraining": 1.0}, "metrics": {"pearson": 0.5},
                "ci": {"pearson": [0.4, 0.6]}, "estimator_diagnostics": diagnostics}

    ensemble = [record("trak-ens", b, {"models": 5.0, "independent_models": 4.0, "ensemble_training_s": s})
                for b, s in ((0, 40.0), (1, 50.0))]
    single = [record("trak", b, {"models": 1.0, "independent_models": 0.0}) for b in (0, 1)]
    board = render_markdown(ensemble + single)
    assert ("*Ensembles*: `trak-ens` on t: 5 models, 4 of them trained by θ̂'s recipe from their own seeds in the fit "
            "(on average 45 s of training per base model, counted in its fit time).") in board
    assert "*Ensembles*" not in render_markdown(single)
