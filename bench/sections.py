"""One leaderboard section: a (task, protocol) column's facts, its kind of ground truth, and its ranked table."""

from __future__ import annotations

from bench.formatting import (
    columns_of,
    count,
    fine_tune_text,
    headline_of,
    num,
    seconds,
    title,
    truth_kind,
    with_ci,
)
from bench.metrics import INFORMATIVE_CEILING
from bench.ranking import AGREEMENT, ColumnJudgement
from bench.records import Profile, Record

BAND_RULE = ("*rank* is a rank band: down the table, an estimator not significantly behind its band's leader (a "
             "paired bootstrap of their difference on the same base models and queries, 95%) joins the band; the "
             "first that is behind leads the next band.")


def not_applicable(record: Record) -> bool:
    """Not applicable because the estimator lacks what the protocol needs (listed once, below the table)."""
    return record.status == "not-applicable" and (record.reason or "capability") == "capability"


def status_text(record: Record) -> str:
    """How a row that has no value says why: its status, or *over a limit* with the limit named."""
    if over_limit(record):
        return f"over a limit ({record.extra.get('limit', 'a configured limit')})"
    return record.status


def over_limit(record: Record) -> bool:
    """Not run because a configured limit refused it (the method itself applies)."""
    return record.status == "not-applicable" and record.reason == "limit"


def facts(head: Record) -> list[str]:
    """The task's facts, then those the protocol gave its ground truth, then its cost."""
    diagnostics, gt = head.task_diagnostics, head.groundtruth_diagnostics
    found = [f"preset `{head.preset}`"]
    several = (head.base_models or 1) > 1
    if several:
        found.append(f"{head.base_models} base models (θ̂ trained from independent seeds; values are their mean, "
                     "ranges their lowest and highest)")
    if "test_accuracy" in diagnostics:
        low, high = diagnostics.get("test_accuracy_range") or (None, None)
        spread = f" ({100 * low:.1f}–{100 * high:.1f}%)" if several and low is not None else ""
        found.append(f"test accuracy {100 * diagnostics['test_accuracy']:.1f}%{spread}")
    found += [fact.text for fact in head.facts]
    if gt.get("seconds") is not None:
        workers = int(gt.get("retrain_workers") or 1)
        whole = " once, for every base model" if head.shared_truth else (" in all" if several else "")
        rate = (f", {gt['subset_models'] / gt['seconds']:.2f} models trained per second"
                if gt.get("subset_models") and gt["seconds"] > 0 else "")
        found.append(f"ground truth took {seconds(gt['seconds'])} s{whole}{rate}"
                     + (f" (retrains on {workers} workers)" if workers > 1 else ""))
    return found


def kind_paragraph(head: Record) -> list[str]:
    """What kind of ground truth the column is, in a sentence (none for updates and detection)."""
    kind = truth_kind(head)
    if kind == "from scratch" and head.groundtruth_diagnostics.get("from_scratch"):
        return ["", "**From scratch:** every subset model is trained with the task's full recipe from a fresh "
                "initialisation under seeds that are no base model's, as TRAK's and dattri's LDS are; no retrain starts "
                "from θ̂, and one ground truth serves every base model."]
    if kind == "from scratch":
        return ["", "**From scratch:** every retrain runs the task's full recipe from the start, with the seed and "
                "data order of its replicate minus the removed points; no retrain starts from θ̂'s weights."]
    if kind == "deterministic":
        return ["", "**Deterministic replay** (MAGIC's single-model setting), apart from the seed-averaged aggregates: "
                "every retrain replays one recorded run (the base model's own run from its initialisation, or the "
                "warm fine-tune from θ̂ for the `-warm` protocols; the facts name it) with its batches and learning "
                "rates and the removed points' weights set to 0, against a control replay with every weight 1, so "
                "the truth is a function of the data weights alone, with no seed noise. An estimator that does not "
                "reproduce the trainer's rounding cannot predict it: the *float32 floor* (the control against the same "
                "run trained alone, whose kernels round differently) measures it, and the ceiling is √(1 − σ²/v) per "
                "query, σ² half the floor's square (one replay's share of it, pooled over queries) and v the query's "
                "variance across the columns, averaged as the headline is (its interval: the floor's χ² bounds and the two-way "
                "bootstrap). Where the floor rivals the effects, or the column has too few queries and columns for "
                "its interval, the ceiling's lower bound falls below 0.2 and the column is uninformative. The "
                "estimators are scored as elsewhere, on the same θ̂ (`magic` on the replayed run itself). The "
                "smoothness probe (a 0.1% change of one weight against that share of the point's removal effect: "
                "equal when the response is linear in the weights) shows how far from linear the response is."]
    if kind == "fine-tune response":
        return ["", f"**Fine-tune response**, not retraining from scratch: {fine_tune_text(head)}. This is close to "
                "the proximal response that influence functions approximate (Bae et al. 2022), so it favours them "
                "more than from-scratch retraining does."]
    return []


def header(head: Record, judged: ColumnJudgement) -> list[str]:
    task, protocol, headline = head.task, head.protocol, headline_of(head)
    kind = truth_kind(head)
    flags = [f for f, on in (("uninformative", not judged.informative),
                             ("does not separate", judged.informative and judged.not_separating)) if on]
    lines = [f"## {task} · {protocol}" + (f" · {kind}" if kind else "") + (f" ({', '.join(flags)})" if flags else ""),
             "", "; ".join(facts(head)) + ".", *kind_paragraph(head)]
    if not judged.informative:
        low = (head.groundtruth_diagnostics.get(f"ceiling_{headline}_ci") or [None])[0]
        lines += ["", f"**Uninformative:** the noise ceiling's lower bound ({num(low)}) is below {INFORMATIVE_CEILING}; "
                  "the estimators are listed by their value but not ranked."]
    elif judged.not_separating:
        lines += ["", f"**Does not separate:** {judged.not_separating}; the estimators are listed by their value but "
                  "not ranked."]
    else:
        lines += ["", BAND_RULE]
    return lines


def table_head(head: Record, group: list[Record], spread: bool) -> list[str]:
    headline, columns = headline_of(head), columns_of(head)
    ci_note = " (95% CI)" if any(r.ci.get(headline) for r in group) else ""
    lines = [f"| rank | estimator | {title(head, headline)}{ci_note} | " + ("base models' range | " if spread else "")
             + " | ".join(title(head, c) for c in columns) + " | params | fit s | score s | own MB | process MB |",
             "|---:|---|---|" + ("---|" if spread else "") + "---:|" * len(columns) + "---:|---:|---:|---:|---:|"]
    gt = head.groundtruth_diagnostics
    if gt.get(f"ceiling_{headline}") is not None:
        low, high = gt.get(f"ceiling_{headline}_ci") or [None, None]
        lines.append(f"| – | *noise ceiling* | {num(gt[f'ceiling_{headline}'])} ({num(low)} – {num(high)}) | "
                     + (" | " if spread else "") + " | " * len(columns) + " | | | | |")
    return lines


def row(record: Record, judged: ColumnJudgement, spread: bool, hide_top_k: bool) -> str:
    headline, columns = headline_of(record), columns_of(record)
    profile = record.profile or Profile()
    metrics = dict(record.metrics)
    if hide_top_k:
        metrics["top_k_overlap"] = None
    own = profile.peak_cuda_mb or profile.own_mem_mb
    name = record.estimator
    band = judged.band_of(name)
    rank = ("–" if band is None else str(band)) + (f" ≡ `{judged.agrees_with[name]}`" if name in judged.agrees_with else "")
    return (f"| {rank} | `{name}` | {with_ci(record, headline)} | " + (f"{spread_of(record, headline)} | " if spread else "")
            + " | ".join(num(metrics.get(c)) for c in columns)
            + f" | {count((record.estimator_diagnostics or {}).get('n_parameters'))}"
            + f" | {seconds(profile.fit_s)} | {seconds(profile.score_s)} | {num(own, 0)} "
            f"| {num(profile.peak_mem_mb, 0)} |")


def section(group: list[Record], judged: ColumnJudgement, figure: str | None) -> list[str]:
    """The column's section: header, table (ok rows, then failures), not-applicable list, agreement, figure."""
    head = group[0]
    columns = columns_of(head)
    hide_top_k = (head.n_columns or head.top_k + 1) <= head.top_k
    spread = any((r.base_models or 1) > 1 for r in group)
    lines = [*header(head, judged), "", *table_head(head, group, spread)]
    for record in group:
        if record.status == "ok":
            lines.append(row(record, judged, spread, hide_top_k))
        elif not not_applicable(record):
            error = str(record.error or "").replace("|", "\\|").splitlines()[0][:160]
            lines.append(f"| – | `{record.estimator}` | {status_text(record)}: {error} |"
                         + " |" * (len(columns) + 5 + spread))
    lines.append("")
    skipped = [r.estimator for r in group if not_applicable(r)]
    if skipped:
        needs = str(next(r for r in group if r.estimator == skipped[0]).error).split(";")[0]
        lines += [f"Not applicable ({needs}): " + ", ".join(f"`{name}`" for name in skipped) + ".", ""]
    lines += agreement_lines(judged)
    if figure:
        lines += [f"![{head.task} {head.protocol}: predicted vs actual]({figure})", ""]
    return lines


def agreement_lines(judged: ColumnJudgement) -> list[str]:
    """One sentence per estimator that others agree with (the same quantity by another solver)."""
    by_reference: dict[str, list[str]] = {}
    for name, reference in judged.agrees_with.items():
        by_reference.setdefault(reference, []).append(name)
    return [f"{' and '.join(f'`{n}`' for n in sorted(names))} agree{'s' if len(names) == 1 else ''} with "
            f"`{reference}` to within {AGREEMENT:g} on every query of every base model: the same quantity (≡), "
            "shown in its band rather than ranked apart." for reference, names in sorted(by_reference.items())] + (
        [""] if by_reference else [])


def spread_of(record: Record, name: str) -> str:
    """A metric's lowest and highest base model: ``0.412 – 0.455``."""
    low, high = ((record.spread or {}).get(name) or (None, None))[:2]
    return f"{num(low)} – {num(high)}" if low is not None else "–"
