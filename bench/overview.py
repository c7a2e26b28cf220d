"""The leaderboard's overview (every column, one aggregate per kind of ground truth) and quality versus cost."""

from __future__ import annotations

from collections import defaultdict

from bench.formatting import headline_of, num, seconds, title, truth_kind, value_of
from bench.ranking import ColumnJudgement
from bench.records import Profile, Record
from bench.sections import over_limit

Key = tuple[str, str]
#: Aggregates, in the order rows are sorted by: the deep headline first, then the other deep kind, then convex.
KINDS = ("from scratch", "fine-tune response", "exact", "deterministic")
KIND_TITLES = {"from scratch": "from scratch (deep)", "fine-tune response": "fine-tune response (deep)",
               "exact": "exact (convex)", "deterministic": "deterministic replay (deep)"}


def aggregate_columns(groups: dict[Key, list[Record]], judged: dict[Key, ColumnJudgement]) -> dict[str, list[Key]]:
    """``{kind: columns}``: ranked columns (informative, separating) whose headline has a ceiling, by kind."""
    found: dict[str, list[Key]] = {kind: [] for kind in KINDS}
    for key, group in groups.items():
        kind = truth_kind(group[0])
        if kind in found and judged[key].ranked:
            found[kind].append(key)
    return found


def aggregates(groups: dict[Key, list[Record]], columns: list[Key]) -> dict[str, float]:
    """Mean headline / ceiling over ``columns`` for each estimator with a value in every one of them."""
    fractions: dict[str, list[float]] = defaultdict(list)
    for key in columns:
        for record in groups[key]:
            if value_of(record) is not None:
                fractions[record.estimator].append(value_of(record) / record.ceiling)
    return {name: sum(v) / len(v) for name, v in fractions.items() if columns and len(v) == len(columns)}


def _not_aggregated(keys: list[Key], by_kind: dict[str, list[Key]]) -> str:
    """The sentence naming the columns no aggregate covers (unranked, or no ceiling on their headline)."""
    aggregated = {key for columns in by_kind.values() for key in columns}
    others = [f"{task} · {protocol}" for task, protocol in keys if (task, protocol) not in aggregated]
    if not others:
        return ""
    return (" Shown but not aggregated (not ranked, or no noise ceiling on their headline): "
            + ", ".join(others) + ".")


OVER_LIMIT_NOTE = ("; *over limit*: the method applies, a configured limit (named in the column's section) refused "
                   "the run")
UNDEFINED_NOTE = (" *undefined*: the cell ran, but its headline is not defined (a correlation with a ground truth "
                  "or scores that do not vary across its columns).")


def _cell_text(record: Record, value: float | None, band: int | None) -> str:
    if value is not None:
        return f"{num(value)} ({band})" if band else num(value)
    if over_limit(record):
        return "over limit"
    if record.status == "not-applicable":
        return "n/a"
    return "undefined" if record.status == "ok" else "failed"


def render_overview(groups: dict[Key, list[Record]], judged: dict[Key, ColumnJudgement]) -> list[str]:
    """Estimators × (task, protocol): each cell's headline and band; one score / ceiling per kind of ground truth."""
    keys = list(groups)
    by_kind = aggregate_columns(groups, judged)
    kinds = [kind for kind in KINDS if by_kind[kind]]
    scores = {kind: aggregates(groups, by_kind[kind]) for kind in kinds}
    cells: dict[tuple[str, Key], str] = {}
    for key, group in groups.items():
        for record in group:
            value, band = value_of(record), judged[key].band_of(record.estimator)
            cells[record.estimator, key] = _cell_text(record, value, band)

    def header(key: Key) -> str:
        head, state = groups[key][0], judged[key]
        flag = "" if state.ranked else (", uninformative" if not state.informative else ", does not separate")
        return f"{key[0]} · {key[1]} ({title(head, headline_of(head))}{flag})"

    counts = ", ".join(f"{len(by_kind[kind])} {kind}" for kind in kinds)
    lines = ["## Overview", "",
             "Each cell: the protocol's headline metric (higher is better) and, in brackets, the estimator's rank band "
             "in that column (uninformative columns and columns that do not separate estimators are not ranked); "
             "*n/a*: the estimator does not run there (it lacks what the protocol needs, or says it does not apply "
             "to the task; the column's section says which)" + (OVER_LIMIT_NOTE if "over limit" in cells.values()
                                                                   else "") + ". **Score / ceiling** is "
             "given once per kind of ground truth, over that kind's ranked columns whose headline has a noise "
             f"ceiling ({counts}): the mean of the estimator's headline divided by the ceiling (1 on exact ground "
             "truth), for estimators with a value in every one of those columns. Rows are ordered by the first "
             "aggregate, then the next." + _not_aggregated(keys, by_kind)
             + (UNDEFINED_NOTE if "undefined" in cells.values() else ""), "",
             "| estimator | " + " | ".join(f"score / ceiling: {KIND_TITLES[k]}" for k in kinds) + " | "
             + " | ".join(header(k) for k in keys) + " |",
             "|---|" + "---:|" * (len(kinds) + len(keys))]
    estimators = sorted({r.estimator for group in groups.values() for r in group})

    def order(name: str) -> tuple:
        return (*tuple(x for kind in kinds for x in ((0, -scores[kind][name]) if name in scores[kind] else (1, 0.0))), name)

    for name in sorted(estimators, key=order):
        lines.append(f"| `{name}` | " + " | ".join(num(scores[k].get(name)) for k in kinds) + " | "
                     + " | ".join(cells.get((name, k), "–") for k in keys) + " |")
    return [*lines, ""]


def quality_and_cost(groups: dict[Key, list[Record]],
                     judged: dict[Key, ColumnJudgement]) -> list[tuple[str, str, float, float, float, float, str]]:
    """``(task, estimator, quality, low, high, seconds, kind)``: per task, the mean headline / ceiling over its ranked
    columns of one kind (from scratch where the task has any, else exact, else fine-tune response), with the
    mean of the columns' interval bounds over the ceiling, against the cost of the estimator on the task: the fit
    (once; the largest recorded) plus every scoring. A task's deterministic columns give points of their own,
    under ``"<task> · deterministic"``, costed on those columns alone."""
    by_kind = aggregate_columns(groups, judged)
    points = []
    for task in dict.fromkeys(key[0] for key in groups):
        kind = next((k for k in ("from scratch", "exact", "fine-tune response")
                     if any(key[0] == task for key in by_kind[k])), None)
        replayed = [key for key in by_kind["deterministic"] if key[0] == task]
        task_records = [r for key, group in groups.items() if key[0] == task and key not in replayed for r in group]
        if kind is not None:
            columns = [key for key in by_kind[kind] if key[0] == task]
            points += _points(task, kind, groups, columns, task_records)
        if replayed:
            own = [r for key in replayed for r in groups[key]]
            points += _points(f"{task} · deterministic", "deterministic", groups, replayed, own)
    return points


def _points(label: str, kind: str, groups: dict[Key, list[Record]], columns: list[Key],
            costed: list[Record]) -> list[tuple[str, str, float, float, float, float, str]]:
    """One point per estimator with a value in every one of ``columns``, its cost from the ``costed`` records."""
    points = []
    for name in sorted({r.estimator for r in costed}):
        own = [r for key in columns for r in groups[key] if r.estimator == name and value_of(r) is not None]
        profiles = [r.profile or Profile() for r in costed if r.estimator == name and r.status == "ok"]
        if len(own) != len(columns) or not profiles:
            continue
        cost = max(p.fit_s or 0.0 for p in profiles) + sum(p.score_s or 0.0 for p in profiles)
        bounds = [r.ci.get(headline_of(r)) or [value_of(r)] * 2 for r in own]
        points.append((label, name, sum(value_of(r) / r.ceiling for r in own) / len(own),
                       sum(b[0] / r.ceiling for b, r in zip(bounds, own, strict=True)) / len(own),
                       sum(b[1] / r.ceiling for b, r in zip(bounds, own, strict=True)) / len(own), cost, kind))
    return points


def pareto_front(points: list[tuple]) -> set[tuple[str, str]]:
    """``(task, estimator)`` pairs that no other estimator on the task beats in both quality and cost."""
    return {(p[0], p[1]) for p in points
            if not any(q[0] == p[0] and q[2] > p[2] and q[5] < p[5] for q in points)}


def render_quality_and_cost(groups: dict[Key, list[Record]], judged: dict[Key, ColumnJudgement],
                            figure: str | None) -> list[str]:
    points = quality_and_cost(groups, judged)
    if not points:
        return []
    tasks = list(dict.fromkeys(p[0] for p in points))
    kinds = {p[0]: p[6] for p in points}
    table = {(p[0], p[1]): p for p in points}
    names = sorted({p[1] for p in points}, key=lambda n: -sum(table[t, n][2] for t in tasks if (t, n) in table))
    front = pareto_front(points)
    lines = ["## Quality versus cost", "",
             "Per task: the estimator's mean score / ceiling over that task's ranked columns of one kind of ground "
             "truth (from scratch where the task has them, else exact"
             + ("; its deterministic replay columns apart, as *task · deterministic*, costed on those columns alone"
                if "deterministic" in kinds.values() else "") + "; the kind is named in the column's title) and "
             "what it cost there, its fit (once) plus all its scoring, in seconds (per base model where a task has "
             "several). An estimator is on the *Pareto front* (★) when no other is both better and cheaper on that "
             "task; the figure draws the front and each estimator's interval (the mean of its columns' 95% bounds "
             "over the ceiling).", "",
             "| estimator | " + " | ".join(f"{task} ({kinds[task]}): score / ceiling · s" for task in tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for name in names:
        shown = []
        for task in tasks:
            point = table.get((task, name))
            shown.append("–" if point is None else
                         f"{num(point[2])} · {seconds(point[5])}" + (" ★" if (task, name) in front else ""))
        lines.append(f"| `{name}` | " + " | ".join(shown) + " |")
    lines.append("")
    if figure:
        lines += [f"![quality versus cost]({figure})", ""]
    return lines
