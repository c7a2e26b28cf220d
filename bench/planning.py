"""Planning a suite: every name resolved and every option built and checked before any work or write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.catalog import Registries
from bench.config import ComponentSpec, ConfigError, SuiteConfig, make_config
from bench.groundtruth.base import TaskShape
from tasks.base import Task


@dataclass(frozen=True)
class PlannedComponent:
    name: str
    cls: type
    config: Any
    #: the tasks it runs on (empty: every task); an estimator variant may name some
    tasks: tuple[str, ...] = ()

    def runs_on(self, task: str) -> bool:
        return not self.tasks or task in self.tasks

    def covers(self, base_model: int) -> bool:
        """Whether a protocol runs on ``base_model``: all of the task's, unless its ``first_base_models`` option
        (> 0) caps them (the deterministic track replays whole training runs, so it is sized apart)."""
        limit = getattr(self.config, "first_base_models", 0)
        return not limit or base_model < limit


@dataclass(frozen=True)
class PlannedTask:
    spec: ComponentSpec
    cls: type[Task]
    config: Any
    #: the protocols this task runs, each configured by the suite's options then the task's own
    protocols: tuple[PlannedComponent, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A validated suite: classes resolved and option dataclasses built."""

    suite: SuiteConfig
    tasks: tuple[PlannedTask, ...]
    protocols: tuple[PlannedComponent, ...]
    estimators: tuple[PlannedComponent, ...]


def own_estimators(registries: Registries) -> list[str]:
    """What ``"all"`` means: every registered estimator except the peers' adapters (they run when named)."""
    return [name for name in registries.estimators.names() if not getattr(registries.estimators.get(name), "peer", "")]


def plan_suite(suite: SuiteConfig, registries: Registries) -> Plan:
    """Resolve every name and option; raises RegistryError / ConfigError before any work."""
    registries.tasks.check(s.name for s in suite.tasks)
    registries.protocols.check(s.name for s in suite.protocols)
    suite_protocols = [s.name for s in suite.protocols]
    for spec in suite.tasks:
        for name in [*spec.protocols, *(name for name, _ in spec.protocol_options)]:
            if name not in suite_protocols:
                raise ConfigError(f"task {spec.name!r} names protocol {name!r}, which the suite does not run "
                                  f"(suite protocols: {', '.join(suite_protocols)})")
    variants = _planned_variants(suite, registries)
    names = ([*own_estimators(registries), *variants] if "all" in suite.estimators
             else list(dict.fromkeys(suite.estimators)))
    registries.estimators.check(name for name in names if name not in variants)
    # options may name any registered estimator (a run narrowed with --estimators keeps the suite's options);
    # they are validated all the same
    registries.estimators.check(name for name, _ in suite.estimator_options)
    for name, _ in suite.estimator_options:
        make_config(registries.estimators.get(name).Config, suite.options_for(name), f"estimator {name}")
    protocols = []
    for spec in suite.protocols:
        cls = registries.protocols.get(spec.name)
        protocols.append(PlannedComponent(spec.name, cls, make_config(cls.Config, spec.options_dict(), f"protocol {spec.name}")))
    tasks = []
    for spec in suite.tasks:
        cls = registries.tasks.get(spec.name)
        if spec.preset not in cls.presets:
            raise ConfigError(f"unknown preset {spec.preset!r} for task {spec.name!r}. Valid presets: {', '.join(cls.presets)}")
        config = make_config(cls.Config, spec.options_dict(), f"task {spec.name}", base=cls.presets[spec.preset])
        if cls.convex and spec.base_models > 1:
            raise ConfigError(f"task {spec.name!r} is convex: its trained model is the unique optimum, so "
                              f"base_models must be 1, got {spec.base_models}")
        planned = PlannedTask(spec, cls, config, _task_protocols(spec, protocols))
        _check_sizes(planned)
        tasks.append(planned)
    estimators = []
    for name in names:
        if name in variants:
            estimators.append(variants[name])
            continue
        cls = registries.estimators.get(name)
        estimators.append(PlannedComponent(name, cls, make_config(cls.Config, suite.options_for(name), f"estimator {name}")))
    return Plan(suite, tuple(tasks), tuple(protocols), tuple(estimators))


def _planned_variants(suite: SuiteConfig, registries: Registries) -> dict[str, PlannedComponent]:
    """Each ``[estimator_variants.NAME]``: its estimator's class and config (the suite's options for that
    estimator, then the variant's own), checked like any other."""
    planned = {}
    for variant in suite.estimator_variants:
        if variant.name in registries.estimators:
            raise ConfigError(f"estimator variant {variant.name!r} is already a registered estimator's name: "
                              "give the variant a name of its own")
        if variant.of not in registries.estimators:
            raise ConfigError(f"estimator variant {variant.name!r}: of = {variant.of!r} is not a registered "
                              f"estimator. {registries.estimators.unknown_message(variant.of)}")
        unknown = [task for task in variant.tasks if task not in registries.tasks]
        if unknown:  # a task the suite does not run is fine (a run narrowed with --tasks), an unknown one is not
            raise ConfigError(f"estimator variant {variant.name!r}: {registries.tasks.unknown_message(unknown[0])}")
        cls = registries.estimators.get(variant.of)
        base = make_config(cls.Config, suite.options_for(variant.of), f"estimator {variant.of}")
        config = make_config(cls.Config, dict(variant.options), f"estimator variant {variant.name}", base=base)
        planned[variant.name] = PlannedComponent(variant.name, cls, config, variant.tasks)
    return planned


def _check_sizes(planned: PlannedTask) -> None:
    """Each protocol's options against the task they run on (sizes against its training set, convexity)."""
    shape = TaskShape.of(planned.spec.name, planned.cls, planned.config)
    for protocol in planned.protocols:
        try:
            protocol.cls.check_against(protocol.config, shape)
        except ValueError as err:
            raise ConfigError(f"task {planned.spec.name}: protocol {protocol.name}: {err}") from None


def _task_protocols(spec: ComponentSpec, protocols: list[PlannedComponent]) -> tuple[PlannedComponent, ...]:
    """The task's protocols (its list, or all the suite's), with its own options over the suite's."""
    chosen = []
    for protocol in protocols:
        if spec.protocols and protocol.name not in spec.protocols:
            continue
        own = spec.protocol_options_for(protocol.name)
        config = make_config(protocol.cls.Config, own, f"task {spec.name}: protocol {protocol.name}", base=protocol.config)
        chosen.append(PlannedComponent(protocol.name, protocol.cls, config) if own else protocol)
    return tuple(chosen)
