"""Suite configuration: TOML files parsed into frozen, validated dataclasses.

A suite file looks like::

    name = "default"
    seed = 0
    threads = 2
    estimators = ["all"]            # or a list of names

    [[tasks]]
    name = "mnist-logreg"
    preset = "default"              # any other key overrides a preset field

    [[protocols]]
    name = "loo"
    n_removed = 100

    [estimator_options.if-lissa]    # per-estimator Config fields
    depth = 3000

    [estimator_variants.if-cg-net]  # a second configuration under its own name, run as its own row
    of = "if-cg"                    # the registered estimator, with its estimator_options, then these
    tasks = ["mnist-resnet"]        # optional: the tasks it runs on (default: all)
    parameters = ["*"]              # every parameter of the network
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

BUILTIN_SUITES = ("smoke", "default", "full")
DEVICES = ("cpu", "cuda")


class ConfigError(ValueError):
    """A malformed suite file or option; the message names the bad value and the valid choices."""


def _freeze(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


@dataclass(frozen=True)
class ComponentSpec:
    """A named component (task, protocol or estimator) with option overrides."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    preset: str = "default"
    #: tasks only: the suite protocols to run on this task (empty: all of them)
    protocols: tuple[str, ...] = ()
    #: tasks only: independently trained base models θ̂ each cell is repeated on (non-convex tasks)
    base_models: int = 1
    #: tasks only: protocol options for this task, over the suite's ``[[protocols]]`` options
    protocol_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    @classmethod
    def of(cls, name: str, preset: str = "default", protocols: tuple[str, ...] = (), base_models: int = 1,
           protocol_options: Mapping[str, Mapping[str, Any]] | None = None, **options: Any) -> ComponentSpec:
        frozen = tuple(sorted((k, _freeze(v)) for k, v in (protocol_options or {}).items()))
        return cls(name=name, options=_freeze(options), preset=preset, protocols=tuple(protocols),
                   base_models=base_models, protocol_options=frozen)

    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)

    def protocol_options_for(self, protocol: str) -> dict[str, Any]:
        return dict(dict(self.protocol_options).get(protocol, ()))


@dataclass(frozen=True)
class EstimatorVariant:
    """A registered estimator (``of``) run under another ``name`` with ``options`` over the suite's options for
    it, on ``tasks`` only (empty: every task)."""

    name: str
    of: str
    tasks: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SuiteConfig:
    """Everything that decides a run's numbers (plus where results go)."""

    name: str
    tasks: tuple[ComponentSpec, ...]
    protocols: tuple[ComponentSpec, ...]
    estimators: tuple[str, ...] = ("all",)
    estimator_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    estimator_variants: tuple[EstimatorVariant, ...] = ()
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    bootstrap_resamples: int = 1000
    top_k: int = 10
    #: cells run in a worker process, so a crash, exit, hang or memory blow-up fails one cell, not the run
    isolate: bool = True
    #: a cell (its estimator's fit, when first, and its scoring) running longer than this fails
    cell_timeout_s: float = 1800.0
    #: a cell whose worker's resident memory exceeds this fails (0: no cap)
    cell_memory_mb: float = 0.0
    #: retrains run in this many local worker processes, each with ``threads`` torch threads (1: in process);
    #: the numbers do not depend on it
    workers: int = 1
    #: retrains run on Dask instead: ``local:N`` (a local cluster of N workers) or ``tcp://HOST:PORT``
    scheduler: str = ""

    def options_for(self, estimator: str) -> dict[str, Any]:
        return dict(dict(self.estimator_options).get(estimator, ()))


_SUITE_KEYS = {f.name for f in dataclasses.fields(SuiteConfig)}


def make_config(config_cls: type[C], options: Mapping[str, Any], what: str, base: C | None = None) -> C:
    """Build ``config_cls`` from ``options`` (over ``base``), rejecting unknown or ill-typed keys."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(f"unknown option {key!r} for {what}.{hint} Valid options: {valid}")
    start = base if base is not None else config_cls()
    checked = {}
    for key, value in options.items():
        current = getattr(start, key)
        checked[key] = _coerce(value, current, f"{what}.{key}")
    try:
        return dataclasses.replace(start, **checked)  # type: ignore[type-var]
    except ValueError as err:  # a config's own __post_init__ check: refused at planning, before any work
        raise ConfigError(f"{what}: {err}") from None


def _coerce(value: Any, current: Any, where: str) -> Any:
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    return value


_TASK_ONLY_KEYS = ("name", "preset", "protocols", "base_models", "protocol_options")


def _component_list(raw: Any, key: str) -> tuple[ComponentSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"suite key {key!r} must be a non-empty array of tables like [[{key}]] name = ...")
    specs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{key}[{i}] must be a table with a string 'name', got {item!r}")
        options = {k: v for k, v in item.items() if k not in _TASK_ONLY_KEYS}
        protocols, base_models = item.get("protocols", []), item.get("base_models", 1)
        protocol_options = item.get("protocol_options", {})
        if key != "tasks" and any(k in item for k in _TASK_ONLY_KEYS[2:]):
            raise ConfigError(f"{key}[{i}]: only [[tasks]] tables take {', '.join(map(repr, _TASK_ONLY_KEYS[2:]))}")
        if not isinstance(protocol_options, dict) or not all(isinstance(v, dict) for v in protocol_options.values()):
            raise ConfigError(f"{key}[{i}]: [tasks.protocol_options.NAME] tables must hold option = value pairs, "
                              f"got {protocol_options!r}")
        if not isinstance(protocols, list) or not all(isinstance(p, str) for p in protocols):
            raise ConfigError(f"{key}[{i}].protocols must be a list of protocol names, got {protocols!r}")
        if isinstance(base_models, bool) or not isinstance(base_models, int) or base_models < 1:
            raise ConfigError(f"{key}[{i}].base_models must be an integer ≥ 1, got {base_models!r}")
        specs.append(ComponentSpec.of(item["name"], str(item.get("preset", "default")), tuple(protocols), base_models,
                                      protocol_options, **options))
    return tuple(specs)


def parse_suite(data: Mapping[str, Any], source: str = "<suite>") -> SuiteConfig:
    """Validate a parsed TOML mapping into a :class:`SuiteConfig`."""
    unknown = set(data) - _SUITE_KEYS
    if unknown:
        bad = sorted(unknown)[0]
        close = difflib.get_close_matches(bad, _SUITE_KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: unknown suite key {bad!r}.{hint} Valid keys: {', '.join(sorted(_SUITE_KEYS))}")
    estimators = data.get("estimators", ["all"])
    if isinstance(estimators, str):
        estimators = [estimators]
    if not isinstance(estimators, list) or not all(isinstance(e, str) for e in estimators):
        raise ConfigError(f"{source}: 'estimators' must be a list of names or ['all'], got {estimators!r}")
    est_options = data.get("estimator_options", {})
    if not isinstance(est_options, dict) or not all(isinstance(v, dict) for v in est_options.values()):
        raise ConfigError(f"{source}: [estimator_options.NAME] tables must hold option = value pairs")
    suite = SuiteConfig(
        name=str(data.get("name", Path(source).stem)),
        tasks=_component_list(data.get("tasks"), "tasks"),
        protocols=_component_list(data.get("protocols"), "protocols"),
        estimators=tuple(estimators),
        estimator_options=tuple(sorted((k, _freeze(v)) for k, v in est_options.items())),
        estimator_variants=_variants(data.get("estimator_variants", {}), source),
    )
    scalars = {k: data[k] for k in ("seed", "device", "threads", "bootstrap_resamples", "top_k", "isolate",
                                    "cell_timeout_s", "cell_memory_mb", "workers", "scheduler") if k in data}
    suite = make_config(SuiteConfig, scalars, f"suite {source}", base=suite)
    return validate_suite(suite)


def _variants(tables: Any, source: str) -> tuple[EstimatorVariant, ...]:
    """``[estimator_variants.NAME]`` tables: ``of`` (required), ``tasks`` (optional), options."""
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise ConfigError(f"{source}: [estimator_variants.NAME] tables must hold of = \"ESTIMATOR\" and options")
    variants = []
    for name, table in sorted(tables.items()):
        options = dict(table)
        of, tasks = options.pop("of", None), options.pop("tasks", [])
        if not isinstance(of, str) or not of:
            raise ConfigError(f"{source}: estimator variant {name!r} needs of = \"ESTIMATOR\" (the registered "
                              f"estimator it configures), got {of!r}")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"{source}: estimator variant {name!r}: tasks must be a list of task names, got {tasks!r}")
        variants.append(EstimatorVariant(name, of, tuple(tasks), _freeze(options)))
    return tuple(variants)


def validate_suite(suite: SuiteConfig) -> SuiteConfig:
    if suite.device not in DEVICES and not suite.device.startswith("cuda:"):
        raise ConfigError(f"unknown device {suite.device!r}. Valid devices: {', '.join(DEVICES)} (or cuda:N)")
    if suite.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {suite.threads}")
    if suite.bootstrap_resamples < 10:
        raise ConfigError(f"bootstrap_resamples must be >= 10, got {suite.bootstrap_resamples}")
    if suite.top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {suite.top_k}")
    if not suite.cell_timeout_s > 0 or suite.cell_timeout_s == float("inf"):
        raise ConfigError(f"cell_timeout_s must be a positive number of seconds, got {suite.cell_timeout_s}")
    if not suite.cell_memory_mb >= 0 or suite.cell_memory_mb == float("inf"):
        raise ConfigError(f"cell_memory_mb must be ≥ 0 (0: no cap), got {suite.cell_memory_mb}")
    if isinstance(suite.workers, bool) or not isinstance(suite.workers, int) or suite.workers < 1:
        raise ConfigError(f"workers must be a whole number ≥ 1 (1: retrains in this process), got {suite.workers!r}")
    if suite.scheduler:
        if suite.workers != 1:
            raise ConfigError(f"give workers ({suite.workers}) or scheduler ({suite.scheduler!r}), not both: "
                              "a Dask cluster has its own worker count")
        check_scheduler(suite.scheduler)
    return suite


#: ``scheduler`` forms: a local Dask cluster of N workers, or an existing cluster's address
SCHEDULER_LOCAL = "local:"
SCHEDULER_ADDRESSES = ("tcp://", "tls://", "ucx://", "inproc://")


def check_scheduler(scheduler: str) -> None:
    """Refuse a malformed ``scheduler`` before any work."""
    if scheduler.startswith(SCHEDULER_LOCAL):
        count = scheduler[len(SCHEDULER_LOCAL):]
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"scheduler {scheduler!r}: local:N needs a worker count N ≥ 1")
    elif not scheduler.startswith(SCHEDULER_ADDRESSES):
        raise ConfigError(f"scheduler {scheduler!r} is neither local:N nor a Dask scheduler's address "
                          f"({' or '.join(p + 'HOST:PORT' for p in SCHEDULER_ADDRESSES[:2])})")


def load_suite(name_or_path: str) -> SuiteConfig:
    """A built-in suite by name (``smoke``, ``default``) or a TOML file path."""
    if name_or_path in BUILTIN_SUITES:
        text = resources.files("bench.suites").joinpath(f"{name_or_path}.toml").read_text()
        source = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"unknown suite {name_or_path!r}: not a built-in suite ({', '.join(BUILTIN_SUITES)}) "
                "and no such file"
            )
        text, source = path.read_text(), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: malformed TOML: {err}") from err
    return parse_suite(data, source)


def with_overrides(suite: SuiteConfig, **overrides: Any) -> SuiteConfig:
    """Apply CLI overrides (``None`` means "not given")."""
    given = {k: v for k, v in overrides.items() if v is not None}
    for key in ("tasks", "protocols"):
        if key in given:
            by_name = {spec.name: spec for spec in getattr(suite, key)}
            given[key] = tuple(by_name.get(n, ComponentSpec.of(n)) for n in given[key])
    if "protocols" in given:
        given["tasks"] = _narrow_task_protocols(given.get("tasks", suite.tasks), [p.name for p in given["protocols"]])
    if "estimators" in given:
        given["estimators"] = tuple(given["estimators"])
    return validate_suite(dataclasses.replace(suite, **given))


def _narrow_task_protocols(tasks: tuple[ComponentSpec, ...], chosen: list[str]) -> tuple[ComponentSpec, ...]:
    """Keep each task's own protocol list (and options), narrowed to ``chosen``; drop tasks left with none."""
    kept = []
    for spec in tasks:
        spec = dataclasses.replace(spec, protocol_options=tuple((n, o) for n, o in spec.protocol_options if n in chosen))
        if not spec.protocols:
            kept.append(spec)
        elif narrowed := tuple(p for p in spec.protocols if p in chosen):
            kept.append(dataclasses.replace(spec, protocols=narrowed))
    if not kept:
        lists = "; ".join(f"{t.name}: {', '.join(t.protocols)}" for t in tasks)
        raise ConfigError(f"no task of the run has protocol(s) {', '.join(chosen)} in its list ({lists})")
    return tuple(kept)


@dataclass(frozen=True)
class EmptyConfig:
    """For components without options."""
