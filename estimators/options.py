"""Checks of estimator options, called from each ``Config.__post_init__`` so a bad value is refused when the
suite is planned (bench.config.make_config turns the ValueError into a one-line error), before any work.
Pure Python: imports nothing from the rest of ifbench."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def at_least(minimum: float, **values: float) -> None:
    """Each named value ≥ ``minimum``."""
    for name, value in values.items():
        if not value >= minimum:  # also refuses NaN
            raise ValueError(f"{name} must be ≥ {minimum:g}, got {value!r}")


def positive(**values: float) -> None:
    """Each named value > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def within(name: str, value: float, low: float, high: float, *, why: str = "") -> None:
    """``low ≤ value < high``."""
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}){f' ({why})' if why else ''}, got {value!r}")


def one_of(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` among ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}. Valid: {', '.join(map(str, choices))}")
