"""The record contract: one typed :class:`Record` per cell, written and read through one schema.

A record is one (task, protocol, estimator, base model) cell's result: what it is (identity, settings and
the keys of the θ̂ and ground truth it was judged against), how it did (metrics with their specs and
intervals, per-query values), what its ground truth is (ceiling, informative, :class:`Fact` s) and what it
cost (:class:`Profile`). ``records.jsonl`` holds one JSON object per line with a ``schema_version``;
:meth:`Record.from_json` checks it: version 2 is read as written; version 1 (whose facts were sentences) is
upgraded on read, its sentences split once into template and numbers; any other version, or a line missing
a required field, is refused with a :class:`RecordSchemaError` that names both (never a KeyError later).

Diagnostics and configs stay open mappings (their keys are the estimator's, task's and protocol's own);
fields this module does not know are kept whole in ``extra`` and written back, so a record round-trips.
Torch-free: the report floor.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2
#: Versions this code reads (1: facts as sentences, upgraded on read).
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "failed", "not-applicable")
REQUIRED = ("cell_key", "task", "protocol", "estimator", "status")
DEFAULT_COLUMNS = ("spearman", "kendall", "top_k_overlap")
#: A number as a sentence shows it (``-0.41``, ``1,234``): only for upgrading version-1 facts.
_SHOWN_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class RecordSchemaError(ValueError):
    """A record this code cannot read: another schema version, or a required field missing or mistyped."""


@dataclass(frozen=True)
class Fact:
    """A sentence about a ground truth with its numbers apart: ``template`` has a ``{}`` for each of
    ``values`` (the numbers as shown, e.g. ``"0.412"``, ``"1,234"``), so base models' facts pool by value."""

    template: str
    values: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return self.template.format(*self.values)

    def to_json(self) -> dict[str, Any]:
        return {"template": self.template, "values": list(self.values)}

    @classmethod
    def from_json(cls, data: Any, *, version: int = SCHEMA_VERSION) -> Fact:
        if isinstance(data, str):  # version 1: split once at its shown numbers; else a sentence without values
            escaped = data.replace("{", "{{").replace("}", "}}")
            if version != 1:
                return cls(escaped)
            return cls(_SHOWN_NUMBER.sub("{}", escaped), tuple(_SHOWN_NUMBER.findall(escaped)))
        if isinstance(data, Fact):
            return data
        if not isinstance(data, Mapping) or not isinstance(data.get("template"), str):
            raise RecordSchemaError(f"a fact must be {{'template': str, 'values': [str, ...]}}, not {data!r}")
        return cls(data["template"], tuple(str(v) for v in data.get("values", ())))


def fact(template: str, *values: Any) -> Fact:
    """A :class:`Fact`: ``template`` with a ``{}`` per value; a value is shown as ``str(value)`` (format
    floats before: ``f"{r:.3f}"``)."""
    if template.count("{}") != len(values):
        raise ValueError(f"{template!r} has {template.count('{}')} placeholders for {len(values)} values")
    return Fact(template, tuple(str(v) for v in values))


@dataclass(frozen=True)
class MetricSpec:
    """How a protocol's metric is titled and read."""

    title: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Profile:
    """What an estimator cost in its cell: seconds of its own fit and score work; peak resident memory (MB) of
    the process during each, the most of the two, and the estimator's own increment (``own_mem_mb``); the
    same for CUDA where it ran there (None elsewhere)."""

    fit_s: float | None = None
    score_s: float | None = None
    fit_peak_mem_mb: float | None = None
    score_peak_mem_mb: float | None = None
    peak_mem_mb: float | None = None
    own_mem_mb: float | None = None
    fit_peak_cuda_mb: float | None = None
    score_peak_cuda_mb: float | None = None
    peak_cuda_mb: float | None = None
    rss_method: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RecordSchemaError(f"profile fields {sorted(unknown)} are not in the schema ({sorted(known)})")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


Interval = tuple[float, float] | None


@dataclass(frozen=True)
class Record:
    """One cell's result (see the module docstring). ``base_model`` is None on a record pooled over
    ``base_models`` (:mod:`bench.pooling`), which also sets ``spread``, ``per_query_by_base`` and
    ``shared_truth``. ``ci[name]`` is a 95% interval ``(low, high)`` or None."""

    cell_key: str
    task: str
    protocol: str
    estimator: str
    status: str
    error: str | None = None
    reason: str | None = None
    suite: str = "?"
    preset: str = "?"
    base_model: int | None = 0
    base_models: int = 1
    variant_of: str | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    ci: Mapping[str, Interval] = field(default_factory=dict)
    metric_specs: Mapping[str, MetricSpec] = field(default_factory=dict)
    headline: str = "pearson"
    columns: tuple[str, ...] = DEFAULT_COLUMNS
    column_noun: str = "columns"
    top_k: int = 10
    per_query: Mapping[str, list[float | None]] | None = None
    n_queries: int | None = None
    n_columns: int | None = None
    n_valid_queries: int | None = None
    ceiling: float | None = None
    informative: bool = True
    facts: tuple[Fact, ...] = ()
    profile: Profile | None = None
    task_diagnostics: Mapping[str, Any] = field(default_factory=dict)
    groundtruth_diagnostics: Mapping[str, Any] = field(default_factory=dict)
    estimator_diagnostics: Mapping[str, Any] | None = None
    estimator_config: Mapping[str, Any] = field(default_factory=dict)
    task_config: Mapping[str, Any] = field(default_factory=dict)
    protocol_config: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    threads: int | None = None
    device: str = "?"
    git_commit: str = "unknown"
    versions: Mapping[str, str] = field(default_factory=dict)
    created_at: str | None = None
    config_hash: str | None = None
    task_key: str | None = None
    base_digest: str | None = None
    truth_key: str | None = None
    truth_digest: str | None = None
    spread: Mapping[str, Interval] | None = None
    per_query_by_base: Sequence[list[float | None]] | None = None
    shared_truth: bool | None = None
    #: fields this schema does not name (a failure's cause, a protocol's details, ...), kept whole
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cell(self) -> tuple[str, str, str]:
        return (self.task, self.protocol, self.estimator)

    @property
    def headline_value(self) -> float | None:
        """The headline of an ok record, or None."""
        value = self.metrics.get(self.headline)
        ok = self.status == "ok" and isinstance(value, (int, float)) and math.isfinite(value)
        return float(value) if ok else None

    def metric_title(self, name: str, fallback: str) -> str:
        spec = self.metric_specs.get(name)
        shown = spec.title if spec is not None else fallback
        return shown if spec is None or spec.higher_is_better else f"{shown} ↓"

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "a record") -> Record:
        """The record of one ``records.jsonl`` line; refused (naming ``where``) if this code cannot read it."""
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise RecordSchemaError(f"{where} has schema version {version!r}; this ifbench reads versions "
                                    f"{', '.join(map(str, READABLE_VERSIONS))}: read it with the ifbench that wrote it, or run "
                                    "the suite again into a fresh --results folder")
        missing = [name for name in REQUIRED if not isinstance(data.get(name), str)]
        if missing:
            raise RecordSchemaError(f"{where} lacks the required text fields {missing}")
        if data["status"] not in STATUSES:
            raise RecordSchemaError(f"{where} has status {data['status']!r}; valid: {', '.join(STATUSES)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if (k in known and v is not None) or k in ("error", "base_model")}
        try:
            values.update(_typed_pieces(data, version))
            return cls(**values, extra={k: v for k, v in data.items() if k not in known and k != "schema_version"})
        except (TypeError, ValueError) as err:
            raise RecordSchemaError(f"{where}: {err}") from err

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this record, with ``schema_version``, that :meth:`from_json` reads back equal."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **self.extra}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in _POOLED_OR_OPTIONAL):
                continue
            out[f.name] = value
        out.update(facts=[f.to_json() for f in self.facts], columns=list(self.columns),
                   metric_specs={k: dataclasses.asdict(v) for k, v in self.metric_specs.items()},
                   ci={k: list(v) if v is not None else None for k, v in self.ci.items()})
        if self.profile is not None:
            out["profile"] = self.profile.to_json()
        if self.spread is not None:
            out["spread"] = {k: list(v) if v is not None else None for k, v in self.spread.items()}
        return out


_POOLED_OR_OPTIONAL = frozenset({"spread", "per_query_by_base", "shared_truth", "profile", "per_query",
                                 "estimator_diagnostics", "variant_of", "reason", "n_valid_queries"})


def _typed_pieces(data: Mapping[str, Any], version: int) -> dict[str, Any]:
    """The fields of ``data`` that are typed values of their own: facts, specs, intervals, profile."""
    pieces: dict[str, Any] = {
        "facts": tuple(Fact.from_json(f, version=version) for f in data.get("facts") or ()),
        "metric_specs": {k: MetricSpec(**v) for k, v in (data.get("metric_specs") or {}).items()},
        "ci": {k: _interval(v) for k, v in (data.get("ci") or {}).items()},
        "columns": tuple(DEFAULT_COLUMNS if data.get("columns") is None else data["columns"]),
    }
    if data.get("profile") is not None:
        pieces["profile"] = Profile.from_json(data["profile"])
    if data.get("spread") is not None:
        pieces["spread"] = {k: _interval(v) for k, v in data["spread"].items()}
    return pieces


def _interval(value: Any) -> Interval:
    if value is None or (isinstance(value, Sequence) and (len(value) < 2 or None in value[:2])):
        return None
    if not isinstance(value, Sequence) or not all(isinstance(v, (int, float)) for v in value[:2]):
        raise RecordSchemaError(f"an interval must be [low, high], not {value!r}")
    return (float(value[0]), float(value[1]))


def as_records(rows: Sequence[Record | Mapping[str, Any]]) -> list[Record]:
    """Records as given, or read from their JSON objects (as ``records.jsonl`` holds them; one built in memory
    without a ``schema_version`` is read as this version's)."""
    return [row if isinstance(row, Record) else Record.from_json({"schema_version": SCHEMA_VERSION, **row})
            for row in rows]
