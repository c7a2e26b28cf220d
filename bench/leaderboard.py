"""Render results records as a markdown leaderboard (tables) with optional figures.

It only formats: protocols declare their metrics (titles, direction) and each
record carries its ground truth's ceiling and whether the cell is informative.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.metrics import INFORMATIVE_CEILING, metric_title
from bench.pooling import pool_base_models
from bench.store import ResultsStore

DEFAULT_COLUMNS = ("spearman", "kendall", "top_k_overlap")
#: Headline values equal to this many decimals (as shown) share a rank.
RANK_DECIMALS = 3

Key = tuple[str, str]
#: The figures key of the quality-versus-cost figure.
QUALITY_AND_COST: Key = ("", "quality-and-cost")


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _seconds(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _count(value: Any) -> str:
    """A parameter count: 7,850 · 1.8 M."""
    if value is None:
        return "–"
    return f"{value / 1e6:.1f} M" if value >= 1e6 else f"{int(value):,}"


def _with_ci(record: dict[str, Any], name: str) -> str:
    mean = record.get("metrics", {}).get(name)
    low, high = (record.get("ci", {}).get(name) or [None, None])[:2]
    if mean is None:
        return "–"
    return f"{_num(mean)} ({_num(low)} – {_num(high)})" if low is not None else _num(mean)


def headline_of(record: dict[str, Any]) -> str:
    """The protocol's headline metric of a record."""
    return record.get("headline", "pearson")


_headline = headline_of


def _columns(record: dict[str, Any]) -> list[str]:
    return list(record.get("columns", DEFAULT_COLUMNS))


def _title(record: dict[str, Any], name: str) -> str:
    """The protocol's title for a metric, marked ↓ where lower is better."""
    spec = record.get("metric_specs", {}).get(name, {})
    title = spec.get("title", metric_title(name, record.get("top_k", 10)))
    return title if spec.get("higher_is_better", True) else f"{title} ↓"


def _value(record: dict[str, Any]) -> float | None:
    value = record.get("metrics", {}).get(_headline(record))
    return value if record.get("status") == "ok" and value is not None and math.isfinite(value) else None


def _sort_key(record: dict[str, Any]) -> tuple[int, float, str]:
    value = _value(record)
    return (0 if value is not None else 1, -(value if value is not None else 0.0), record["estimator"])


def _informative(record: dict[str, Any]) -> bool:
    return bool(record.get("informative", True))


def shared_ranks(records: list[dict[str, Any]]) -> dict[str, int]:
    """Competition ranks (1, 1, 3, …) of the ok records by headline; equal as shown → equal rank."""
    ranks: dict[str, int] = {}
    previous, rank = None, 0
    for position, record in enumerate(r for r in sorted(records, key=_sort_key) if _value(r) is not None):
        shown = round(_value(record), RANK_DECIMALS)
        if shown != previous:
            rank, previous = position + 1, shown
        ranks[record["estimator"]] = rank
    return ranks


def _not_applicable(record: dict[str, Any]) -> bool:
    """Not applicable because the estimator lacks what the protocol needs (listed once, below the table)."""
    return record.get("status") == "not-applicable" and record.get("reason", "capability") == "capability"


def _variants_paragraph(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per estimator variant: which estimator it is and the options in which their configs differ
    (taken from the records, so a variant run without its estimator lists its whole config)."""
    variants = {r["estimator"]: r for r in rows if r.get("variant_of")}
    if not variants:
        return []
    configs = {r["estimator"]: r.get("estimator_config") or {} for r in rows}
    sentences = []
    for name, record in sorted(variants.items()):
        own, base = record.get("estimator_config") or {}, configs.get(record["variant_of"], {})
        changed = {k: v for k, v in own.items() if base.get(k, object()) != v}
        shown = ", ".join(f"{k} = {option_text(v)}" for k, v in sorted(changed.items())) or "the same options"
        sentences.append(f"`{name}` is `{record['variant_of']}` with {shown}")
    return ["*Variants* (a second configuration of an estimator, in rows of their own): "
            + "; ".join(sentences) + ".", ""]


def option_text(value: Any) -> str:
    """An option as a reader writes it: ``*`` for every parameter, lists without quotes."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_markdown(records: list[dict[str, Any]], *, figures: dict[Key, str] | None = None,
                    sections: Sequence[str] = ()) -> str:
    """The leaderboard as markdown: a header, an overview, ``sections`` (further markdown lines: the scaling
    profile, the peers' table), then one table per (task, protocol) (each cell's latest records, pooled over
    its base models)."""
    rows = pool_base_models(records)
    if not rows:
        return "\n".join(["# ifbench leaderboard", "", "No results yet: run `ifbench run` first.", "", *sections]).rstrip() + "\n"
    groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
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
        *_smoke_paragraph(rows),
        "Each estimator predicts, for every (query, training point) pair, the change in the query's loss when the "
        "point is **removed** and the model retrained (positive: the point helped). Metrics compare predictions with "
        "the retrained ground truth per query, across the columns (removed points, groups or subsets), then average "
        "over queries. On the non-convex tasks the ground truth is the mean over K retraining seeds. Brackets give "
        "95% intervals, the estimate ± 1.96 standard errors from a *two-way* bootstrap that resamples queries and "
        "columns together (every query shares the same columns).",
        "",
        "The *noise ceiling* is the best correlation a predictor that does not see the retraining noise can expect "
        "against that K-seed mean: √ρ_K, with ρ_K = K·r / (1 + (K−1)·r) the Spearman–Brown reliability of the mean "
        "and r the agreement between two seeds (per query and column block, then averaged as the headline is; for "
        "LDS, a rank correlation, the same formula is an approximation). An oracle that knows the noise-free effect "
        "reaches it, so no estimator can be expected to beat it. On exact (convex) ground truth it is 1. A cell is "
        f"*uninformative* when its ceiling's lower bound is below {INFORMATIVE_CEILING}: the retraining noise leaves too "
        "little signal to rank estimators, and they are listed unranked. Estimators whose headline agrees to the "
        f"{RANK_DECIMALS} decimals shown share a rank. ↓ marks a metric where lower is better.",
        "",
        *_base_models_paragraph(rows),
        "*params* is how many of the model's parameters the estimator works on (the task's suggested subset, the "
        "last layer, unless the estimator covers more). *fit s* and *score s* are wall-clock seconds of the "
        "estimator's own work (metrics are timed apart, and so are the frozen features a head-only estimator works on, "
        "computed once per model for all estimators). "
        "*own MB* is what the estimator added to the process's resident memory: its peak during fit and score above "
        "the resident size before its fit (on CUDA: the peak CUDA allocation); *process MB* is the peak resident size "
        "meanwhile of the process that ran the cell (by default a worker per task, holding the task's data, model and "
        "ground truths besides the estimator). Resident size is sampled every 5 ms; memory the process already held "
        "and reuses adds nothing to *own MB*.",
        "",
        *_variants_paragraph(rows),
    ]
    if len(groups) > 1:
        lines += render_overview(groups)
        lines += render_quality_and_cost(groups, (figures or {}).get(QUALITY_AND_COST))
    lines += sections
    for (task, protocol), group in groups.items():
        group.sort(key=_sort_key)
        lines += _section(task, protocol, group, (figures or {}).get((task, protocol)))
    return "\n".join(lines).rstrip() + "\n"


def _smoke_paragraph(rows: list[dict[str, Any]]) -> list[str]:
    """A warning above everything when some cells ran at a task's ``smoke`` preset."""
    smoke = sorted({r["task"] for r in rows if r.get("preset") == "smoke"})
    if not smoke:
        return []
    return [f"**Smoke sizes, not a ranking.** {', '.join(smoke)} ran at the `smoke` preset, sized to check that every "
            "path of the pipeline runs, in minutes. With so few queries and columns the intervals are wide and a score "
            "can land above its noise ceiling by chance (the ceiling is an estimate too): read these tables as a check "
            "that the suite works, not as evidence about the estimators. The `default` suite is sized to rank.", ""]


def _facts(head: dict[str, Any]) -> list[str]:
    """The task's facts, then those the protocol gave its ground truth, then its cost."""
    diagnostics, gt = head.get("task_diagnostics", {}), head.get("groundtruth_diagnostics", {})
    facts = [f"preset `{head.get('preset', '?')}`"]
    several = (head.get("base_models") or 1) > 1
    if several:
        facts.append(f"{head['base_models']} base models (θ̂ trained from independent seeds; values are their mean, "
                     "ranges their lowest and highest)")
    if "test_accuracy" in diagnostics:
        low, high = diagnostics.get("test_accuracy_range") or (None, None)
        spread = f" ({100 * low:.1f}–{100 * high:.1f}%)" if several and low is not None else ""
        facts.append(f"test accuracy {100 * diagnostics['test_accuracy']:.1f}%{spread}")
    facts += head.get("facts", [])
    if gt.get("seconds") is not None:
        workers = int(gt.get("retrain_workers") or 1)
        facts.append(f"ground truth took {_seconds(gt['seconds'])} s" + (" in all" if several else "")
                     + (f" (retrains on {workers} workers)" if workers > 1 else ""))
    return facts


def _section(task: str, protocol: str, group: list[dict[str, Any]], figure: str | None) -> list[str]:
    head = group[0]
    gt = head.get("groundtruth_diagnostics", {})
    top_k = head.get("top_k", 10)
    headline, columns = _headline(head), _columns(head)
    hide_top_k = (head.get("n_columns") or top_k + 1) <= top_k  # trivially 1: every column is in the top k
    informative = _informative(head)
    ci_note = " (95% CI)" if any(r.get("ci", {}).get(headline) for r in group) else ""
    spread = any((r.get("base_models") or 1) > 1 for r in group)  # a column: the headline's range over base models
    lines = [f"## {task} · {protocol}" + ("" if informative else " (uninformative)"), "", "; ".join(_facts(head)) + "."]
    if not informative:
        low = (gt.get(f"ceiling_{headline}_ci") or [None])[0]
        lines += ["", f"**Uninformative:** the noise ceiling's lower bound ({_num(low)}) is below {INFORMATIVE_CEILING}; "
                  "the estimators are listed by their value but not ranked."]
    lines += [
        "",
        f"| rank | estimator | {_title(head, headline)}{ci_note} | " + ("base models' range | " if spread else "")
        + " | ".join(_title(head, c) for c in columns) + " | params | fit s | score s | own MB | process MB |",
        "|---:|---|---|" + ("---|" if spread else "") + "---:|" * len(columns) + "---:|---:|---:|---:|---:|",
    ]
    if gt.get(f"ceiling_{headline}") is not None:
        low, high = gt.get(f"ceiling_{headline}_ci") or [None, None]
        lines.append(f"| – | *noise ceiling* | {_num(gt[f'ceiling_{headline}'])} ({_num(low)} – {_num(high)}) | "
                     + (" | " if spread else "") + " | " * len(columns) + " | | | | |")
    ranks = shared_ranks(group) if informative else {}
    for record in group:
        profile = record.get("profile") or {}
        if record.get("status") == "ok":
            m = dict(record.get("metrics", {}))
            if hide_top_k:
                m["top_k_overlap"] = None
            own = profile.get("peak_cuda_mb") or profile.get("own_mem_mb")
            lines.append(
                f"| {ranks.get(record['estimator'], '–')} | `{record['estimator']}` | {_with_ci(record, headline)} | "
                + (f"{_spread(record, headline)} | " if spread else "")
                + " | ".join(_num(m.get(c)) for c in columns)
                + f" | {_count((record.get('estimator_diagnostics') or {}).get('n_parameters'))}"
                + f" | {_seconds(profile.get('fit_s'))} | {_seconds(profile.get('score_s'))} | {_num(own, 0)} "
                f"| {_num(profile.get('peak_mem_mb'), 0)} |"
            )
        elif _not_applicable(record):
            continue  # listed once below the table
        else:
            error = str(record.get("error") or "").replace("|", "\\|").splitlines()[0][:160]
            lines.append(f"| – | `{record['estimator']}` | {record.get('status')}: {error} |"
                         + " |" * (len(columns) + 5 + spread))
    lines.append("")
    skipped = [r["estimator"] for r in group if _not_applicable(r)]
    if skipped:
        needs = str(next(r for r in group if r["estimator"] == skipped[0])["error"]).split(";")[0]
        lines += [f"Not applicable ({needs}): " + ", ".join(f"`{name}`" for name in skipped) + ".", ""]
    if figure:
        lines += [f"![{task} {protocol}: predicted vs actual]({figure})", ""]
    return lines


def _spread(record: dict[str, Any], name: str) -> str:
    """A metric's lowest and highest base model: ``0.412 – 0.455``."""
    low, high = (record.get("spread", {}).get(name) or [None, None])[:2]
    return f"{_num(low)} – {_num(high)}" if low is not None else "–"


def _base_models_paragraph(rows: list[dict[str, Any]]) -> list[str]:
    """How cells repeated over several base models are pooled (only when some are)."""
    counts = sorted({r["base_models"] for r in rows if (r.get("base_models") or 1) > 1})
    if not counts:
        return []
    return [
        f"On the non-convex tasks each cell is repeated on {' or '.join(map(str, counts))} *base models*: θ̂ trained "
        "from independent seeds on the same data, the estimator fitted and the ground truth retrained around each. "
        "A cell's metrics, noise ceiling and costs are the means over its base models; its interval is the mean ± "
        "1.96·√(Σ se²)/M, combining the base models' bootstrap standard errors (the uncertainty from queries and "
        "columns given these base models), and the *base models' range* column gives the lowest and highest base "
        "model, the spread a single θ̂ would leave. Ranks, the uninformative rule and the overview use the means.",
        "",
    ]


def _aggregate_columns(groups: dict[Key, list[dict[str, Any]]]) -> list[Key]:
    """Informative columns whose headline has a ceiling (correlations against retrained ground truth)."""
    return [key for key, group in groups.items()
            if _informative(group[0]) and group[0].get("ceiling") not in (None, 0)]


def render_overview(groups: dict[Key, list[dict[str, Any]]]) -> list[str]:
    """Estimators × (task, protocol): each cell's headline and shared rank; rows by mean fraction of the ceiling."""
    keys = list(groups)
    estimators = sorted({r["estimator"] for group in groups.values() for r in group})
    aggregated = _aggregate_columns(groups)
    values: dict[tuple[str, Key], str] = {}
    fractions: dict[str, list[float]] = defaultdict(list)
    for key, group in groups.items():
        ranks = shared_ranks(group) if _informative(group[0]) else {}
        for record in group:
            value = _value(record)
            if value is not None:
                rank = ranks.get(record["estimator"])
                values[record["estimator"], key] = f"{_num(value)} ({rank})" if rank else _num(value)
                if key in aggregated:
                    fractions[record["estimator"]].append(value / record["ceiling"])
            else:
                values[record["estimator"], key] = "n/a" if record.get("status") == "not-applicable" else "failed"

    def aggregate(name: str) -> float | None:
        own = fractions.get(name, [])
        return sum(own) / len(own) if aggregated and len(own) == len(aggregated) else None

    def header(key: Key) -> str:
        head = groups[key][0]
        return f"{key[0]} · {key[1]} ({_title(head, _headline(head))}" + ("" if _informative(head) else ", uninformative") + ")"

    lines = [
        "## Overview",
        "",
        "Each cell: the protocol's headline metric (higher is better) and, in brackets, the estimator's rank in that "
        "column (equal values as shown share a rank; uninformative columns are not ranked); *n/a*: the estimator does "
        "not provide what the protocol needs. **Score / ceiling** is the mean, over the same "
        f"{len(aggregated)} informative columns whose headline has a noise ceiling (correlations with retrained "
        "ground truth; the ceiling is 1 on exact ground truth), of the estimator's headline divided by the ceiling; "
        "it is given only for estimators that have a value in every one of them, and rows are ordered by it. The "
        "other columns (updates, mislabel detection) are shown but not aggregated: their scales differ.",
        "",
        "| estimator | score / ceiling | " + " | ".join(header(k) for k in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]

    def order(name: str) -> tuple[int, float, str]:
        value = aggregate(name)
        return (0 if value is not None else 1, -(value or 0.0), name)

    for name in sorted(estimators, key=order):
        value = aggregate(name)
        lines.append(f"| `{name}` | {_num(value) if value is not None else '–'} | "
                     + " | ".join(values.get((name, k), "–") for k in keys) + " |")
    return [*lines, ""]


def quality_and_cost(groups: dict[Key, list[dict[str, Any]]]) -> list[tuple[str, str, float, float]]:
    """``(task, estimator, score / ceiling, seconds)``: the mean over the task's aggregated columns (see the
    overview) of headline / ceiling, for estimators with a value in each, against the cost of all of them: the
    fit (once per task; the largest recorded) plus every scoring."""
    aggregated = _aggregate_columns(groups)
    points = []
    for task in dict.fromkeys(key[0] for key in aggregated):
        columns = [key for key in aggregated if key[0] == task]
        task_records = [r for key, group in groups.items() if key[0] == task for r in group]
        for name in sorted({r["estimator"] for r in task_records}):
            own = [r for key in columns for r in groups[key] if r["estimator"] == name and _value(r) is not None]
            profiles = [r.get("profile") or {} for r in task_records if r["estimator"] == name and r.get("status") == "ok"]
            if len(own) != len(columns) or not profiles:
                continue
            seconds = max(p.get("fit_s") or 0.0 for p in profiles) + sum(p.get("score_s") or 0.0 for p in profiles)
            points.append((task, name, sum(_value(r) / r["ceiling"] for r in own) / len(own), seconds))
    return points


def render_quality_and_cost(groups: dict[Key, list[dict[str, Any]]], figure: str | None) -> list[str]:
    points = quality_and_cost(groups)
    if not points:
        return []
    tasks = list(dict.fromkeys(task for task, *_ in points))
    table = {(task, name): (quality, seconds) for task, name, quality, seconds in points}
    names = sorted({name for _, name, *_ in points}, key=lambda n: -sum(table.get((t, n), (0.0, 0.0))[0] for t in tasks))
    lines = [
        "## Quality versus cost",
        "",
        "Per task: the estimator's mean score / ceiling over that task's aggregated columns (as in the overview) and "
        "what it cost there, its fit (once) plus all its scoring, in seconds (per base model where a task has several). "
        "An estimator is on the *Pareto front* "
        "(★) when no other is both better and cheaper on that task.",
        "",
        "| estimator | " + " | ".join(f"{task}: score / ceiling · s" for task in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    front = {(task, name) for task, name, quality, seconds in points
             if not any(t == task and q > quality and s < seconds for t, _, q, s in points)}
    for name in names:
        cells = []
        for task in tasks:
            if (task, name) not in table:
                cells.append("–")
                continue
            quality, seconds = table[task, name]
            cells.append(f"{_num(quality)} · {_seconds(seconds)}" + (" ★" if (task, name) in front else ""))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("")
    if figure:
        lines += [f"![quality versus cost]({figure})", ""]
    return lines


def write_leaderboard(results_dir: Path, out: Path, *, with_figures: bool = True) -> Path:
    """Render ``results_dir``'s records to ``out`` (figures in ``out``'s folder ``figures/``)."""
    store = ResultsStore(results_dir)
    records = store.records()
    figures: dict[Key, str] = {}
    out = Path(out)
    if with_figures and records:
        from bench.figures import quality_versus_cost, scatter_best

        latest, folder = pool_base_models(records), out.parent / "figures"
        for (task, protocol), path in scatter_best(store, latest, folder).items():
            figures[(task, protocol)] = str(path.relative_to(out.parent))
        groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
        for record in latest:
            groups[(record["task"], record["protocol"])].append(record)
        path = quality_versus_cost(quality_and_cost(groups), folder)
        if path is not None:
            figures[QUALITY_AND_COST] = str(path.relative_to(out.parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [*_profile_section(results_dir, out, with_figures), *_peers_section(results_dir)]
    out.write_text(render_markdown(records, figures=figures, sections=sections))
    return out


def _peers_section(results_dir: Path) -> list[str]:
    """The peer implementations' section when ``ifbench peers`` wrote its measurements into the results folder."""
    from bench import peers

    loaded = peers.load(results_dir)
    return peers.render(*loaded) if loaded is not None else []


def _profile_section(results_dir: Path, out: Path, with_figures: bool) -> list[str]:
    """The scaling section when ``ifbench profile`` wrote its measurements into the results folder."""
    from bench import scaling

    loaded = scaling.load(results_dir)
    if loaded is None:
        return []
    points, payload = loaded
    paths = scaling.figure(points, out.parent / "figures") if with_figures else []
    return scaling.render(points, payload, [str(p.relative_to(out.parent)) for p in paths])
