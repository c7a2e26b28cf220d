"""How the report writes values and reads the fields every record shares (torch-free; the report's floor)."""

from __future__ import annotations

import math
from typing import Any

from bench.metrics import metric_title
from bench.records import Record


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


def with_ci(record: Record, name: str) -> str:
    mean, interval = record.metrics.get(name), record.ci.get(name)
    if mean is None:
        return "–"
    return f"{num(mean)} ({num(interval[0])} – {num(interval[1])})" if interval is not None else num(mean)


def headline_of(record: Record) -> str:
    """The protocol's headline metric of a record."""
    return record.headline


def columns_of(record: Record) -> list[str]:
    return list(record.columns)


def title(record: Record, name: str) -> str:
    """The protocol's title for a metric, marked ↓ where lower is better."""
    return record.metric_title(name, metric_title(name, record.top_k))


def value_of(record: Record) -> float | None:
    """The headline of an ok record, or None."""
    return record.headline_value


def informative(record: Record) -> bool:
    return record.informative


def truth_kind(record: Record) -> str | None:
    """The kind of ground truth behind a record: ``exact`` (convex, retrained to the optimum), ``from scratch``
    (the full recipe from a fresh start), ``fine-tune response`` (θ̂ trained on without the points),
    ``deterministic`` (θ̂'s own run replayed with the removed points' weights 0: no seed noise), or None
    (no retraining correlation: updates, mislabel detection)."""
    gt, config = record.groundtruth_diagnostics, record.protocol_config
    if record.ceiling in (None, 0):
        return None
    if gt.get("deterministic"):
        return "deterministic"
    if gt.get("exact_retraining"):
        return "exact"
    if gt.get("from_scratch") or config.get("retrain") == "scratch" or record.protocol == "loo-scratch":
        return "from scratch"
    return "fine-tune response"


def fine_tune_text(record: Record) -> str:
    """What a fine-tune response's retraining was, from the protocol's config: "1 epoch from θ̂ at 0.1× …"."""
    config = record.protocol_config
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
