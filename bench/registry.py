"""A small generic name -> object registry with lazy entries and plug-in discovery.

Used for estimators, tasks and ground-truth protocols. Every registry is an
ordinary instance (no hidden global state), so tests build their own.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

ESTIMATOR_ENTRY_POINT_GROUP = "ifbench.estimators"
_MARKER = "__ifbench_name__"


class RegistryError(KeyError):
    """An unknown or duplicate name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


def registered(name: str) -> Callable[[type], type]:
    """Class decorator that marks a class for discovery under ``name``.

    It only sets an attribute on the class; nothing is registered at import
    time. :func:`Registry.discover_package` and :func:`Registry.add_module`
    collect marked classes.
    """

    def mark(cls: type) -> type:
        setattr(cls, _MARKER, name)
        if not getattr(cls, "name", None) or cls.__dict__.get("name") is None:
            cls.name = name
        return cls

    return mark


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


class Registry(Generic[T]):
    """Maps names to objects (or lazy ``"module:attr"`` targets)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._origins: dict[str, str] = {}

    def add(self, name: str, target: T | str, origin: str = "built-in") -> None:
        """Register ``target`` (an object or a lazy ``"module:attr"`` string)."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise RegistryError(
                f"duplicate {self.kind} name {name!r}: already registered from "
                f"{self._origins[name]}, again from {origin}"
            )
        self._entries[name] = target
        self._origins[name] = origin

    def get(self, name: str) -> T:
        """The object registered as ``name``; unknown names raise with the valid ones."""
        if name not in self._entries:
            raise RegistryError(self.unknown_message(name))
        target = self._entries[name]
        if isinstance(target, str):
            target = _import_target(target)
            self._entries[name] = target
        return target  # type: ignore[return-value]

    def unknown_message(self, name: str) -> str:
        valid = ", ".join(self.names()) or "(none registered)"
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {valid}"

    def check(self, names: Iterable[str]) -> None:
        """Raise for the first unknown name, before any work starts."""
        for name in names:
            if name not in self._entries:
                raise RegistryError(self.unknown_message(name))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        return self._origins[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- discovery -------------------------------------------------------
    def add_module(self, module_name: str, origin: str | None = None) -> list[str]:
        """Register every class marked with :func:`registered` defined in a module."""
        module = importlib.import_module(module_name)
        found = []
        for _, obj in inspect.getmembers(module, inspect.isclass):
            name = obj.__dict__.get(_MARKER)
            if name is not None and obj.__module__ == module.__name__:
                self.add(name, obj, origin or module_name)
                found.append(name)
        return found

    def discover_package(self, package_name: str) -> list[str]:
        """Import each module of a package and register its marked classes: "built-in" where the package's
        ``SHIPPED`` names the module (or the package names none), else a plug-in file placed there."""
        package = importlib.import_module(package_name)
        shipped = getattr(package, "SHIPPED", None)
        found = []
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                own = shipped is None or info.name in shipped
                origin = "built-in" if own else f"plug-in file {package_name}/{info.name}.py"
                found += self.add_module(f"{package_name}.{info.name}", origin)
        return found

    def discover_entry_points(self, group: str) -> list[str]:
        """Register objects advertised by installed distributions under ``group``."""
        found = []
        for entry_point in importlib.metadata.entry_points(group=group):
            dist = entry_point.dist.name if entry_point.dist else "?"
            self.add(entry_point.name, entry_point.value, origin=f"entry point ({dist})")
            found.append(entry_point.name)
        return found
