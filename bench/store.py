"""Append-only results store: one JSON record per (task, protocol, estimator) cell.

Each record is written with a single ``write`` on an ``O_APPEND`` descriptor and
fsynced, so a crash leaves at most one torn last line, which readers skip.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from bench.cache import atomic_write

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECORDS_FILE = "records.jsonl"


def _json_safe(value: Any) -> Any:
    """NaN/inf become null (strict JSON); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultsStore:
    """``DIR/records.jsonl`` plus ``DIR/artifacts/<cell_key>.npz`` (predicted vs actual)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / RECORDS_FILE

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping unreadable line %d of %s (a torn write?)", number, self.path)
        return records

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each cell key."""
        return {r["cell_key"]: r for r in self.records() if "cell_key" in r}

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(_json_safe({"schema_version": SCHEMA_VERSION, **record}), sort_keys=True, allow_nan=False)
        self.directory.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (("\n" if needs_newline else "") + line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def artifact_path(self, cell_key: str) -> Path:
        return self.directory / "artifacts" / f"{cell_key}.npz"

    def save_artifact(self, cell_key: str, predicted: np.ndarray, actual: np.ndarray) -> None:
        atomic_write(self.artifact_path(cell_key),
                     lambda p: np.savez_compressed(p.open("wb"), predicted=predicted, actual=actual))

    def load_artifact(self, cell_key: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.artifact_path(cell_key)
        if not path.exists():
            return None
        try:
            with np.load(path) as data:
                return data["predicted"], data["actual"]
        except Exception as err:  # a corrupt artifact only costs its figure
            log.warning("cannot read %s: %s", path, err)
            return None
