"""Planning a suite: every name resolved and every option built and checked before any work or write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.catalog import Registries
from bench.config import ComponentSpec, ConfigError, SuiteConfig, make_config
from tasks.base import Task


@dataclass(frozen=True)
class PlannedTask:
    spec: ComponentSpec
    cls: type[Task]
    config: Any


@dataclass(frozen=True)
class PlannedComponent:
    name: str
    cls: type
    config: Any


@dataclass(frozen=True)
class Plan:
    """A validated suite: classes resolved and option dataclasses built."""

    suite: SuiteConfig
    tasks: tuple[PlannedTask, ...]
    protocols: tuple[PlannedComponent, ...]
    estimators: tuple[PlannedComponent, ...]



def plan_suite(suite: SuiteConfig, registries: Registries) -> Plan:
    """Resolve every name and option; raises RegistryError / ConfigError before any work."""
    registries.tasks.check(s.name for s in suite.tasks)
    registries.protocols.check(s.name for s in suite.protocols)
    suite_protocols = [s.name for s in suite.protocols]
    for spec in suite.tasks:
        for name in spec.protocols:
            if name not in suite_protocols:
                raise ConfigError(f"task {spec.name!r} lists protocol {name!r}, which the suite does not run "
                                  f"(suite protocols: {', '.join(suite_protocols)})")
    names = registries.estimators.names() if "all" in suite.estimators else list(dict.fromkeys(suite.estimators))
    registries.estimators.check(names)
    # options may name any registered estimator (a run narrowed with --estimators keeps the suite's options);
    # they are validated all the same
    registries.estimators.check(name for name, _ in suite.estimator_options)
    for name, _ in suite.estimator_options:
        make_config(registries.estimators.get(name).Config, suite.options_for(name), f"estimator {name}")
    tasks = []
    for spec in suite.tasks:
        cls = registries.tasks.get(spec.name)
        if spec.preset not in cls.presets:
            raise ConfigError(f"unknown preset {spec.preset!r} for task {spec.name!r}. Valid presets: {', '.join(cls.presets)}")
        config = make_config(cls.Config, spec.options_dict(), f"task {spec.name}", base=cls.presets[spec.preset])
        tasks.append(PlannedTask(spec, cls, config))
    protocols = []
    for spec in suite.protocols:
        cls = registries.protocols.get(spec.name)
        protocols.append(PlannedComponent(spec.name, cls, make_config(cls.Config, spec.options_dict(), f"protocol {spec.name}")))
    estimators = []
    for name in names:
        cls = registries.estimators.get(name)
        estimators.append(PlannedComponent(name, cls, make_config(cls.Config, suite.options_for(name), f"estimator {name}")))
    return Plan(suite, tuple(tasks), tuple(protocols), tuple(estimators))
