"""How the report writes values and reads the fields every record shares (torch-free; the report's floor)."""

from __future__ import annotations

import math
from typing import Any

from bench.metrics import metric_title

DEFAULT_COLUMNS = ("spearman", "kendall", "top_k_overlap")


def num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def seconds(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def count(value: Any) -> str:
    """A parameter count: 7,850 · 1.8 M."""
    if value is None:
        return "–"
    return f"{value / 1e6:.1f} M" if value >= 1e6 else f"{int(value):,}"


def with_ci(record: dict[str, Any], name: str) -> str:
    mean = record.get("metrics", {}).get(name)
    low, high = (record.get("ci", {}).get(name) or [None, None])[:2]
    if mean is None:
        return "–"
    return f"{num(mean)} ({num(low)} – {num(high)})" if low is not None else num(mean)


def headline_of(record: dict[str, Any]) -> str:
    """The protocol's headline metric of a record."""
    return record.get("headline", "pearson")


def columns_of(record: dict[str, Any]) -> list[str]:
    return list(record.get("columns", DEFAULT_COLUMNS))


def title(record: dict[str, Any], name: str) -> str:
    """The protocol's title for a metric, marked ↓ where lower is better."""
    spec = record.get("metric_specs", {}).get(name, {})
    shown = spec.get("title", metric_title(name, record.get("top_k", 10)))
    return shown if spec.get("higher_is_better", True) else f"{shown} ↓"


def value_of(record: dict[str, Any]) -> float | None:
    """The headline of an ok record, or None."""
    value = record.get("metrics", {}).get(headline_of(record))
    return value if record.get("status") == "ok" and value is not None and math.isfinite(value) else None


def informative(record: dict[str, Any]) -> bool:
    return bool(record.get("informative", True))


def truth_kind(record: dict[str, Any]) -> str | None:
    """The kind of ground truth behind a record: ``exact`` (convex, retrained to the optimum), ``from scratch``
    (the full recipe from a fresh start), ``fine-tune response`` (θ̂ trained on without the points), or None
    (no retraining correlation: updates, mislabel detection)."""
    gt, config = record.get("groundtruth_diagnostics") or {}, record.get("protocol_config") or {}
    if record.get("ceiling") in (None, 0):
        return None
    if gt.get("exact_retraining"):
        return "exact"
    if gt.get("from_scratch") or config.get("retrain") == "scratch" or record.get("protocol") == "loo-scratch":
        return "from scratch"
    return "fine-tune response"


def fine_tune_text(record: dict[str, Any]) -> str:
    """What a fine-tune response's retraining was, from the protocol's config: "1 epoch from θ̂ at 0.1× …"."""
    config = record.get("protocol_config") or {}
    factor = config.get("warm_lr_factor", config.get("lr_factor", 0.1))
    epochs = config.get("epochs") or config.get("warm_epochs", 1.0)
    length = ("T = " + ", ".join(f"{e:g}" for e in epochs) + " epochs") if isinstance(epochs, list) else \
        f"{epochs:g} epoch{'s' if epochs != 1 else ''}"
    return f"{length} from θ̂ at {factor:g}× the learning rate without the removed points"


def option_text(value: Any) -> str:
    """An option as a reader writes it: ``*`` for every parameter, lists without quotes."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
