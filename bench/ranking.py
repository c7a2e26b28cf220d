"""How the leaderboard ranks a column: random-effects intervals, rank bands, agreement, "does not separate".

Pure numpy over records (no torch), used by pooling and the leaderboard.

- **Random-effects interval** (:func:`random_effects_interval`): base models are a
  random draw of θ̂, and a reader asks about the mean over all of them, not over
  the B that were trained. The queries (and, for a truth shared by every base
  model, the columns) are the same for every base model, so their sampling error
  is common to all B and does not average out: it enters once, as the mean of the
  base models' within-model variances (their bootstrap standard errors). The
  base models' own spread enters through a t-interval with B − 1 degrees of
  freedom. Half-width: √((t·s/√B)² + (z·se̅)²), s the standard deviation of the B
  values, se̅² the mean of se_b². Conservative where within-model errors are less
  than fully shared (s then holds part of them too).
- **Rank bands** (:func:`rank_bands`): down the column from the leader (highest
  mean), each estimator is compared with its band's leader by a paired bootstrap
  of the difference in their headline on the same base models and queries (base
  models and queries resampled, the same draw for both; the columns are the same
  for every estimator, so the comparison is conditional on them). One whose
  difference's 95% interval reaches 0 is not significantly behind and joins the
  band; the first that is significantly behind leads the next band. Where records keep no
  per-query values (mislabel, updates) two estimators share a band when their
  95% intervals overlap.
- **Agreement** (:func:`agreeing`): estimators whose per-query headline agrees
  to within :data:`AGREEMENT` on every query of every base model compute the same
  quantity (e.g. one linear system by another solver): shown as agreeing with the
  first of them, not ranked apart.
- **Does not separate** (:func:`separation`): a column where the ``loss``
  baseline is at or above every estimator, or where every estimator other than
  the baselines shares band 1, is not ranked.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.records import Record

Z95 = 1.959963984540054
#: Built-in baselines: the floor (``random``) and the self-influence bar for mislabel detection (``loss``).
BASELINES = ("random", "loss")
#: Per-query headline values this close on every query and base model are one quantity.
AGREEMENT = 5e-4
#: Paired-bootstrap resamples behind each rank band comparison.
RESAMPLES = 2000


def random_effects_interval(values: Sequence[float], errors: Sequence[float]) -> tuple[float, float]:
    """95% interval of the mean over base models of ``values [B]`` with within-model standard errors
    ``errors [B]`` (see the module docstring); B = 1 gives the within-model interval."""
    values, errors = np.asarray(values, dtype=np.float64), np.asarray(errors, dtype=np.float64)
    mean, count = float(values.mean()), len(values)
    between = 0.0
    if count > 1:
        from scipy.special import stdtrit  # the t quantile without scipy.stats' import (0.7 s)

        t = float(stdtrit(count - 1, 0.975))
        between = t * float(values.std(ddof=1)) / math.sqrt(count)
    within = Z95 * math.sqrt(float(np.mean(errors**2)))
    half = math.hypot(between, within)
    return mean - half, mean + half


def per_query_matrix(record: Record) -> np.ndarray | None:
    """``[B, Q]`` headline values per base model and query (NaN where undefined), or None where not recorded."""
    rows = record.per_query_by_base
    if rows is None:
        own = (record.per_query or {}).get(record.headline)
        rows = [own] if own is not None else None
    if not rows or any(row is None for row in rows):
        return None
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def behind_leader(leader: np.ndarray, other: np.ndarray, *, seed: int) -> bool:
    """True if ``other [B, Q]`` is significantly below ``leader [B, Q]``: the 2.5th percentile of the paired
    bootstrap of mean(leader − other), base models and queries resampled together, is above 0. Each resample is
    a pair of multinomial count vectors, so all of them are two matrix products (undefined entries left out)."""
    diff = leader - other
    defined = np.isfinite(diff)
    count, queries = diff.shape
    generator = np.random.default_rng(seed)
    rows = generator.multinomial(count, np.full(count, 1 / count), size=RESAMPLES)  # [R, B]
    columns = generator.multinomial(queries, np.full(queries, 1 / queries), size=RESAMPLES)  # [R, Q]
    total = ((rows @ np.where(defined, diff, 0.0)) * columns).sum(1)
    weight = ((rows @ defined.astype(np.float64)) * columns).sum(1)
    means = total[weight > 0] / weight[weight > 0]
    return bool(len(means) and np.percentile(means, 2.5) > 0)


def _overlaps(leader: Record, other: Record) -> bool:
    """Interval overlap (the rule where no per-query values are kept); equality as shown without intervals."""
    a, b = leader.ci.get(leader.headline), other.ci.get(leader.headline)
    if a is None or b is None:
        return round(leader.headline_value, 3) == round(other.headline_value, 3)
    return b[1] >= a[0]


def _seed(*names: str) -> int:
    return zlib.crc32("/".join(names).encode())


def _behind(leader: Record, record: Record) -> bool:
    """Whether ``record`` is significantly behind ``leader`` (paired bootstrap, or intervals without overlap)."""
    a, b = per_query_matrix(leader), per_query_matrix(record)
    if a is not None and b is not None and a.shape == b.shape:
        return behind_leader(a, b, seed=_seed(leader.task, leader.protocol, leader.estimator, record.estimator))
    return not _overlaps(leader, record)


def rank_bands(records: list[Record], skip: Sequence[str] = ()) -> dict[str, int]:
    """Band of each ok record's estimator, ``skip`` left out (estimators shown as agreeing with another). Down
    the column from the best: an estimator not significantly behind the current band's leader joins its band;
    the first that is leads the next band. Bands therefore never rise down the column (a paired comparison is
    not transitive: testing each against the column's leader alone could put a lower value in a better band)."""
    ranked = sorted((r for r in records if r.headline_value is not None and r.estimator not in skip),
                    key=lambda r: (-r.headline_value, r.estimator))
    bands: dict[str, int] = {}
    band, leader = 0, None
    for record in ranked:
        if leader is None or _behind(leader, record):
            band, leader = band + 1, record
        bands[record.estimator] = band
    return bands


def agreeing(records: list[Record]) -> dict[str, str]:
    """``{estimator: the estimator it agrees with}`` (see :data:`AGREEMENT`): each agreeing cluster is shown under
    its member with the highest headline."""
    ok = sorted((r for r in records if r.headline_value is not None), key=lambda r: (-r.headline_value, r.estimator))
    matrices = {r.estimator: per_query_matrix(r) for r in ok}
    found: dict[str, str] = {}
    for i, first in enumerate(ok):
        a = matrices[first.estimator]
        if first.estimator in found or a is None:
            continue
        for other in ok[i + 1 :]:
            b = matrices[other.estimator]
            if other.estimator in found or b is None or b.shape != a.shape:
                continue
            both = np.isfinite(a) & np.isfinite(b)
            if both.any() and (np.isfinite(a) == np.isfinite(b)).all() and np.abs(a - b)[both].max() <= AGREEMENT:
                found[other.estimator] = first.estimator
    return found


def separation(records: list[Record], bands: dict[str, int]) -> str | None:
    """Why a column does not separate estimators (None if it does)."""
    values = {r.estimator: r.headline_value for r in records if r.headline_value is not None}
    methods = {name: v for name, v in values.items() if name not in BASELINES}
    if not methods:
        return None
    if "loss" in values and values["loss"] >= max(methods.values()):
        return "the `loss` baseline is at or above every estimator"
    banded = [name for name in methods if name in bands]
    if len(banded) >= 2 and all(bands[name] == 1 for name in banded):
        return "every estimator is within its paired 95% interval of the leader"
    return None


@dataclass(frozen=True)
class ColumnJudgement:
    """How one (task, protocol) column is ranked: ``bands`` (empty when unranked), ``agrees_with`` (estimators
    shown as the same quantity as another), ``not_separating`` (why the column is not ranked, or None)."""

    informative: bool
    bands: dict[str, int] = field(default_factory=dict)
    agrees_with: dict[str, str] = field(default_factory=dict)
    not_separating: str | None = None

    @property
    def ranked(self) -> bool:
        return self.informative and self.not_separating is None

    def band_of(self, estimator: str) -> int | None:
        """The band shown for ``estimator`` (an agreeing one's is its representative's); None if unranked."""
        return self.bands.get(self.agrees_with.get(estimator, estimator)) if self.ranked else None


def judge_column(records: list[Record]) -> ColumnJudgement:
    """Rank bands, agreement and separation of one column's pooled records."""
    informative = bool(records[0].informative) if records else True
    agrees = agreeing(records)
    bands = rank_bands(records, skip=tuple(agrees))
    return ColumnJudgement(informative, bands if informative else {}, agrees, separation(records, bands))
