"""Seaborn figures for the leaderboard: predicted vs actual removal effects; quality versus cost."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.leaderboard import headline_of as _headline
from bench.metrics import metric_title
from bench.store import ResultsStore

QUALITY_AND_COST_FIGURE = "quality-vs-cost.png"


def figure_name(task: str, protocol: str) -> str:
    return f"{task}--{protocol}.png"


def scatter_best(store: ResultsStore, records: list[dict[str, Any]], folder: Path) -> dict[tuple[str, str], Path]:
    """One scatter per (task, protocol) of score matrices, for the best estimator by the protocol's headline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    best: dict[tuple[str, str], dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("status") == "ok" and record.get("metrics", {}).get(_headline(record)) is not None:
            groups[(record["task"], record["protocol"])].append(record)
    for key, group in groups.items():
        best[key] = max(group, key=lambda r: r["metrics"][_headline(r)])
    written = {}
    folder.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    for (task, protocol), record in best.items():
        arrays = store.load_artifact(record["cell_key"])
        if arrays is None:
            continue
        predicted, actual = arrays
        fig, ax = plt.subplots(figsize=(5, 4.5))
        sns.scatterplot(x=actual.ravel(), y=predicted.ravel(), s=8, alpha=0.35, linewidth=0, ax=ax)
        low = float(min(actual.min(), predicted.min()))
        high = float(max(actual.max(), predicted.max()))
        ax.plot([low, high], [low, high], color="0.4", linewidth=1, linestyle="--", label="y = x")
        ax.set_xlabel("actual Δ query loss (retrained)")
        ax.set_ylabel(f"predicted by {record['estimator']}")
        headline = _headline(record)
        several = (record.get("base_models") or 1) > 1  # pooled: the metric is the mean, the points base model 1's
        ax.set_title(f"{task} · {protocol}\n{record['estimator']}: mean per-query {metric_title(headline)} "
                     f"{record['metrics'][headline]:.3f}" + (f" ({record['base_models']} base models;\npoints: base "
                                                             "model 1)" if several else ""), fontsize=10)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = folder / figure_name(task, protocol)
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written[(task, protocol)] = path
    return written


def quality_versus_cost(points: list[tuple[str, str, float, float]], folder: Path) -> Path | None:
    """One panel per task: score / ceiling against fit + score seconds (log scale), a labelled point per
    estimator (``points`` from :func:`bench.leaderboard.quality_and_cost`)."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    tasks = list(dict.fromkeys(task for task, *_ in points))
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [(name, quality, max(seconds, 1e-3)) for t, name, quality, seconds in points if t == task]
        sns.scatterplot(x=[s for *_, s in mine], y=[q for _, q, _ in mine], s=30, ax=ax)
        for name, quality, seconds in mine:
            ax.annotate(name, (seconds, quality), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("fit + score seconds on the task (log)")
        ax.set_ylabel("mean score / noise ceiling")
        ax.set_title(task, fontsize=10)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / QUALITY_AND_COST_FIGURE
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
