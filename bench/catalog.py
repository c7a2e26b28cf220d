"""Build the registries of estimators, tasks and protocols (fresh instances each call)."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.config import ConfigError
from bench.registry import ESTIMATOR_ENTRY_POINT_GROUP, Registry


@dataclass(frozen=True)
class Registries:
    estimators: Registry
    tasks: Registry
    protocols: Registry


def _import_plugin(spec: str) -> str:
    """A module name, or a ``.py`` file path executed afresh (registries are fresh too) under a private name."""
    path = Path(spec)
    if not spec.endswith(".py"):
        importlib.import_module(spec)
        return spec
    if not path.is_file():
        raise FileNotFoundError(f"plug-in file {spec!r} does not exist")
    module_name = f"ifbench_plugin_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException:
        del sys.modules[module_name]
        raise
    return module_name


def _plugin_error(spec: str, err: Exception) -> ConfigError:
    """One line naming the plug-in, the error and where it happened (file:line), instead of a traceback."""
    if isinstance(err, SyntaxError):
        return ConfigError(f"plug-in {spec} does not parse: {err.msg} ({err.filename}:{err.lineno})")
    frames = traceback.extract_tb(err.__traceback__)
    where = next((f"{f.filename}:{f.lineno}" for f in reversed(frames) if not f.filename.startswith("<")), spec)
    return ConfigError(f"plug-in {spec} failed to import: {type(err).__name__}: {err} ({where})")


def default_registries(plugins: Sequence[str] = (), entry_points: bool = True) -> Registries:
    """Built-ins (every module of ``estimators``, ``tasks``, ``bench.groundtruth``),
    installed plug-ins (entry-point group ``ifbench.estimators``) and ``plugins``
    (module names or ``.py`` files holding ``@registered`` estimator classes)."""
    estimators: Registry = Registry("estimator")
    estimators.discover_package("estimators")
    if entry_points:
        estimators.discover_entry_points(ESTIMATOR_ENTRY_POINT_GROUP)
    for plugin in plugins:
        try:
            module_name = _import_plugin(plugin)
        except FileNotFoundError:
            raise
        except Exception as err:  # a plug-in's own bug or missing dependency: one clear line
            raise _plugin_error(plugin, err) from None
        estimators.add_module(module_name, origin=f"plug-in {plugin}")
    tasks: Registry = Registry("task")
    tasks.discover_package("tasks")
    protocols: Registry = Registry("protocol")
    protocols.discover_package("bench.groundtruth")
    return Registries(estimators, tasks, protocols)
