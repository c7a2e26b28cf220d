"""``ifbench profile``: how an estimator's cost grows with the training-set size n and the parameter count P.

Two sweeps, each point measured ``repeats`` times (fresh estimator, fit then score every training point for
the queries) and reported by its median: n on mnist-logreg (P = 7,850 fixed) and P on mnist-resnet's whole
network at widths ×1, ×2, ×4 (n fixed; estimators with a ``parameters`` option are given every parameter).
Per estimator and axis a log–log line ``time ∝ xᵃ`` is fitted (scipy's ``linregress``; 95% interval from
its standard error and Student's t), and the line is followed to named reference scales, marked
*extrapolated*. Memory is the estimator's own increment over the resident size before its fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from tqdm.auto import tqdm

from bench.context import fit_context
from bench.profile import profiled
from estimators.base import SINGLE, NotApplicable
from tasks.logreg import MnistLogReg
from tasks.resnet import MnistResNet

PROFILE_FILE = "profile.json"
#: Named scales the fitted lines are followed to: (axis, name, value).
REFERENCE_SCALES = (("n", "CIFAR-10 (n = 50,000)", 50_000), ("n", "SST-2 (n = 67,349)", 67_349),
                    ("P", "ResNet-18 (P ≈ 11.2 M)", 11.2e6), ("P", "BERT-base (P ≈ 110 M)", 110e6))
MEMORY_LIMITS_MB = (("24 GiB", 24 * 1024), ("80 GiB", 80 * 1024))


@dataclass(frozen=True)
class SweepConfig:
    """The default sweep fits in about 20 minutes on 2 CPU cores. Repeats stop once a point has taken
    ``point_budget_s`` (at least one runs), and a point slower than that ends the estimator's sweep along
    the axis (larger points would be slower still)."""

    n_train: tuple[int, ...] = (250, 500, 1000, 2000)
    widths: tuple[int, ...] = (2, 4, 8)
    n_train_for_widths: int = 400
    n_queries: int = 20
    repeats: int = 3
    point_budget_s: float = 30.0


@dataclass(frozen=True)
class Point:
    estimator: str
    axis: str  # "n" or "P"
    n_train: int
    n_parameters: int
    fit_s: float | None = None
    score_s: float | None = None
    own_mb: float | None = None
    note: str = ""
    repeats: int = 0

    @property
    def seconds(self) -> float | None:
        return None if self.fit_s is None else self.fit_s + (self.score_s or 0.0)


def _sweep_tasks(axis: str, config: SweepConfig, seed: int) -> list[Any]:
    if axis == "n":
        base = MnistLogReg.presets["default"]
        return [MnistLogReg(dataclasses.replace(base, n_train=n, n_test=500, n_queries=config.n_queries), seed=seed)
                for n in config.n_train]
    base = MnistResNet.presets["smoke"]
    return [MnistResNet(dataclasses.replace(base, n_train=config.n_train_for_widths, n_test=200,
                                            n_queries=config.n_queries, width=width), seed=seed)
            for width in config.widths]


def _options(cls: type, task: Any, axis: str) -> Any:
    """The estimator's default options; on the P axis, every parameter where it has a ``parameters`` option."""
    config = cls.Config()
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if axis == "P" and "parameters" in fields:
        return dataclasses.replace(config, parameters=tuple(n for n, _ in task.build_model().named_parameters()))
    return config


def sweep(estimators: Sequence[tuple[str, type]], axes: Sequence[str], config: SweepConfig, *, seed: int = 0,
          progress: bool = True) -> list[Point]:
    """Measure every (estimator, axis, point); a point that fails or does not apply is kept with its note."""
    points: list[Point] = []
    for axis in axes:
        over_budget: set[str] = set()
        for task in tqdm(_sweep_tasks(axis, config, seed), desc=f"profile {axis}", disable=not progress, leave=False):
            data = task.load_data()
            base = task.train(data)
            ctx = fit_context(task, data, base, seed)
            train_idx = torch.arange(len(data.train), device=task.device)
            total = sum(p.numel() for p in base.params.values())
            for name, cls in estimators:
                if SINGLE not in cls.capabilities or name in over_budget:
                    note = "over the point budget at a smaller size" if name in over_budget else "no single scores"
                    points.append(Point(name, axis, len(data.train), total, note=note))
                    continue
                points.append(_measure(name, cls, _options(cls, task, axis), ctx, data.queries, train_idx, axis,
                                       total, config))
                if (points[-1].seconds or 0.0) > config.point_budget_s:
                    over_budget.add(name)
    return points


def _measure(name: str, cls: type, options: Any, ctx: Any, queries: Any, train_idx: torch.Tensor, axis: str,
             total: int, config: SweepConfig) -> Point:
    fits, scores, memory, size = [], [], [], total
    for _ in range(config.repeats):
        if sum(fits) + sum(scores) > config.point_budget_s:
            break
        estimator = cls(options)
        try:
            with profiled(ctx.device) as fit:
                estimator.fit(ctx)
            with profiled(ctx.device) as score:
                estimator.score(queries, train_idx)
        except NotApplicable as err:
            return Point(name, axis, len(ctx.train), total, note=f"not applicable: {err}")
        except Exception as err:  # recorded, the sweep goes on
            return Point(name, axis, len(ctx.train), total, note=f"failed: {type(err).__name__}: {err}"[:200])
        fits.append(fit.seconds)
        scores.append(score.seconds)
        if fit.baseline_rss_mb is not None:
            memory.append(max(0.0, max(fit.peak_rss_mb, score.peak_rss_mb) - fit.baseline_rss_mb))
        size = int(estimator.diagnostics().get("n_parameters", total))
        del estimator
    return Point(name, axis, len(ctx.train), size, statistics.median(fits), statistics.median(scores),
                 statistics.median(memory) if memory else None, repeats=len(fits))


@dataclass(frozen=True)
class Slope:
    """``log y = intercept + slope · log x`` with the slope's 95% interval."""

    slope: float
    low: float
    high: float
    intercept: float
    points: int

    def at(self, x: float) -> float:
        return math.exp(self.intercept + self.slope * math.log(x))


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> Slope | None:
    """The log–log least-squares line through ≥ 3 positive points (two would leave no interval)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pairs}) < 3:
        return None
    result = stats.linregress([math.log(x) for x, _ in pairs], [math.log(y) for _, y in pairs])
    half = stats.t.ppf(0.975, len(pairs) - 2) * result.stderr
    return Slope(result.slope, result.slope - half, result.slope + half, result.intercept, len(pairs))


def fits(points: Sequence[Point]) -> dict[tuple[str, str, str], Slope]:
    """``(estimator, axis, "time" | "memory")`` → slope; the x of axis P is the parameters the estimator used."""
    out = {}
    for estimator in dict.fromkeys(p.estimator for p in points):
        for axis in ("n", "P"):
            mine = [p for p in points if p.estimator == estimator and p.axis == axis and p.seconds is not None]
            xs = [p.n_train if axis == "n" else p.n_parameters for p in mine]
            for kind, ys in (("time", [p.seconds for p in mine]), ("memory", [p.own_mb for p in mine])):
                slope = fit_slope(xs, ys)
                if slope is not None:
                    out[estimator, axis, kind] = slope
    return out


def save(points: Sequence[Point], config: SweepConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PROFILE_FILE
    payload = {"config": dataclasses.asdict(config), "threads": torch.get_num_threads(),
               "points": [dataclasses.asdict(p) for p in points]}
    path.write_text(json.dumps(payload, indent=1))
    return path


def load(folder: Path) -> tuple[list[Point], dict[str, Any]] | None:
    path = Path(folder) / PROFILE_FILE
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    return [Point(**p) for p in payload["points"]], payload


def _fmt_seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.2g} s"


def render(points: Sequence[Point], payload: dict[str, Any], figures: Sequence[str] = ()) -> list[str]:
    """The leaderboard's scaling section: measured points, fitted exponents, extrapolations."""
    config, slopes = payload["config"], fits(points)
    lines = [
        "## Scaling profile",
        "",
        f"`ifbench profile` on {payload.get('threads', '?')} threads: fit + score time (the queries against every "
        f"training point; median of up to {config['repeats']} repeats, fewer once a point has taken "
        f"{config['point_budget_s']:g} s) and the estimator's own memory, as n grows on "
        f"mnist-logreg (n = {', '.join(map(str, config['n_train']))}; P = 7,850) and as P grows on mnist-resnet's "
        f"whole network (widths {', '.join(map(str, config['widths']))}, n = {config['n_train_for_widths']}). "
        "Exponents are log–log least-squares slopes with 95% intervals (time ∝ nᵃ, ∝ Pᵇ); the extrapolations "
        "follow those lines far outside the measured range, so read them as orders of magnitude.",
        "",
        "| estimator | time ∝ nᵃ: a | time ∝ Pᵇ: b | memory ∝ Pᶜ: c | "
        + " | ".join(f"{name}, *extrapolated*" for _, name, _ in REFERENCE_SCALES) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(REFERENCE_SCALES),
    ]
    for estimator in dict.fromkeys(p.estimator for p in points):
        def shown(axis: str, kind: str, est: str = estimator) -> str:
            slope = slopes.get((est, axis, kind))
            return f"{slope.slope:.2f} ({slope.low:.2f} – {slope.high:.2f})" if slope else "–"

        cells = []
        for axis, _, value in REFERENCE_SCALES:
            time_line, memory_line = slopes.get((estimator, axis, "time")), slopes.get((estimator, axis, "memory"))
            if time_line is None:
                cells.append("–")
                continue
            text = _fmt_seconds(time_line.at(value))
            if memory_line is not None:
                needed = memory_line.at(value)
                over = [label for label, limit in MEMORY_LIMITS_MB if needed > limit]
                text += f", {needed / 1024:.3g} GiB" + (f" (does not fit in {over[-1]})" if over else "")
            cells.append(text)
        lines.append(f"| `{estimator}` | {shown('n', 'time')} | {shown('P', 'time')} | {shown('P', 'memory')} | "
                     + " | ".join(cells) + " |")
    notes = sorted({f"`{p.estimator}` on {p.axis} at n = {p.n_train}, P = {p.n_parameters:,}: {p.note}"
                    for p in points if p.note and p.note != "no single scores"})
    if notes:
        lines += ["", "Points not measured: " + "; ".join(notes) + "."]
    lines += ["", "| estimator | axis | n | P | repeats | fit s | score s | own MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        if p.seconds is not None:
            lines.append(f"| `{p.estimator}` | {p.axis} | {p.n_train} | {p.n_parameters:,} | {p.repeats} | "
                         f"{p.fit_s:.3g} | {p.score_s:.3g} | {'–' if p.own_mb is None else f'{p.own_mb:.0f}'} |")
    lines.append("")
    if figures:
        lines += [*(f"![scaling profile]({figure})" for figure in figures), ""]
    return lines


def figure(points: Sequence[Point], folder: Path) -> list[Path]:
    """Time against n and against P, log–log, a line per estimator (seaborn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    measured = [p for p in points if p.seconds is not None]
    if not measured:
        return []
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, axis, label in ((axes[0], "n", "training points n"), (axes[1], "P", "parameters P")):
        mine = [p for p in measured if p.axis == axis]
        if mine:
            sns.lineplot(x=[p.n_train if axis == "n" else p.n_parameters for p in mine], y=[p.seconds for p in mine],
                         hue=[p.estimator for p in mine], marker="o", ax=ax, legend=axis == "P")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{label} (log)")
        ax.set_ylabel("fit + score seconds (log)")
    if axes[1].get_legend() is not None:
        axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scaling.png"
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return [path]
