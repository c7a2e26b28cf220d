"""One record per (task, protocol, estimator): a cell's records pooled over its base models.

A task run with ``base_models = M > 1`` repeats every cell on M independently
trained θ̂_b (same data, queries and columns; the estimator fitted around each,
and the ground truth too unless no θ̂ enters it). The pooled record holds:

- metrics, ceiling and cost: the means over base models (memory: the largest);
- intervals: random-effects 95% intervals of the mean over base models
  (:func:`bench.ranking.random_effects_interval`: a t-interval over the base
  models combined with their mean within-model variance, each se_b read off base
  model b's bootstrap interval as half-width / 1.96). They cover the mean over
  base models one could have trained, not just the uncertainty given these;
  ``spread`` gives each metric's lowest and highest base model;
- ``per_query_by_base``: the headline per base model and query, for paired rank bands;
- ``informative``: the pooled ceiling's random-effects lower bound ≥ ``metrics.INFORMATIVE_CEILING``;
- facts: those the base models share, numbers that differ shown as their range.

A cell with one record passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from bench.metrics import INFORMATIVE_CEILING
from bench.ranking import Z95, random_effects_interval
from bench.records import Fact, Profile, Record, as_records


def select_latest(records: Iterable[Record | Mapping[str, Any]]) -> list[Record]:
    """The last record of each (task, protocol, estimator, base model), in first-seen order (JSON objects read
    as ``records.jsonl`` holds them)."""
    latest: dict[tuple[str, str, str, int], Record] = {}
    for record in as_records(list(records)):
        latest[(*record.cell, record.base_model or 0)] = record
    return list(latest.values())


def pool_base_models(records: Iterable[Record | Mapping[str, Any]]) -> list[Record]:
    """The latest records with each cell's base models pooled into one record (see the module docstring)."""
    cells: dict[tuple[str, str, str], list[Record]] = {}
    for record in select_latest(records):
        cells.setdefault(record.cell, []).append(record)
    return [group[0] if len(group) == 1 else pooled(sorted(group, key=lambda r: r.base_model or 0))
            for group in cells.values()]


def pooled(group: list[Record]) -> Record:
    """One record from the records of one cell on several base models."""
    first = group[0]
    record = dataclasses.replace(first, base_model=None, base_models=len(group),
                                 facts=pooled_facts([r.facts for r in group]))
    bad = next((r for r in group if r.status == "failed"), None) or next((r for r in group if r.status != "ok"), None)
    if bad is not None:
        where = f"base model {(bad.base_model or 0) + 1} of {len(group)}"
        return dataclasses.replace(record, status=bad.status, reason=bad.reason if bad.reason is not None
                                   else record.reason, error=f"{bad.error} ({where})", metrics={}, ci={})
    metrics = [r.metrics for r in group]
    headline = first.headline
    by_base = [r.per_query[headline] for r in group] if all(headline in (r.per_query or {}) for r in group) else None
    shared = len({r.truth_key for r in group}) == 1 and first.truth_key is not None
    truth = pooled_truth([dict(r.groundtruth_diagnostics) for r in group], headline, shared=shared)
    task = _means([dict(r.task_diagnostics) for r in group])
    task.update({f"{k}_range": _range([r.task_diagnostics.get(k) for r in group])
                 for k in ("test_accuracy",) if k in task})
    profiles = [dataclasses.asdict(r.profile) for r in group if r.profile is not None]
    return dataclasses.replace(
        record,
        metrics={k: _mean([m.get(k) for m in metrics]) for k in metrics[0]},
        spread={k: _interval_of(_range([m.get(k) for m in metrics])) for k in metrics[0]},
        ci={k: _interval_of(interval([m.get(k) for m in metrics], [r.ci.get(k) for r in group])) for k in first.ci},
        per_query_by_base=by_base, per_query=None, ceiling=_mean([r.ceiling for r in group]),
        groundtruth_diagnostics=truth, shared_truth=shared, informative=bool(truth.get("informative", True)),
        task_diagnostics=task,
        estimator_diagnostics=_means([dict(r.estimator_diagnostics or {}) for r in group]),
        profile=Profile(**_means(profiles, largest=lambda k: k.endswith("_mb"))) if profiles else None,
        extra={k: v for k, v in first.extra.items() if k != "details"})


def interval(values: list[Any], intervals: list[Any]) -> list[float] | None:
    """The random-effects 95% interval of the mean of ``values`` (one per base model) from their bootstrap
    intervals (None if any value or interval is missing)."""
    if not all(_finite(v) for v in values) or not all(
            isinstance(ci, (list, tuple)) and len(ci) >= 2 and None not in ci[:2] for ci in intervals):
        return None
    low, high = random_effects_interval(values, [(ci[1] - ci[0]) / (2 * Z95) for ci in intervals])
    return [low, high]


def pooled_truth(diagnostics: list[dict[str, Any]], headline: str, *, shared: bool = False) -> dict[str, Any]:
    """Ground-truth diagnostics: means (seconds: the total, or the one truth's when every base model ``shared``
    it), the ceiling's interval pooled, informative anew."""
    pooled = _means(diagnostics)
    if all("seconds" in d for d in diagnostics) and not shared:
        pooled["seconds"] = sum(d["seconds"] for d in diagnostics)
    name = f"ceiling_{headline}"
    if name in pooled:
        pooled[f"{name}_ci"] = interval([d.get(name) for d in diagnostics], [d.get(f"{name}_ci") for d in diagnostics])
        low = (pooled[f"{name}_ci"] or [None])[0]
        pooled["informative"] = low is not None and low >= INFORMATIVE_CEILING
    elif any("informative" in d for d in diagnostics):
        pooled["informative"] = all(d.get("informative", True) for d in diagnostics)
    return pooled


def pooled_facts(facts: list[tuple[Fact, ...]]) -> tuple[Fact, ...]:
    """Position by position: a fact every base model states alike is kept; where only its values differ they
    are shown as their range ("r = 0.41–0.47"); otherwise the first base model's fact is marked as its own."""
    if any(len(f) != len(facts[0]) for f in facts):
        return tuple(_own(fact) for fact in facts[0])
    merged = []
    for versions in zip(*facts, strict=True):
        if len(set(versions)) == 1:
            merged.append(versions[0])
        elif len({(v.template, len(v.values)) for v in versions}) != 1 or not _shown_number(*versions):
            merged.append(_own(versions[0]))
        else:
            columns = zip(*(v.values for v in versions), strict=True)
            merged.append(Fact(versions[0].template, tuple(
                column[0] if len(set(column)) == 1 else "–".join(_extremes(list(column))) for column in columns)))
    return tuple(merged)


def _own(fact: Fact) -> Fact:
    return Fact(fact.template + " (base model 1)", fact.values)


def _extremes(numbers: list[str]) -> tuple[str, str]:
    """The smallest and largest of numbers as shown (``"1,234"``), in their shown form."""
    ordered = sorted(numbers, key=lambda n: float(n.replace(",", "")))
    return ordered[0], ordered[-1]


def _shown_number(*facts: Fact) -> bool:
    """Whether every value of ``facts`` is a number as shown (so that differing ones have a range)."""
    try:
        [float(v.replace(",", "")) for f in facts for v in f.values]
    except ValueError:
        return False
    return True


def _interval_of(pair: list[float] | None) -> tuple[float, float] | None:
    return None if pair is None else (pair[0], pair[1])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: list[Any]) -> float | None:
    return sum(values) / len(values) if values and all(_finite(v) for v in values) else None


def _range(values: list[Any]) -> list[float] | None:
    return [min(values), max(values)] if values and all(_finite(v) for v in values) else None


def _means(dicts: list[dict[str, Any]], largest: Any = None) -> dict[str, Any]:
    """Key by key over the first dict's keys: the mean of numbers (the largest where ``largest(key)``), the first
    value otherwise (strings, flags, lists)."""
    out: dict[str, Any] = {}
    for key, value in dicts[0].items():
        values = [d.get(key) for d in dicts]
        if _finite(value) and all(_finite(v) for v in values):
            out[key] = max(values) if largest is not None and largest(key) else sum(values) / len(values)
        else:
            out[key] = value
    return out
