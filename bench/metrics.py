"""Agreement metrics between predicted and actual removal effects.

Per query (row), across the scored training points (columns); then the mean
over queries with a bootstrap 95% confidence interval over queries.

A query whose *actual* row is constant has nothing to rank: its correlations are
undefined (NaN) and it is dropped, for every estimator alike. A *predicted* row
that is constant (e.g. FastIF when no removed point is among a query's nearest
neighbours) carries no rank information and scores 0, so that every estimator is
averaged over the same queries rather than over those it chose to rank.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats

#: Part of every cell's cache key: bump it when a metric's definition changes, so finished cells are re-scored.
#: 2: a constant predicted row scores 0 (was dropped as undefined).
VERSION = 2
CORRELATIONS = ("pearson", "spearman", "kendall")
METRICS = (*CORRELATIONS, "top_k_overlap")


def top_k_overlap(predicted: np.ndarray, actual: np.ndarray, k: int) -> float:
    """|top-k(predicted) ∩ top-k(actual)| / k, top = largest values (most helpful)."""
    k = min(k, len(actual))
    top_predicted = np.argsort(-predicted, kind="stable")[:k]
    top_actual = np.argsort(-actual, kind="stable")[:k]
    return len(np.intersect1d(top_predicted, top_actual)) / k


def _correlation(name: str, x: np.ndarray, y: np.ndarray) -> float:
    """Correlation of predicted ``x`` with actual ``y``: NaN if ``y`` is constant, 0 if only ``x`` is."""
    if len(x) < 2 or np.ptp(y) == 0:
        return float("nan")  # nothing to rank
    if np.ptp(x) == 0:
        return 0.0  # a constant prediction carries no rank information
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "pearson":
            return float(scipy.stats.pearsonr(x, y).statistic)
        if name == "spearman":
            return float(scipy.stats.spearmanr(x, y).statistic)
        return float(scipy.stats.kendalltau(x, y).statistic)


def per_query(predicted: np.ndarray, actual: np.ndarray, top_k: int = 10) -> dict[str, np.ndarray]:
    """Each metric for each query: ``{name: [Q]}``; NaN where the actual row is constant."""
    predicted, actual = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} must be equal 2-D shapes")
    values = {name: np.array([_correlation(name, p, a) for p, a in zip(predicted, actual, strict=True)])
              for name in CORRELATIONS}
    values["top_k_overlap"] = np.array([top_k_overlap(p, a, top_k) for p, a in zip(predicted, actual, strict=True)])
    return values


@dataclass(frozen=True)
class Summary:
    """Mean over valid queries, its bootstrap 95% CI, and how many queries were valid."""

    mean: float
    low: float
    high: float
    n_valid: int


def summarise(values: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> Summary:
    """Mean with a percentile bootstrap CI over queries (NaN queries dropped)."""
    valid = values[np.isfinite(values)]
    if len(valid) == 0:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    mean = float(valid.mean())
    if len(valid) == 1 or np.ptp(valid) == 0:
        return Summary(mean, mean, mean, len(valid))
    result = scipy.stats.bootstrap(
        (valid,), np.mean, n_resamples=resamples, confidence_level=0.95,
        method="percentile", rng=np.random.default_rng(seed),
    )
    return Summary(mean, float(result.confidence_interval.low), float(result.confidence_interval.high), len(valid))
