"""Render results records as a markdown leaderboard (tables) with optional figures."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.store import ResultsStore

MAIN_METRIC = "pearson"


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


def _sort_key(record: dict[str, Any]) -> tuple[int, float, str]:
    value = record.get("metrics", {}).get(MAIN_METRIC)
    ok = record.get("status") == "ok" and value is not None
    return (0 if ok else 1, -(value if ok else 0.0), record["estimator"])


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
    for (task, protocol), group in groups.items():
        group.sort(key=_sort_key)
        lines += _section(task, protocol, group, (figures or {}).get((task, protocol)))
    return "\n".join(lines).rstrip() + "\n"


def _section(task: str, protocol: str, group: list[dict[str, Any]], figure: str | None) -> list[str]:
    head = group[0]
    diagnostics = head.get("task_diagnostics", {})
    gt = head.get("groundtruth_diagnostics", {})
    top_k = head.get("top_k", 10)
    facts = [f"preset `{head.get('preset', '?')}`"]
    if "test_accuracy" in diagnostics:
        facts.append(f"test accuracy {100 * diagnostics['test_accuracy']:.1f}%")
    facts.append(f"{head.get('n_queries', '?')} queries × {head.get('n_columns', '?')} removed points")
    if gt.get("seeds", 1) > 1:
        facts.append(f"{int(gt['seeds'])} retraining seeds")
    if gt.get("max_retrain_grad_norm") is not None:
        facts.append(f"retrains converged to ‖∇J‖ ≤ {gt['max_retrain_grad_norm']:.1e}")
    if gt.get("seconds") is not None:
        facts.append(f"ground truth took {_seconds(gt['seconds'])} s")
    lines = [
        f"## {task} · {protocol}",
        "",
        "; ".join(facts) + ".",
        "",
        f"| rank | estimator | Pearson (95% CI) | Spearman | Kendall | top-{top_k} overlap | fit s | score s | peak MB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    if gt.get("ceiling_pearson") is not None:
        low, high = gt.get("ceiling_pearson_ci") or [None, None]
        lines.append(
            f"| – | *noise ceiling* | {_num(gt['ceiling_pearson'])} ({_num(low)} – {_num(high)}) | "
            f"{_num(gt.get('ceiling_spearman'))} | {_num(gt.get('ceiling_kendall'))} | "
            f"{_num(gt.get('ceiling_top_k_overlap') if (head.get('n_columns') or top_k + 1) > top_k else None)}"
            " | | | |"
        )
    rank = 0
    for record in group:
        profile = record.get("profile") or {}
        if record.get("status") == "ok":
            rank += 1
            m = dict(record.get("metrics", {}))
            if (record.get("n_columns") or top_k + 1) <= top_k:
                m["top_k_overlap"] = None  # trivially 1: every column is in the top k
            peak = profile.get("peak_cuda_mb") or profile.get("peak_mem_mb")
            lines.append(
                f"| {rank} | `{record['estimator']}` | {_with_ci(record, 'pearson')} | {_num(m.get('spearman'))} | "
                f"{_num(m.get('kendall'))} | {_num(m.get('top_k_overlap'))} | {_seconds(profile.get('fit_s'))} | "
                f"{_seconds(profile.get('score_s'))} | {_num(peak, 0)} |"
            )
        else:
            error = str(record.get("error") or "").replace("|", "\\|").splitlines()[0][:160]
            lines.append(f"| – | `{record['estimator']}` | {record.get('status')}: {error} | | | | | | |")
    lines.append("")
    if figure:
        lines += [f"![{task} {protocol}: predicted vs actual]({figure})", ""]
    return lines


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
