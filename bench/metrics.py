"""Agreement metrics between predicted and actual removal effects, their intervals, and the noise ceiling.

Per query (row), across the scored columns (removed points, groups, subsets);
then the mean over queries.

A query whose *actual* row is constant has nothing to rank: its correlations are
undefined (NaN) and it is dropped, for every estimator alike. A *predicted* row
that is constant (e.g. FastIF when no removed point is among a query's nearest
neighbours) carries no rank information and scores 0, so that every estimator is
averaged over the same queries rather than over those it chose to rank.

Intervals come from a **two-way bootstrap**: queries and columns are resampled
together, because every query shares the same removed points / groups / subsets
(resampling queries alone misses the columns' share of the uncertainty). The
interval is the estimate ± 1.96 bootstrap standard errors: a correlation over a
resample of few columns, some of them repeated, is pulled towards 0, so the
resamples' *location* is biased (percentile intervals, and bias-corrected ones
when the shift exceeds the spread, can exclude the estimate), while their
*spread* still measures the sampling variability (if anything, generously).

The **noise ceiling** of a non-convex ground truth (K retraining seeds, scored
against their mean): with seed-vs-seed correlation r per query, the K-seed mean
has reliability ρ_K = K·r / (1 + (K−1)·r) (Spearman–Brown), and no predictor that
is independent of the retraining noise correlates with it beyond √ρ_K in
expectation (an oracle that knows the noise-free effect reaches it).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import numpy as np

#: Part of every cell's cache key: bump it when a metric's definition changes, so finished cells are re-scored.
#: 2: a constant predicted row scores 0 (was dropped as undefined).
#: 3: scored against the mean of all retraining seeds; two-way bootstrap; ceiling √ρ_K.
#: 4: bias-corrected percentiles (plain percentiles missed estimates over small column blocks).
#: 5: estimate ± 1.96 two-way bootstrap standard errors (BC missed them too, from the other side).
#: 6: the deterministic track's ceiling from its float32 floor and smoothness probe (was 1).
VERSION = 6
CORRELATIONS = ("pearson", "spearman", "kendall")
METRICS = (*CORRELATIONS, "top_k_overlap")
#: A cell is *informative* when its noise ceiling's lower bound reaches this: below it, the retraining noise
#: leaves too little signal for estimators' differences to mean anything, and the cell is not ranked.
INFORMATIVE_CEILING = 0.2
#: Correlations computed row-wise in one vectorised pass (bootstrap and ceiling use them).
VECTORISED = ("pearson", "spearman")


_TITLES = {"pearson": "Pearson", "spearman": "Spearman", "kendall": "Kendall", "lds": "LDS", "lds_margin": "LDS (margin)",
           "auc": "AUC",
           "f1": "F1", "param_distance": "‖θ−θ_R‖ rel.", "f1_best_alpha": "F1 at α* (validation)", "alpha_star": "α*"}


def metric_title(name: str, top_k: int = 10) -> str:
    """A metric's column title (its name where there is no shorter one)."""
    if name.startswith("lds_drop_"):  # lds-replay's sweep columns (bench.groundtruth.replay.sweep_metric)
        return f"LDS, {100 * float(name.removeprefix('lds_drop_')):g}% dropped"
    return f"top-{top_k} overlap" if name == "top_k_overlap" else _TITLES.get(name, name)


def top_k_overlap(predicted: np.ndarray, actual: np.ndarray, k: int) -> float:
    """|top-k(predicted) ∩ top-k(actual)| / k, top = largest values (most helpful)."""
    k = min(k, len(actual))
    top_predicted = np.argsort(-predicted, kind="stable")[:k]
    top_actual = np.argsort(-actual, kind="stable")[:k]
    return len(np.intersect1d(top_predicted, top_actual)) / k


def rowwise(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson or Spearman of ``x[..., q, :]`` with ``y[..., q, :]`` for every row: ``[..., Q]``.

    NaN where the ``y`` row is constant or has fewer than 2 entries, 0 where only the ``x`` row is.
    """
    if name not in VECTORISED:
        raise ValueError(f"rowwise: unknown correlation {name!r}. Valid: {', '.join(VECTORISED)}")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    y_constant = np.ptp(y, axis=-1) == 0 if y.shape[-1] else np.ones(y.shape[:-1], dtype=bool)
    x_constant = np.ptp(x, axis=-1) == 0 if x.shape[-1] else np.ones(x.shape[:-1], dtype=bool)
    if name == "spearman":
        import scipy.stats  # lazy: the report layer reads this module's names, not its scipy

        x, y = scipy.stats.rankdata(x, axis=-1), scipy.stats.rankdata(y, axis=-1)
    x, y = _centred_unit_scale(x), _centred_unit_scale(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    r = np.clip(r, -1.0, 1.0)
    r = np.where(x_constant, 0.0, r)
    return np.where(y_constant | (x.shape[-1] < 2), np.nan, r)


def _centred_unit_scale(x: np.ndarray) -> np.ndarray:
    """Rows minus their mean, divided by their largest magnitude (so tiny or huge values neither underflow nor
    overflow in the products; correlation is scale-free). Constant rows stay 0."""
    x = x - x.mean(-1, keepdims=True)
    scale = np.abs(x).max(-1, keepdims=True) if x.shape[-1] else np.ones((*x.shape[:-1], 1))
    return x / np.where(scale > 0, scale, 1.0)


def _kendall(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(y) == 0:
        return float("nan")  # nothing to rank
    if np.ptp(x) == 0:
        return 0.0  # a constant prediction carries no rank information
    import scipy.stats  # lazy, as in rowwise

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(scipy.stats.kendalltau(x, y).statistic)


def per_query(predicted: np.ndarray, actual: np.ndarray, top_k: int = 10) -> dict[str, np.ndarray]:
    """Each metric for each query: ``{name: [Q]}``; NaN where the actual row is constant."""
    predicted, actual = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} must be equal 2-D shapes")
    values = {name: rowwise(name, predicted, actual) for name in VECTORISED}
    values["kendall"] = np.array([_kendall(p, a) for p, a in zip(predicted, actual, strict=True)])
    values["top_k_overlap"] = np.array([top_k_overlap(p, a, top_k) for p, a in zip(predicted, actual, strict=True)])
    return values


def spearman_brown(r: np.ndarray | float, k: int) -> np.ndarray:
    """Reliability of the mean of ``k`` measurements whose pairwise correlation is ``r`` (clipped to [0, 1])."""
    r = np.clip(np.asarray(r, dtype=np.float64), 0.0, 1.0)
    return k * r / (1.0 + (k - 1) * r)


def seed_agreement(name: str, replicates: np.ndarray) -> np.ndarray:
    """Mean over seed pairs of the row-wise correlation between two seeds' ground truths: ``[..., Q]``.

    ``replicates [K, ..., Q, C]`` (K ≥ 2): the same effects under K retraining seeds.
    """
    pairs = list(itertools.combinations(range(len(replicates)), 2))
    if not pairs:
        raise ValueError(f"seed agreement needs at least 2 retraining seeds, got {len(replicates)}")
    values = np.stack([rowwise(name, replicates[s], replicates[t]) for s, t in pairs])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a query undefined for every pair stays NaN
        return np.nanmean(values, axis=0)


def ceiling(name: str, replicates: np.ndarray) -> np.ndarray:
    """Per query, the best expected correlation with the K-seed mean: √ρ_K (see the module docstring): ``[..., Q]``."""
    return np.sqrt(spearman_brown(seed_agreement(name, replicates), len(replicates)))


def replay_ceiling(noise_var: float, replay_effects: np.ndarray) -> np.ndarray:
    """Per query, the best expected correlation with a replayed truth ``[Q, C]`` whose every replay carries
    arithmetic noise of variance ``noise_var`` (what no estimator that does not reproduce the trainer's rounding
    can predict): √(1 − noise_var / v_q), v_q the query's variance across the columns; ``[..., Q]`` in [0, 1]."""
    spread = np.var(np.asarray(replay_effects, dtype=np.float64), axis=-1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        reliability = np.where(spread > 0, 1.0 - noise_var / spread, np.nan)
    return np.sqrt(np.clip(reliability, 0.0, 1.0))


#: ``statistic(rows, columns)``: per-query values ``[..., Q]`` for resampled query rows ``[..., Q]`` and column
#: indices (each ``[..., L]``), a leading batch of resamples or none; :func:`take` indexes a matrix with them.
Statistic = Callable[[np.ndarray, list[np.ndarray]], np.ndarray]
#: ``draw(rng)``: resampled column indices (the protocol knows which columns belong together).
ColumnDraw = Callable[[np.random.Generator], list[np.ndarray]]
#: Resampled entries (rows × columns) a bootstrap batch holds at a time, whatever the matrix's size.
BATCH_ENTRIES = 2_000_000


def take(matrix: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``matrix[..., rows, columns]`` as a grid: ``[..., B, Q, L]`` from ``matrix [..., R, C]``, ``rows [B, Q]``
    and ``columns [B, L]`` (``[..., Q, L]`` without the batch axis)."""
    return matrix[..., rows[..., :, None], columns[..., None, :]]


def two_way_bootstrap(statistic: Statistic, n_rows: int, draw_columns: ColumnDraw, *, estimate: float,
                      resamples: int = 1000, seed: int = 0, bounds: tuple[float, float] = (-1.0, 1.0)) -> tuple[float, float]:
    """95% CI of ``estimate``, the mean over queries of ``statistic``: estimate ± 1.96 standard deviations of the
    resampled means, queries and columns resampled together; clipped to ``bounds`` (a correlation's range).

    Resamples are drawn one by one (rows, then columns, from one generator) and the statistic is evaluated on a
    batch of them at a time, so the draws, and the interval, do not depend on the batch size."""
    generator = np.random.default_rng(seed)
    draws = [(generator.integers(0, n_rows, n_rows), draw_columns(generator)) for _ in range(resamples)]
    entries = n_rows * sum(len(block) for block in draws[0][1]) if draws else 1
    size, means = max(1, BATCH_ENTRIES // max(1, entries)), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no defined query is skipped
        for start in range(0, resamples, size):
            chunk = draws[start : start + size]
            rows = np.stack([r for r, _ in chunk])
            columns = [np.stack(block) for block in zip(*(c for _, c in chunk), strict=True)]
            means.append(np.nanmean(statistic(rows, columns), axis=-1))
    values = np.concatenate(means) if means else np.empty(0)
    values = values[np.isfinite(values)]
    if len(values) < 2 or not np.isfinite(estimate):
        return float("nan"), float("nan")
    half = 1.959963984540054 * float(np.std(values, ddof=1))
    return max(bounds[0], estimate - half), min(bounds[1], estimate + half)
