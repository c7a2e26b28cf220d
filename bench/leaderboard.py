"""Render results records as a markdown leaderboard (tables) with optional figures.

It only formats: protocols declare their metrics (titles, direction) and each
record carries its ground truth's ceiling and whether the cell is informative.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.claims import render_fastif
from bench.formatting import option_text, value_of
from bench.metrics import INFORMATIVE_CEILING
from bench.overview import render_overview, render_quality_and_cost
from bench.pooling import pool_base_models
from bench.ranking import ColumnJudgement, judge_column
from bench.records import Record, as_records
from bench.sections import section
from bench.store import ResultsStore

Key = tuple[str, str]
#: The figures key of the quality-versus-cost figure.
QUALITY_AND_COST: Key = ("", "quality-and-cost")


INTRODUCTION = [
    "Each estimator predicts, for every (query, training point) pair, the change in the query's loss when the "
    "point is **removed** and the model retrained (positive: the point helped). Metrics compare predictions with "
    "the retrained ground truth per query, across the columns (removed points, groups or subsets), then average "
    "over queries. On the non-convex tasks the ground truth is the mean over K retraining seeds. Brackets give "
    "95% intervals: within one base model, the estimate ± 1.96 standard errors from a *two-way* bootstrap that "
    "resamples queries and columns together (every query shares the same columns); over several base models, the "
    "random-effects interval described below.",
    "",
    "**Two kinds of deep ground truth.** *From scratch* (`lds-scratch`, the field's LDS as TRAK, datamodels and "
    "dattri compute it): each subset model is trained with the task's full recipe from a fresh initialisation, K "
    "models per subset averaged; no retrain starts from θ̂, so one truth serves every base model. *Fine-tune "
    "response* (`group`, `lds`, `retrain-length` on the deep tasks): θ̂ trained on for whole epochs at a tenth of "
    "the learning rate without the removed points, a local response close to what influence functions "
    "approximate. The two can rank estimators differently (compare a task's sections of both kinds): a short "
    "fine-tune from θ̂ stays near θ̂, where a linearisation around θ̂ (gradients, curvature) describes it, while a "
    "model trained from scratch on half the data is another solution, which a linearisation at θ̂ captures only in "
    "part. The from-scratch columns are the deep headline; the two kinds are never "
    "averaged together (the overview gives one aggregate per kind).",
    "",
    "The *noise ceiling* is the best correlation a predictor that does not see the retraining noise can expect "
    "against that K-seed mean: √ρ_K, with ρ_K = K·r / (1 + (K−1)·r) the Spearman–Brown reliability of the mean "
    "and r the agreement between two seeds (per query and column block, then averaged as the headline is; for "
    "LDS, a rank correlation, the same formula is an approximation). An oracle that knows the noise-free effect "
    "reaches it, so no estimator can be expected to beat it. On exact (convex) ground truth it is 1. A cell is "
    f"*uninformative* when its ceiling's lower bound (over several base models: of its random-effects interval) is "
    f"below {INFORMATIVE_CEILING}: the retraining noise leaves too little signal to rank estimators, and they are "
    "listed unranked.",
    "",
    "**Ranks are rank bands.** Down each column from the leader (highest headline), every estimator is compared "
    "with its band's leader by a paired bootstrap of the difference between their headlines on the same base models "
    "and queries (both resampled, the same draw for the two; the columns are shared by every estimator, so the "
    "comparison is conditional on them). One not significantly behind (the difference's 95% interval reaches 0) "
    "joins the band; the first that is behind leads the next band, so bands never rise down the column. Where a "
    "protocol keeps no per-query values (a detection AUC, an update's F1) two estimators share a band when their 95% "
    "intervals overlap. Estimators whose "
    "per-query values agree to within 0.0005 everywhere compute the same quantity by another solver: they are "
    "shown as agreeing (≡) with the best of them, in its band. A column *does not separate* estimators, and is not "
    "ranked, when the `loss` baseline is at or above every estimator or when every estimator but the baselines "
    "(`random`, `loss`) is in band 1. ↓ marks a metric where lower is better.",
    "",
]

COSTS = [
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
]


def _sort_key(record: Record) -> tuple[int, float, str]:
    value = value_of(record)
    return (0 if value is not None else 1, -(value if value is not None else 0.0), record.estimator)


def grouped(rows: list[Record]) -> dict[Key, list[Record]]:
    """Pooled records by (task, protocol), each column sorted by headline (best first)."""
    groups: dict[Key, list[Record]] = defaultdict(list)
    for record in rows:
        groups[(record.task, record.protocol)].append(record)
    return {key: sorted(group, key=_sort_key) for key, group in groups.items()}


def _variants_paragraph(rows: list[Record]) -> list[str]:
    """One sentence per estimator variant: which estimator it is and the options in which their configs differ
    (taken from the records, so a variant run without its estimator lists its whole config)."""
    variants = {r.estimator: r for r in rows if r.variant_of}
    if not variants:
        return []
    configs = {r.estimator: r.estimator_config for r in rows}
    sentences = []
    for name, record in sorted(variants.items()):
        own, base = record.estimator_config, configs.get(record.variant_of, {})
        changed = {k: v for k, v in own.items() if base.get(k, object()) != v}
        shown = ", ".join(f"{k} = {option_text(v)}" for k, v in sorted(changed.items())) or "the same options"
        sentences.append(f"`{name}` is `{record.variant_of}` with {shown}")
    return ["*Variants* (a second configuration of an estimator, in rows of their own): "
            + "; ".join(sentences) + ".", ""]


def _selected_share_paragraph(rows: list[Record]) -> list[str]:
    """The share of its parameters each target-parameter estimator (GIF, FIF, PIF) moved, from its records."""
    shares: dict[str, list[float]] = defaultdict(list)
    for record in rows:
        share = (record.estimator_diagnostics or {}).get("selected_fraction")
        if record.status == "ok" and share is not None:
            shares[record.estimator].append(100 * share)
    if not shares:
        return []
    shown = []
    for name, values in sorted(shares.items()):
        ratio = next(r.estimator_config for r in rows if r.estimator == name).get("ratio")
        spread = f"–{max(values):.1f}%" if max(values) - min(values) >= 0.05 else ""
        configured = f" (configured {100 * ratio:g}%)" if isinstance(ratio, (int, float)) else ""
        shown.append(f"`{name}` {min(values):.1f}%{spread}{configured}")
    return ["*Target parameters* (estimators that move only a selected share S of their parameters): the share "
            "actually moved, over their cells: " + "; ".join(shown) + ".", ""]


def _ensemble_paragraph(rows: list[Record]) -> list[str]:
    """Each ensemble estimator's size and the training its fit paid for, per task (pooled records: means over
    base models; every protocol of a base model shares one fit)."""
    fits: dict[tuple[str, str], dict[str, float]] = {}
    for record in rows:
        found = record.estimator_diagnostics or {}
        if record.status == "ok" and found.get("independent_models", 0) > 0:
            fits[record.estimator, record.task] = found
    shown = [f"`{name}` on {task}: {found['models']:.0f} models, {found['independent_models']:.0f} of them trained by "
             f"θ̂'s recipe from their own seeds in the fit (on average {found.get('ensemble_training_s', float('nan')):.0f} s of "
             "training per base model, counted in its fit time)" for (name, task), found in sorted(fits.items())]
    return ["*Ensembles*: " + "; ".join(shown) + ".", ""] if shown else []


@dataclass(frozen=True)
class Board:
    """What the leaderboard shows, computed once: the pooled rows, their columns and each column's judgement."""

    rows: list[Record]
    groups: dict[Key, list[Record]]
    judged: dict[Key, ColumnJudgement]

    @classmethod
    def of(cls, records: Sequence[Record | Mapping[str, Any]]) -> Board:
        rows = pool_base_models(as_records(records))
        groups = grouped(rows)
        return cls(rows, groups, {key: judge_column(group) for key, group in groups.items()})


def render_markdown(records: Sequence[Record | Mapping[str, Any]], *, figures: dict[Key, str] | None = None,
                    sections: Sequence[str] = (), board: Board | None = None) -> str:
    """The leaderboard as markdown: a header, an overview, ``sections`` (further markdown lines: the scaling
    profile, the peers' table), then one table per (task, protocol) (each cell's latest records, pooled over
    its base models; JSON objects are read as ``records.jsonl`` holds them; ``board``: ``Board.of(records)``
    where the caller has it)."""
    board = board or Board.of(records)
    rows, groups, judged = board.rows, board.groups, board.judged
    if not rows:
        return "\n".join(["# ifbench leaderboard", "", "No results yet: run `ifbench run` first.", "", *sections]).rstrip() + "\n"
    first = rows[0]
    commits = sorted({r.git_commit for r in rows})
    versions = first.versions
    lines = [
        "# ifbench leaderboard",
        "",
        f"Suite `{first.suite}` · seed {_shown(first.seed)} · {_shown(first.threads)} threads · "
        f"{first.device} · commit {', '.join(commits)} · "
        + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if k in ("python", "torch", "numpy", "scipy")),
        "",
        *_smoke_paragraph(rows),
        *INTRODUCTION,
        *_base_models_paragraph(rows),
        *COSTS,
        *_variants_paragraph(rows),
        *_selected_share_paragraph(rows),
        *_ensemble_paragraph(rows),
    ]
    if len(groups) > 1:
        lines += render_overview(groups, judged)
        lines += render_quality_and_cost(groups, judged, (figures or {}).get(QUALITY_AND_COST))
        lines += render_fastif(groups)
    lines += sections
    for key, group in groups.items():
        lines += section(group, judged[key], (figures or {}).get(key))
    return "\n".join(lines).rstrip() + "\n"


def _shown(value: Any) -> str:
    return "?" if value is None else str(value)


def _smoke_paragraph(rows: list[Record]) -> list[str]:
    """A warning above everything when some cells ran at a task's ``smoke`` preset."""
    smoke = sorted({r.task for r in rows if r.preset == "smoke"})
    if not smoke:
        return []
    return [f"**Smoke sizes, not a ranking.** {', '.join(smoke)} ran at the `smoke` preset, sized to check that every "
            "path of the pipeline runs, in minutes. With so few queries and columns the intervals are wide and a score "
            "can land above its noise ceiling by chance (the ceiling is an estimate too): read these tables as a check "
            "that the suite works, not as evidence about the estimators. The `default` suite is sized to rank.", ""]


def _base_models_paragraph(rows: list[Record]) -> list[str]:
    """How cells repeated over several base models are pooled (only when some are)."""
    counts = sorted({r.base_models for r in rows if (r.base_models or 1) > 1})
    if not counts:
        return []
    return [
        f"On the non-convex tasks each cell is repeated on {' or '.join(map(str, counts))} *base models*: θ̂ trained "
        "from independent seeds on the same data, the estimator fitted around each, and the ground truth too unless "
        "no θ̂ enters it (from scratch: one truth for all). A cell's metrics, noise ceiling and costs are the means "
        "over its base models; the *base models' range* column gives the lowest and highest base model, the spread "
        "a single θ̂ would leave. Base models are a random effect: the interval is a t-interval over the base models "
        "(B − 1 degrees of freedom) combined in quadrature with their mean within-model bootstrap standard error "
        "(queries, and for a shared truth the columns, are the same for every base model, so that error does not "
        "average out), and so covers the mean over base models one could have trained, not only these.",
        "",
    ]


def write_leaderboard(results_dir: Path, out: Path, *, with_figures: bool = True) -> Path:
    """Render ``results_dir``'s records to ``out`` (figures in ``out``'s folder ``figures/``)."""
    store = ResultsStore(results_dir)
    records = store.records()
    board = Board.of(records)
    figures: dict[Key, str] = {}
    out = Path(out)
    if with_figures and records:
        from bench.figures import quality_versus_cost, scatter_best
        from bench.overview import quality_and_cost

        folder = out.parent / "figures"
        for (task, protocol), path in scatter_best(store, board.rows, folder).items():
            figures[(task, protocol)] = str(path.relative_to(out.parent))
        path = quality_versus_cost(quality_and_cost(board.groups, board.judged), folder)
        if path is not None:
            figures[QUALITY_AND_COST] = str(path.relative_to(out.parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [*_profile_section(results_dir, out, with_figures), *_peers_section(results_dir)]
    out.write_text(render_markdown(records, figures=figures, sections=sections, board=board))
    return out


def _peers_section(results_dir: Path) -> list[str]:
    """The peer implementations' section when ``ifbench peers`` wrote its measurements into the results folder."""
    from bench import peers_report

    loaded = peers_report.load(results_dir)
    return peers_report.render(*loaded) if loaded is not None else []


def _profile_section(results_dir: Path, out: Path, with_figures: bool) -> list[str]:
    """The scaling section when ``ifbench profile`` wrote its measurements into the results folder."""
    from bench import scaling_report

    loaded = scaling_report.load(results_dir)
    if loaded is None:
        return []
    points, payload = loaded
    paths = scaling_report.figure(points, out.parent / "figures") if with_figures else []
    return scaling_report.render(points, payload, [str(p.relative_to(out.parent)) for p in paths])
