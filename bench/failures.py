"""Why a cell failed, and whether the same command should run it again.

A failure is either a property of the cell (the estimator raised, returned NaN,
a protocol could not judge it): it stays failed until ``--retry-failed`` or a
change of the estimator; or a fault of the environment (the disk filled, a
permission, interrupted I/O, a missing optional package): then the next run of
the same command retries it, and says why. Records say which in ``cause``
(``"cell"`` or ``"environment"``) and, for a missing package, ``missing_module``.
"""

from __future__ import annotations

import errno
import importlib.util
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CELL = "cell"
ENVIRONMENT = "environment"

#: OSError numbers that describe the machine, not the estimator
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                                errno.EINTR, errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ESTALE})


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it was explicitly raised from (``raise ... from``), outermost first. An exception that
    was only being handled when ``err`` was raised (``__context__``) is not a cause: a fallback that fails after
    an ImportError is the fallback's failure."""
    found: list[BaseException] = []
    while err is not None and err not in found:
        found.append(err)
        err = err.__cause__
    return found


def missing_module(err: BaseException) -> str | None:
    """The module (its full dotted name) whose absence made ``err``: a ModuleNotFoundError, or an exception
    raised from one (an estimator's NotApplicable "captum is not installed")."""
    for link in _causes(err):
        if isinstance(link, ModuleNotFoundError) and link.name:
            return link.name
    return None


def cause_of(err: BaseException) -> dict[str, Any]:
    """Record fields for a failure: ``{"cause": ...}``, with ``missing_module`` when a module was missing."""
    module = missing_module(err)
    if module is not None:
        return {"cause": ENVIRONMENT, "missing_module": module}
    if any(isinstance(link, OSError) and link.errno in ENVIRONMENT_ERRNOS for link in _causes(err)):
        return {"cause": ENVIRONMENT}
    return {"cause": CELL}


def importable(module: str) -> bool:
    """Whether ``module`` (a dotted name) can be found now, without importing it (its parents may be)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        return False


def describe(err: BaseException) -> str:
    """``Type: message (at file:line)``."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def retry_reason(status: str, error: str | None, fields: Mapping[str, Any]) -> str | None:
    """Why a finished cell's record (its status, error and failure ``fields``: :func:`cause_of`) should be run
    again by the same command, or None if it stands."""
    module = fields.get("missing_module")
    if module and status != "ok":  # it stands until the module can be found
        return f"{module} imports now" if importable(module) else None
    if status == "failed" and fields.get("cause") == ENVIRONMENT:
        return f"it failed on a fault of the environment ({error})"
    return None


@dataclass(frozen=True)
class Failure:
    """A failed step's message and its record fields (:func:`cause_of`)."""

    error: str
    fields: dict[str, Any] = field(default_factory=lambda: {"cause": CELL})

    @classmethod
    def of(cls, err: BaseException, prefix: str = "") -> Failure:
        return cls(prefix + describe(err), cause_of(err))
