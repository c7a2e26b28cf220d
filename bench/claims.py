"""A method judged on what its paper claims, from the records (torch-free; the report's floor).

FastIF (Guo et al. 2021) claims that at the same influence solver, kNN preselection finds the most
influential training points at a fraction of the cost. Its zero-filled correlation over every point says
little about that; this section sets, per column, FastIF's cost against if-lissa's and both their top-k
recalls (the share of the ground truth's k most helpful points among the estimator's top k), and says
whether the two ran at the same LiSSA settings (read from their records, never assumed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bench.formatting import num, seconds, title, value_of
from bench.records import Profile, Record

Key = tuple[str, str]
#: the LiSSA fields FastIF shares with if-lissa; equal in both records means "at equal settings"
SOLVER_FIELDS = ("depth", "batch_size", "repeats", "scale", "damping", "parameters")
TOP_K = "top_k_overlap"


def cost(record: Record) -> float | None:
    """Seconds of fit plus scoring for the cell (per base model where pooled), or None where not profiled."""
    profile = record.profile or Profile()
    if profile.fit_s is None and profile.score_s is None:
        return None
    return (profile.fit_s or 0.0) + (profile.score_s or 0.0)


def settings_sentence(fast: Record, lissa: Record) -> str:
    """Whether the two records' LiSSA settings agree, naming them, or the fields in which they differ."""
    mine, theirs = fast.estimator_config, lissa.estimator_config
    differing = [f for f in SOLVER_FIELDS if mine.get(f) != theirs.get(f)]
    if differing:
        shown = "; ".join(f"{f} {mine.get(f)!r} vs {theirs.get(f)!r}" for f in differing)
        return f"at different LiSSA settings (fastif vs if-lissa: {shown})"
    return (f"at equal LiSSA settings (depth {mine.get('depth')}, batch {mine.get('batch_size')}, "
            f"repeats {mine.get('repeats')})")


def fastif_rows(groups: Mapping[Key, Sequence[Record]]) -> list[tuple[Key, Record, Record]]:
    """``(column, fastif, if-lissa)`` for every column where both are ok and top-k recall is defined."""
    found = []
    for key, group in groups.items():
        by_name = {r.estimator: r for r in group if r.status == "ok"}
        fast, lissa = by_name.get("fastif"), by_name.get("if-lissa")
        if fast is None or lissa is None:
            continue
        if fast.metrics.get(TOP_K) is None or lissa.metrics.get(TOP_K) is None:
            continue
        if (fast.n_columns or 0) <= fast.top_k:  # every column is in the top k: recall says nothing
            continue
        found.append((key, fast, lissa))
    return found


def render_fastif(groups: Mapping[Key, Sequence[Record]]) -> list[str]:
    """The "FastIF against its claim" section, or nothing where no column has both estimators."""
    rows = fastif_rows(groups)
    if not rows:
        return []
    settings = sorted({settings_sentence(fast, lissa) for _, fast, lissa in rows})
    equal = all(s.startswith("at equal") for s in settings)
    k, candidates = rows[0][1].top_k, rows[0][1].estimator_config.get("k")
    consequence = (f"so the two differ by the preselection ({candidates} candidates per query) alone" if equal else
                   "so the two differ in their solver as well as by the preselection, and the comparison is not the "
                   "paper's")
    lines = ["## FastIF against its claim", "",
             "FastIF's claim is that kNN preselection, at the same solver, finds the most influential training points "
             f"at a fraction of the cost. Here it ran {' and '.join(settings)}, {consequence}. The columns are those "
             f"whose ground truth ranks single training points. *Top-{k} recall* is the share of the ground truth's "
             f"{k} most helpful points among the estimator's top {k} (mean over queries and base models); the headline "
             "is each estimator's own column value, FastIF's with the points it did not preselect scored zero; cost is "
             "fit plus scoring in seconds (per base model), and the speed-up is if-lissa's cost over FastIF's, "
             "measured in the same run.", "",
             "| column | if-lissa: headline · top-k recall · s | fastif: headline · top-k recall · s | speed-up |",
             "|---|---:|---:|---:|"]
    for (task, protocol), fast, lissa in rows:
        fast_cost, lissa_cost = cost(fast), cost(lissa)
        speed_up = f"{lissa_cost / fast_cost:.2f}×" if fast_cost and lissa_cost is not None else "–"
        lines.append(f"| {task} · {protocol} ({title(fast, fast.headline)}) | "
                     f"{num(value_of(lissa))} · {num(lissa.metrics[TOP_K])} · {seconds(lissa_cost)} | "
                     f"{num(value_of(fast))} · {num(fast.metrics[TOP_K])} · {seconds(fast_cost)} | {speed_up} |")
    return [*lines, ""]
