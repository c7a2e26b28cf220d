"""Build the registries of estimators, tasks and protocols (fresh instances each call)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.registry import ESTIMATOR_ENTRY_POINT_GROUP, Registry


@dataclass(frozen=True)
class Registries:
    estimators: Registry
    tasks: Registry
    protocols: Registry


def _import_plugin(spec: str) -> str:
    """A module name, or a ``.py`` file path imported under a private module name."""
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            raise FileNotFoundError(f"plug-in file {spec!r} does not exist")
        module_name = f"ifbench_plugin_{path.stem}"
        if module_name not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module_name
    return spec


def default_registries(plugins: Sequence[str] = (), entry_points: bool = True) -> Registries:
    """Built-ins (every module of ``estimators``, ``tasks``, ``bench.groundtruth``),
    installed plug-ins (entry-point group ``ifbench.estimators``) and ``plugins``
    (module names or ``.py`` files holding ``@registered`` estimator classes)."""
    estimators: Registry = Registry("estimator")
    estimators.discover_package("estimators")
    if entry_points:
        estimators.discover_entry_points(ESTIMATOR_ENTRY_POINT_GROUP)
    for plugin in plugins:
        estimators.add_module(_import_plugin(plugin), origin=f"plug-in {plugin}")
    tasks: Registry = Registry("task")
    tasks.discover_package("tasks")
    protocols: Registry = Registry("protocol")
    protocols.discover_package("bench.groundtruth")
    return Registries(estimators, tasks, protocols)
