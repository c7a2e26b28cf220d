"""Render results records as a markdown leaderboard (tables) with optional figures."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.store import ResultsStore

MAIN_METRIC = "pearson"
DEFAULT_COLUMNS = ("spearman", "kendall", "top_k_overlap")


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _seconds(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _with_ci(record: dict[str, Any], name: str) -> str:
    mean = record.get("metrics", {}).get(name)
    low, high = (record.get("ci", {}).get(name) or [None, None])[:2]
    if mean is None:
        return "–"
    return f"{_num(mean)} ({_num(low)} – {_num(high)})" if low is not None else _num(mean)


def select_latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each (task, protocol, estimator), in first-seen order."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for record in records:
        latest[(record["task"], record["protocol"], record["estimator"])] = record
    return list(latest.values())


def _headline(record: dict[str, Any]) -> str:
    return record.get("headline", MAIN_METRIC)


def _columns(record: dict[str, Any]) -> list[str]:
    return list(record.get("columns", DEFAULT_COLUMNS))


def _sort_key(record: dict[str, Any]) -> tuple[int, float, str]:
    value = record.get("metrics", {}).get(_headline(record))
    ok = record.get("status") == "ok" and value is not None and math.isfinite(value)
    return (0 if ok else 1, -(value if ok else 0.0), record["estimator"])


def _title(name: str, top_k: int) -> str:
    return {"pearson": "Pearson", "spearman": "Spearman", "kendall": "Kendall", "top_k_overlap": f"top-{top_k} overlap",
            "lds": "LDS", "auc": "AUC", "f1": "F1", "param_distance": "‖θ−θ_R‖ rel."}.get(name, name)


def figure_name(task: str, protocol: str) -> str:
    return f"{task}--{protocol}.png"


def render_markdown(records: list[dict[str, Any]], *, figures: dict[tuple[str, str], str] | None = None) -> str:
    """The leaderboard as markdown: a header, then one table per (task, protocol)."""
    rows = select_latest(records)
    if not rows:
        return "# ifbench leaderboard\n\nNo results yet: run `ifbench run` first.\n"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in rows:
        groups[(record["task"], record["protocol"])].append(record)
    first = rows[0]
    commits = sorted({r.get("git_commit", "unknown") for r in rows})
    versions = first.get("versions", {})
    lines = [
        "# ifbench leaderboard",
        "",
        f"Suite `{first.get('suite', '?')}` · seed {first.get('seed', '?')} · {first.get('threads', '?')} threads · "
        f"{first.get('device', '?')} · commit {', '.join(commits)} · "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if k in ("python", "torch", "numpy", "scipy")),
        "",
        "Each estimator predicts, for every (query, training point) pair, the change in the query's loss when the "
        "point is **removed** and the model retrained (positive: the point helped). Metrics compare predictions with "
        "the retrained ground truth per query, across the removed points, then average over queries; brackets give "
        "bootstrap 95% confidence intervals over queries. Time is wall-clock seconds; memory is the peak resident "
        "set size of the process during fit or score (on CUDA: the peak CUDA allocation). The *noise ceiling* is "
        "the same metric between two ground truths that differ only in retraining seed: no estimator can be "
        "expected to beat it.",
        "",
    ]
    if len(groups) > 1:
        lines += render_overview(groups)
    for (task, protocol), group in groups.items():
        group.sort(key=_sort_key)
        lines += _section(task, protocol, group, (figures or {}).get((task, protocol)))
    return "\n".join(lines).rstrip() + "\n"


def _facts(head: dict[str, Any]) -> list[str]:
    diagnostics = head.get("task_diagnostics", {})
    gt = head.get("groundtruth_diagnostics", {})
    facts = [f"preset `{head.get('preset', '?')}`"]
    if "test_accuracy" in diagnostics:
        facts.append(f"test accuracy {100 * diagnostics['test_accuracy']:.1f}%")
    noun = head.get("column_noun", "removed points")
    if "changed_points" in gt:
        facts.append(f"{int(gt['changed_points'])} training points {'removed' if noun == 'removed class' else 'relabelled'}")
    elif "ranked" not in gt:
        facts.append(f"{head.get('n_queries', '?')} queries × {head.get('n_columns', '?')} {noun}")
    if gt.get("seeds", 1) > 1:
        facts.append(f"{int(gt['seeds'])} retraining seeds")
    if gt.get("warm_steps") is not None:
        facts.append(f"warm-started retrains of {int(gt['warm_steps'])} steps")
    if gt.get("max_retrain_grad_norm") is not None:
        facts.append(f"retrains converged to ‖∇J‖ ≤ {gt['max_retrain_grad_norm']:.1e}")
    if gt.get("retrained_f1") is not None:
        for who, label in (("retrained", "retrained model"), ("original", "θ̂ (no update)")):
            facts.append(f"{label}: F1 {_num(gt.get(f'{who}_f1'))} (forget {_num(gt.get(f'{who}_forget'))}, "
                         f"retain {_num(gt.get(f'{who}_retain'))})")
    if gt.get("loss_ranking_auc") is not None:
        facts.append(f"{int(gt.get('flipped_ranked', 0))} flipped among {int(gt.get('ranked', 0))} ranked points; "
                     f"ranking by training loss: AUC {_num(gt['loss_ranking_auc'])}")
    if gt.get("seconds") is not None:
        facts.append(f"ground truth took {_seconds(gt['seconds'])} s")
    return facts


def _section(task: str, protocol: str, group: list[dict[str, Any]], figure: str | None) -> list[str]:
    head = group[0]
    gt = head.get("groundtruth_diagnostics", {})
    top_k = head.get("top_k", 10)
    headline, columns = _headline(head), _columns(head)
    hide_top_k = (head.get("n_columns") or top_k + 1) <= top_k  # trivially 1: every column is in the top k
    ci_note = " (95% CI)" if any(r.get("ci", {}).get(headline) for r in group) else ""
    lines = [
        f"## {task} · {protocol}",
        "",
        "; ".join(_facts(head)) + ".",
        "",
        f"| rank | estimator | {_title(headline, top_k)}{ci_note} | "
        + " | ".join(_title(c, top_k) for c in columns) + " | fit s | score s | peak MB |",
        "|---:|---|---|" + "---:|" * len(columns) + "---:|---:|---:|",
    ]
    if gt.get(f"ceiling_{headline}") is not None:
        low, high = gt.get(f"ceiling_{headline}_ci") or [None, None]
        cells = [_num(gt.get(f"ceiling_{c}") if not (c == "top_k_overlap" and hide_top_k) else None) for c in columns]
        lines.append(f"| – | *noise ceiling* | {_num(gt[f'ceiling_{headline}'])} ({_num(low)} – {_num(high)}) | "
                     + " | ".join(cells) + " | | | |")
    rank = 0
    for record in group:
        profile = record.get("profile") or {}
        if record.get("status") == "ok":
            rank += 1
            m = dict(record.get("metrics", {}))
            if hide_top_k:
                m["top_k_overlap"] = None
            peak = profile.get("peak_cuda_mb") or profile.get("peak_mem_mb")
            lines.append(
                f"| {rank} | `{record['estimator']}` | {_with_ci(record, headline)} | "
                + " | ".join(_num(m.get(c)) for c in columns)
                + f" | {_seconds(profile.get('fit_s'))} | {_seconds(profile.get('score_s'))} | {_num(peak, 0)} |"
            )
        elif record.get("status") == "not-applicable" and "needs" in str(record.get("error")):
            continue  # listed once below the table
        else:
            error = str(record.get("error") or "").replace("|", "\\|").splitlines()[0][:160]
            lines.append(f"| – | `{record['estimator']}` | {record.get('status')}: {error} |" + " |" * (len(columns) + 3))
    lines.append("")
    skipped = [r["estimator"] for r in group if r.get("status") == "not-applicable" and "needs" in str(r.get("error"))]
    if skipped:
        needs = str(next(r for r in group if r["estimator"] == skipped[0])["error"]).split(";")[0]
        lines += [f"Not applicable ({needs}): " + ", ".join(f"`{name}`" for name in skipped) + ".", ""]
    if figure:
        lines += [f"![{task} {protocol}: predicted vs actual]({figure})", ""]
    return lines


def render_overview(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Estimators × (task, protocol): each cell's headline metric and the estimator's rank there."""
    keys = list(groups)
    estimators = sorted({r["estimator"] for group in groups.values() for r in group})
    ranks: dict[tuple[str, tuple[str, str]], int] = {}
    values: dict[tuple[str, tuple[str, str]], str] = {}
    for key, group in groups.items():
        rank = 0
        for record in sorted(group, key=_sort_key):
            if record.get("status") == "ok":
                rank += 1
                ranks[record["estimator"], key] = rank
                values[record["estimator"], key] = f"{_num(record['metrics'].get(_headline(record)))} ({rank})"
            else:
                values[record["estimator"], key] = "n/a" if record.get("status") == "not-applicable" else "failed"

    def mean_rank(name: str) -> float:
        own = [ranks[name, k] for k in keys if (name, k) in ranks]
        return sum(own) / len(own) if own else math.inf

    lines = [
        "## Overview",
        "",
        "Each cell: the protocol's headline metric (higher is better) and, in brackets, the estimator's rank "
        "in that column; *n/a*: the estimator does not provide what the protocol needs. Rows by mean rank.",
        "",
        "| estimator | mean rank | "
        + " | ".join(f"{t} · {p} ({_title(_headline(groups[t, p][0]), 10)})" for t, p in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for name in sorted(estimators, key=lambda e: (mean_rank(e), e)):
        average = mean_rank(name)
        lines.append(f"| `{name}` | {_num(average, 1) if math.isfinite(average) else '–'} | "
                     + " | ".join(values.get((name, k), "–") for k in keys) + " |")
    return [*lines, ""]


def write_leaderboard(results_dir: Path, out: Path, *, with_figures: bool = True) -> Path:
    """Render ``results_dir``'s records to ``out`` (figures in ``out``'s folder ``figures/``)."""
    store = ResultsStore(results_dir)
    records = store.records()
    figures: dict[tuple[str, str], str] = {}
    out = Path(out)
    if with_figures and records:
        from bench.figures import scatter_best

        for (task, protocol), path in scatter_best(store, select_latest(records), out.parent / "figures").items():
            figures[(task, protocol)] = str(path.relative_to(out.parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(records, figures=figures))
    return out
