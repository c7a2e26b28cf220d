"""Seaborn figures for the leaderboard: what each column's metric sees (per-query ranks or standardised
effects), and quality versus cost with the Pareto front."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.figure_cache import drawn
from bench.formatting import headline_of as _headline
from bench.metrics import metric_title
from bench.records import Record
from bench.store import ResultsStore

QUALITY_AND_COST_FIGURE = "quality-vs-cost.png"
#: Headlines that are rank correlations: their figure shows per-query ranks, where scale means nothing.
RANK_METRICS = ("lds", "spearman", "kendall")
#: The code a figure's digest covers: editing how figures are drawn draws them again.
CODE = (Path(__file__), Path(__file__).with_name("overview.py"))  # overview: the Pareto front it draws


def figure_name(task: str, protocol: str) -> str:
    return f"{task}--{protocol}.png"


def per_query_view(predicted: np.ndarray, actual: np.ndarray, ranks: bool) -> tuple[np.ndarray, np.ndarray]:
    """``[Q, C]`` matrices as the per-query metric sees them: ranks scaled to [0, 1] within each query (a rank
    correlation), else each query's row standardised to mean 0 and unit variance (a Pearson correlation, whose
    fitted slope on these axes is the correlation). Rows that are constant are dropped."""
    keep = (np.ptp(actual, axis=1) > 0) & (np.ptp(predicted, axis=1) > 0)
    predicted, actual = predicted[keep], actual[keep]
    if ranks:
        scale = max(actual.shape[1] - 1, 1)
        return (predicted.argsort(1).argsort(1) / scale, actual.argsort(1).argsort(1) / scale)

    def z(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)

    return z(predicted), z(actual)


def _caption(task: str, protocol: str, record: Record) -> str:
    headline = _headline(record)
    pooled = f"{metric_title(headline)} {record.metrics[headline]:.3f}"
    rows = record.per_query_by_base
    if (record.base_models or 1) > 1:
        own = f" (its {metric_title(headline)} {np.nanmean(np.array(rows[0], dtype=float)):.3f})" if rows else ""
        return (f"{task} · {protocol}: {record.estimator}\nmean of {record.base_models} base models {pooled};"
                f"\npoints: base model 1{own}")
    return f"{task} · {protocol}: {record.estimator}\nmean per-query {pooled}"


def scatter_best(store: ResultsStore, records: list[Record], folder: Path) -> dict[tuple[str, str], Path]:
    """One figure per (task, protocol) of score matrices, for the best estimator by the protocol's headline
    (drawn only where it changed: :mod:`bench.figure_cache`)."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        if record.status == "ok" and record.metrics.get(_headline(record)) is not None:
            groups[(record.task, record.protocol)].append(record)
    written = {}
    for (task, protocol), group in groups.items():
        record = max(group, key=lambda r: r.metrics[_headline(r)])
        arrays = store.load_artifact(record.cell_key)
        if arrays is None:
            continue
        ranks = _headline(record) in RANK_METRICS
        predicted, actual = per_query_view(*(np.asarray(a, dtype=np.float64) for a in arrays), ranks)
        if not predicted.size:
            continue
        caption = _caption(task, protocol, record)
        written[(task, protocol)] = drawn(
            folder / figure_name(task, protocol), {"predicted": predicted, "actual": actual, "ranks": ranks,
                                                   "caption": caption},
            lambda path, p=predicted, a=actual, r=ranks, c=caption: _draw_scatter(path, p, a, r, c), CODE)
    return written


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt


def _draw_scatter(path: Path, predicted: np.ndarray, actual: np.ndarray, ranks: bool, caption: str) -> None:
    plt = _pyplot()
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(5, 4.8))
    if ranks:
        ax.hexbin(actual.ravel(), predicted.ravel(), gridsize=20, cmap="Blues", mincnt=1)
        ax.plot([0, 1], [0, 1], color="0.4", linewidth=1, linestyle="--", label="same rank")
        ax.set_xlabel("actual rank within the query (0 = smallest effect)")
        ax.set_ylabel("predicted rank within the query")
    else:
        sns.scatterplot(x=actual.ravel(), y=predicted.ravel(), s=8, alpha=0.3, linewidth=0, ax=ax)
        slope = float((actual * predicted).sum() / (actual * actual).sum())
        line = np.array([actual.min(), actual.max()])
        ax.plot(line, slope * line, color="C3", linewidth=1.2, label=f"fitted slope {slope:.2f}")
        ax.set_xlabel("actual effect, standardised per query")
        ax.set_ylabel("predicted, standardised per query")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def quality_versus_cost(points: list[tuple], folder: Path) -> Path | None:
    """One panel per task: score / ceiling (with its interval) against fit + score seconds (log scale), the
    Pareto front drawn as a step line, every point labelled (``points`` from
    :func:`bench.overview.quality_and_cost`; drawn only where they changed)."""
    if not points:
        return None
    return drawn(folder / QUALITY_AND_COST_FIGURE, points, lambda path: _draw_quality_versus_cost(path, points), CODE)


def _draw_quality_versus_cost(path: Path, points: list[tuple]) -> None:
    from bench.overview import pareto_front

    plt = _pyplot()
    tasks = list(dict.fromkeys(p[0] for p in points))
    front = pareto_front(points)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 5.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = sorted((p for p in points if p[0] == task), key=lambda p: p[5])
        cost = np.array([max(p[5], 1e-3) for p in mine])
        quality, low, high = (np.array([p[i] for p in mine]) for i in (2, 3, 4))
        on_front = np.array([(task, p[1]) in front for p in mine])
        ax.errorbar(cost, quality, yerr=[quality - low, high - quality], fmt="none", ecolor="0.7", elinewidth=1)
        ax.scatter(cost[~on_front], quality[~on_front], s=22, color="C0", zorder=3)
        ax.scatter(cost[on_front], quality[on_front], s=40, color="C3", marker="*", zorder=4, label="Pareto front")
        ax.step(cost[on_front], quality[on_front], where="post", color="C3", linewidth=1)
        for i, p in enumerate(mine):  # alternate label sides along the cost axis so neighbours do not collide
            ax.annotate(p[1], (cost[i], quality[i]), fontsize=7, xytext=(4, 6 if i % 2 else -9),
                        textcoords="offset points", color="C3" if on_front[i] else "0.2")
        ax.set_xscale("log")
        ax.set_xlabel("fit + score seconds on the task (log)")
        ax.set_ylabel("mean score / noise ceiling (95% interval)")
        ax.set_title(f"{task} ({mine[0][6]} ground truth)", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
