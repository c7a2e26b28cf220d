"""The scaling profile's records and report: sweep points, log–log fits, ``profile.json``, the leaderboard's
scaling section and its figure. No torch: ``ifbench leaderboard`` renders it without the compute stack
(the sweep itself is :mod:`bench.scaling`).
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

from bench.atomic import atomic_write
from bench.figure_cache import drawn

PROFILE_FILE = "profile.json"
AXES = ("n", "Q", "P")
#: Named scales the fitted lines are followed to: (axis, name, value); on mnist-logreg's P = 7,850.
REFERENCE_SCALES = (("n", "n = 50,000 (CIFAR-10's)", 50_000), ("n", "n = 67,349 (SST-2's)", 67_349))
#: Why the P axis is not followed to ResNet-18's or BERT-base's size (shown under the table)
NO_P_EXTRAPOLATION = (
    "The P lines are not followed to ResNet-18's 11 M or BERT-base's 110 M parameters: at the widths measured a "
    "fixed cost per call dominates{evidence}, so they would understate the cost there; they describe the measured "
    "range only.")
#: On the P axis the objective gets a ridge that makes the whole ResNet's Hessian positive definite at θ̂ (it has
#: negative eigenvalues, on which CG stops and a Cholesky factorisation fails) with condition number at most about
#: this, so that iterative solvers meet comparable problems at every width (see :func:`convexifying_ridge`)
P_AXIS_CONDITION = 100.0
MEMORY_LIMITS_MB = (("24 GiB", 24 * 1024), ("80 GiB", 80 * 1024))
#: memory lines are fitted through points where the estimator added at least this much: a point's estimators
#: run one after another in one worker, whose allocator hands later ones memory that earlier ones freed
#: (measured: increments of 0–60 MB where the same estimator alone needs more), so smaller increments are noise
MEMORY_FLOOR_MB = 64.0


@dataclass(frozen=True)
class SweepConfig:
    """The default sweep took 17 minutes on 2 CPU cores (one run, 17:04 wall clock). Repeats stop once a point
    has taken ``point_budget_s`` (at least one runs); a point slower than ``axis_stop_s`` (one repeat's fit +
    score), or stopped at ``point_timeout_s``, ends the estimator's sweep along the axis."""

    n_train: tuple[int, ...] = (250, 500, 1000, 2000)
    n_queries: tuple[int, ...] = (10, 20, 40, 80)
    n_train_for_queries: int = 500
    widths: tuple[int, ...] = (1, 2, 4, 8)
    n_train_for_widths: int = 200
    queries: int = 10  # on the n and P axes
    repeats: int = 3
    point_budget_s: float = 2.0
    axis_stop_s: float = 20.0
    point_timeout_s: float = 45.0
    #: a point whose worker holds more resident memory is stopped (half of a 24 GiB machine)
    point_memory_mb: float = 12_288.0

    def __post_init__(self) -> None:
        if min(self.repeats, self.queries, *self.n_train, *self.n_queries, *self.widths) < 1:
            raise ValueError(f"sweep sizes and repeats must be ≥ 1: {self}")
        if not 0 < self.point_budget_s <= self.point_timeout_s or not 0 < self.axis_stop_s <= self.point_timeout_s:
            raise ValueError(f"need 0 < point_budget_s ≤ point_timeout_s and 0 < axis_stop_s ≤ point_timeout_s, got "
                             f"{self.point_budget_s}, {self.axis_stop_s}, {self.point_timeout_s}")


@dataclass(frozen=True)
class Point:
    estimator: str
    axis: str  # "n", "Q" or "P"
    n_train: int
    n_parameters: int
    fit_s: float | None = None
    score_s: float | None = None
    own_mb: float | None = None
    note: str = ""
    repeats: int = 0
    n_queries: int = 0
    width: int = 0
    #: the ridge added to the objective's l2 at this point (P axis; see :func:`convexifying_ridge`)
    ridge: float = 0.0

    @property
    def seconds(self) -> float | None:
        return None if self.fit_s is None else self.fit_s + (self.score_s or 0.0)

    @property
    def where(self) -> tuple[str, str, int, int, int]:
        """The sweep point it measures (which estimator at which sizes)."""
        return (self.estimator, self.axis, self.n_train, self.n_queries, self.width)

    def x(self) -> int:
        """Its coordinate on its axis (on P: the parameters the estimator used)."""
        return {"n": self.n_train, "Q": self.n_queries}.get(self.axis, self.n_parameters)


@dataclass(frozen=True)
class Slope:
    """``log y = intercept + slope · log x`` with the slope's 95% interval."""

    slope: float
    low: float
    high: float
    intercept: float
    points: int
    #: the mean of log x over the points (the line passes through it and the mean of log y)
    centre: float = 0.0

    def at(self, x: float, slope: float | None = None) -> float:
        """The line at ``x``; with ``slope``, the line of that slope through the points' centre instead."""
        slope = self.slope if slope is None else slope
        return math.exp(self.intercept + self.slope * self.centre + slope * (math.log(x) - self.centre))

    def span(self, x: float) -> tuple[float, float]:
        """The values at ``x`` of the lines through the centre with the interval's slopes (low, high)."""
        ends = sorted((self.at(x, self.low), self.at(x, self.high)))
        return ends[0], ends[1]


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> Slope | None:
    """The log–log least-squares line through ≥ 2 positive points at distinct x; with two, the line through
    them and no interval (``low`` and ``high`` NaN)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pairs}) < 2:
        return None
    log_x, log_y = [math.log(x) for x, _ in pairs], [math.log(y) for _, y in pairs]
    centre, level = statistics.fmean(log_x), statistics.fmean(log_y)
    sxx = sum((x - centre) ** 2 for x in log_x)
    sxy = sum((x - centre) * (y - level) for x, y in zip(log_x, log_y, strict=True))
    slope = sxy / sxx
    half = math.nan
    if len(pairs) > 2:
        from scipy.special import stdtrit  # the t quantile without scipy.stats' import
        residual = sum((y - level - slope * (x - centre)) ** 2 for x, y in zip(log_x, log_y, strict=True))
        half = float(stdtrit(len(pairs) - 2, 0.975)) * math.sqrt(residual / (len(pairs) - 2) / sxx)
    return Slope(slope, slope - half, slope + half, level - slope * centre, len(pairs), centre)


def fits(points: Sequence[Point]) -> dict[tuple[str, str, str], Slope]:
    """``(estimator, axis, "time" | "memory")`` → slope; the x of axis P is the parameters the estimator used.
    Memory lines use only the points at or above :data:`MEMORY_FLOOR_MB`."""
    out = {}
    for estimator in dict.fromkeys(p.estimator for p in points):
        for axis in AXES:
            mine = [p for p in points if p.estimator == estimator and p.axis == axis and p.seconds is not None]
            sized = [p for p in mine if (p.own_mb or 0.0) >= MEMORY_FLOOR_MB]
            for kind, xs, ys in (("time", [p.x() for p in mine], [p.seconds for p in mine]),
                                 ("memory", [p.x() for p in sized], [p.own_mb for p in sized])):
                slope = fit_slope(xs, ys)
                if slope is not None:
                    out[estimator, axis, kind] = slope
    return out


def save(points: Sequence[Point], config: SweepConfig, folder: Path, threads: int | None = None) -> Path:
    """Write ``profile.json`` whole or not at all (a temporary file renamed over it); ``threads``: the torch
    threads the points were measured with (default: torch's current setting)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    path = folder / PROFILE_FILE
    payload = {"config": dataclasses.asdict(config), "threads": threads,
               "points": [dataclasses.asdict(p) for p in points]}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    return path


def load(folder: Path) -> tuple[list[Point], dict[str, Any]] | None:
    path = Path(folder) / PROFILE_FILE
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    return [Point(**p) for p in payload["points"]], payload


def resumable(folder: Path, config: SweepConfig, threads: int) -> list[Point]:
    """The points a previous sweep into ``folder`` measured with the same config and threads (else none)."""
    try:
        loaded = load(folder)
    except (OSError, ValueError, TypeError, KeyError):
        return []  # unreadable: measured again
    if loaded is None:
        return []
    points, payload = loaded
    same = payload.get("config") == json.loads(json.dumps(dataclasses.asdict(config))) and payload.get("threads") == threads
    return points if same else []


def _fmt_seconds(value: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.2g} s"


def render(points: Sequence[Point], payload: dict[str, Any], figures: Sequence[str] = ()) -> list[str]:
    """The leaderboard's scaling section: measured points, fitted exponents, extrapolations."""
    slopes = fits(points)
    lines = _introduction(points, payload)
    lines += [_exponent_row(estimator, slopes) for estimator in dict.fromkeys(p.estimator for p in points)]
    if any(p.axis == "P" for p in points):
        grad_dot = slopes.get(("grad-dot", "P", "time"))
        evidence = (f" (per-example gradients grow linearly with P, yet grad-dot's P slope here is {grad_dot.slope:.2f})"
                    if grad_dot is not None else "")
        lines += ["", NO_P_EXTRAPOLATION.format(evidence=evidence)]
    notes = sorted({f"`{p.estimator}` on {p.axis} at {_at(p)}: {p.note}"
                    for p in points if p.note and p.note != "no single scores"})
    if notes:
        lines += ["", "Points not measured: " + "; ".join(notes) + "."]
    lines += ["", "| estimator | axis | n | Q | P | repeats | fit s | score s | own MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        if p.seconds is not None:
            lines.append(f"| `{p.estimator}` | {p.axis} | {p.n_train} | {p.n_queries or '–'} | {p.n_parameters:,} | "
                         f"{p.repeats} | {p.fit_s:.3g} | {p.score_s:.3g} | "
                         f"{'–' if p.own_mb is None else f'{p.own_mb:.0f}'} |")
    lines.append("")
    if figures:
        lines += [*(f"![scaling profile]({figure})" for figure in figures), ""]
    return lines


def _introduction(points: Sequence[Point], payload: dict[str, Any]) -> list[str]:
    """The section's heading, what was measured and how to read it, and the exponents table's header."""
    config = payload["config"]
    queries = config.get("n_queries")
    q_axis = (f"; as Q grows on mnist-logreg (Q = {', '.join(map(str, queries))} queries, "
              f"n = {config['n_train_for_queries']})") if queries else ""
    return [
        "## Scaling profile",
        "",
        f"`ifbench profile` on {payload.get('threads', '?')} threads: fit + score time (the queries against every "
        f"training point; median of up to {config['repeats']} repeats, fewer once a point has taken "
        f"{config['point_budget_s']:g} s) and the estimator's own memory, as n grows on "
        f"mnist-logreg (n = {', '.join(map(str, config['n_train']))}; P = 7,850){q_axis}; and as P grows on "
        f"mnist-resnet's whole network (widths {', '.join(map(str, config['widths']))}, "
        f"n = {config['n_train_for_widths']}; the whole network is not convex, so there the objective's l2 gets a "
        f"ridge λ that makes its Hessian positive definite with condition number ≲ {P_AXIS_CONDITION:g}: twice the "
        f"most negative Lanczos eigenvalue plus 1/{P_AXIS_CONDITION:g} of the largest{_ridges(points)}). "
        "Each point ran in a worker process"
        + (f" stopped after {config['point_timeout_s']:g} s" if "point_timeout_s" in config else "")
        + "; a point slower than "
        + (f"{config['axis_stop_s']:g} s" if "axis_stop_s" in config else "the budget")
        + " or stopped ends that estimator's sweep along the axis. "
        "Exponents are log–log least-squares slopes with 95% intervals (from two points: the line through them, no "
        "interval; time ∝ nᵃ, ∝ Qᵇ, ∝ Pᶜ; memory ∝ nᵈ, ∝ Pᵉ, through the points where the estimator added at least "
        f"{MEMORY_FLOOR_MB:g} MB: a point's estimators share a worker, whose allocator lends later ones what earlier "
        "ones freed, so smaller increments are noise; – where fewer than two such points); "
        "the extrapolations follow the lines with an interval far outside the measured range (in brackets: the "
        "lines through the points' centre with the interval's slopes), so read them as orders of magnitude. The "
        "measured ranges are small: where a fixed cost per call dominates one, the slope is below the method's "
        "asymptotic order and its extrapolation underestimates (exact IF's P³ factorisation takes milliseconds at "
        "these P: its P slope measures the P Hessian-vector products that build its dense Hessian). The n lines are "
        "followed at mnist-logreg's P = 7,850.",
        "",
        "| estimator | time ∝ nᵃ: a | time ∝ Qᵇ: b | time ∝ Pᶜ: c | memory ∝ nᵈ: d | memory ∝ Pᵉ: e | "
        + " | ".join(f"{name}, *extrapolated*" for _, name, _ in REFERENCE_SCALES) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(REFERENCE_SCALES),
    ]


def _exponent_row(estimator: str, slopes: dict) -> str:
    """One estimator's exponents with their intervals and its extrapolations to the reference scales."""

    def shown(axis: str, kind: str) -> str:
        slope = slopes.get((estimator, axis, kind))
        if slope is None:
            return "–"
        if math.isnan(slope.low):
            return f"{slope.slope:.2f} (2 points)"
        return f"{slope.slope:.2f} ({slope.low:.2f} – {slope.high:.2f})"

    cells = []
    for axis, _, value in REFERENCE_SCALES:
        time_line, memory_line = slopes.get((estimator, axis, "time")), slopes.get((estimator, axis, "memory"))
        if time_line is None or math.isnan(time_line.low):  # no interval: not followed outside the range
            cells.append("–")
            continue
        low, high = time_line.span(value)
        text = f"{_fmt_seconds(time_line.at(value))} ({_fmt_seconds(low)} – {_fmt_seconds(high)})"
        if memory_line is not None and not math.isnan(memory_line.low):
            needed, (low, high) = memory_line.at(value), memory_line.span(value)
            over = [label for label, limit in MEMORY_LIMITS_MB if needed > limit]
            text += (f", {needed / 1024:.3g} GiB ({low / 1024:.3g} – {high / 1024:.3g})"
                     + (f", does not fit in {over[-1]}" if over else ""))
        cells.append(text)
    return (f"| `{estimator}` | {shown('n', 'time')} | {shown('Q', 'time')} | {shown('P', 'time')} | "
            f"{shown('n', 'memory')} | {shown('P', 'memory')} | " + " | ".join(cells) + " |")


def _ridges(points: Sequence[Point]) -> str:
    """``; λ = 0.12 at width 1, …`` from the P axis's points."""
    by_width = {p.width: p.ridge for p in points if p.axis == "P" and p.ridge}
    return ("; λ = " + ", ".join(f"{ridge:.3g} at width {width}" for width, ridge in sorted(by_width.items()))
            if by_width else "")


def _at(point: Point) -> str:
    """Where a point sits: ``n = 500, Q = 20`` or ``width 4``."""
    return f"width {point.width}" if point.axis == "P" else f"n = {point.n_train}, Q = {point.n_queries}"


def figure(points: Sequence[Point], folder: Path) -> list[Path]:
    """Time (top) and own memory (bottom) against n, Q and P, log–log, a line per estimator (seaborn); drawn
    only where the points changed (:mod:`bench.figure_cache`)."""
    measured = [p for p in points if p.seconds is not None]
    if not measured:
        return []
    return [drawn(folder / "scaling.png", [dataclasses.asdict(p) for p in measured],
                  lambda path: _draw(path, measured), (Path(__file__),))]


def _draw(path: Path, measured: list[Point]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    shown_axes = [(axis, label) for axis, label in (("n", "training points n"), ("Q", "queries Q"), ("P", "parameters P"))
                  if any(p.axis == axis for p in measured)]
    names = list(dict.fromkeys(p.estimator for p in measured))
    palette = dict(zip(names, sns.color_palette("husl", len(names)), strict=True))  # one colour per estimator
    fig, axes = plt.subplots(2, len(shown_axes), figsize=(5.2 * len(shown_axes), 8.4), squeeze=False)
    for column, (axis, label) in enumerate(shown_axes):
        mine = [p for p in measured if p.axis == axis]
        for row, (ylabel, value) in enumerate((("fit + score seconds", lambda p: p.seconds),
                                               ("own memory MB", lambda p: p.own_mb))):
            ax = axes[row][column]
            shown = [p for p in mine if value(p)]  # log axes: zero memory increments are left out
            if shown:
                sns.lineplot(x=[p.x() for p in shown], y=[value(p) for p in shown], hue=[p.estimator for p in shown],
                             palette=palette, marker="o", ax=ax, legend=(row, column) == (0, len(shown_axes) - 1))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"{label} (log)")
            ax.set_ylabel(f"{ylabel} (log)")
    legend = axes[0][-1].get_legend()
    if legend is not None:
        axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
