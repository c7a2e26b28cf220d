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

import math
import re
from collections.abc import Iterable
from typing import Any

from bench.metrics import INFORMATIVE_CEILING
from bench.ranking import Z95, random_effects_interval

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def select_latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each (task, protocol, estimator, base model), in first-seen order."""
    latest: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for record in records:
        latest[(record["task"], record["protocol"], record["estimator"], record.get("base_model") or 0)] = record
    return list(latest.values())


def pool_base_models(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest records with each cell's base models pooled into one record (see the module docstring)."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for record in select_latest(records):
        cells.setdefault((record["task"], record["protocol"], record["estimator"]), []).append(record)
    return [group[0] if len(group) == 1 else pooled(sorted(group, key=lambda r: r.get("base_model") or 0))
            for group in cells.values()]


def pooled(group: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the records of one cell on several base models."""
    first = group[0]
    record = {**first, "base_model": None, "base_models": len(group),
              "facts": pooled_facts([r.get("facts", []) for r in group])}
    bad = next((r for r in group if r.get("status") == "failed"), None) or next(
        (r for r in group if r.get("status") != "ok"), None)
    if bad is not None:
        where = f"base model {(bad.get('base_model') or 0) + 1} of {len(group)}"
        return {**record, **{k: bad.get(k) for k in ("status", "reason") if k in bad},
                "error": f"{bad.get('error')} ({where})", "metrics": {}, "ci": {}}
    metrics = [r.get("metrics", {}) for r in group]
    record["metrics"] = {k: _mean([m.get(k) for m in metrics]) for k in metrics[0]}
    record["spread"] = {k: _range([m.get(k) for m in metrics]) for k in metrics[0]}
    record["ci"] = {k: interval([m.get(k) for m in metrics], [r.get("ci", {}).get(k) for r in group])
                    for k in first.get("ci", {})}
    headline = first.get("headline", "pearson")
    if all(headline in (r.get("per_query") or {}) for r in group):
        record["per_query_by_base"] = [r["per_query"][headline] for r in group]
    record.pop("per_query", None)
    record["ceiling"] = _mean([r.get("ceiling") for r in group])
    shared = len({r.get("truth_key") for r in group}) == 1 and first.get("truth_key") is not None
    record["groundtruth_diagnostics"] = pooled_truth([r.get("groundtruth_diagnostics") or {} for r in group],
                                                     first.get("headline", "pearson"), shared=shared)
    record["shared_truth"] = shared
    record["informative"] = bool(record["groundtruth_diagnostics"].get("informative", True))
    record["task_diagnostics"] = _means([r.get("task_diagnostics") or {} for r in group])
    record["task_diagnostics"].update({f"{k}_range": _range([(r.get("task_diagnostics") or {}).get(k) for r in group])
                                       for k in ("test_accuracy",) if k in record["task_diagnostics"]})
    record["estimator_diagnostics"] = _means([r.get("estimator_diagnostics") or {} for r in group])
    record["profile"] = _means([r.get("profile") or {} for r in group], largest=lambda k: k.endswith("_mb"))
    record.pop("details", None)
    return record


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


def pooled_facts(facts: list[list[str]]) -> list[str]:
    """Position by position: a fact every base model states alike is kept; where only numbers differ they are
    shown as their range ("r = 0.41–0.47"); otherwise the first base model's fact is marked as its own."""
    if any(len(f) != len(facts[0]) for f in facts):
        return [f"{fact} (base model 1)" for fact in facts[0]]
    merged = []
    for versions in zip(*facts, strict=True):
        if len(set(versions)) == 1:
            merged.append(versions[0])
            continue
        skeletons = {_NUMBER.sub("#", v) for v in versions}
        if len(skeletons) != 1:
            merged.append(f"{versions[0]} (base model 1)")
            continue
        numbers = [_NUMBER.findall(v) for v in versions]
        parts = _NUMBER.split(versions[0])
        out = [parts[0]]
        for i, part in enumerate(parts[1:]):
            column = [n[i] for n in numbers]
            out.append(column[0] if len(set(column)) == 1 else "–".join(_extremes(column)))
            out.append(part)
        merged.append("".join(out))
    return merged


def _extremes(numbers: list[str]) -> tuple[str, str]:
    """The smallest and largest of numbers as shown (``"1,234"``), in their shown form."""
    ordered = sorted(numbers, key=lambda n: float(n.replace(",", "")))
    return ordered[0], ordered[-1]


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
