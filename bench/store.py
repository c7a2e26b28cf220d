"""Append-only results store: one JSON record per (task, protocol, estimator) cell.

Each record is appended on an ``O_APPEND`` descriptor, every byte accounted for
(short writes are continued), and fsynced; if the write fails (disk full) the
file is truncated back to where it was, so a record is there whole or not at all.
A process killed mid-write can still leave a torn last line, which readers skip.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.atomic import arrays_digest, atomic_savez, atomic_write, naming
from bench.records import SCHEMA_VERSION, Record

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
LOCK_FILE = ".lock"


class FolderBusyError(RuntimeError):
    """Another process holds the results folder's lock."""


@contextlib.contextmanager
def _locked(directory: Path, mode: int, busy: str) -> Iterator[Any]:
    """``directory``'s lock file held in ``mode`` (``fcntl.LOCK_EX`` or ``LOCK_SH``), yielding its handle;
    refused at once, naming the holder and then ``busy``, while another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderBusyError(f"{directory} is in use by {holder}{busy}") from None
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s advisory lock (one writer per results folder); refuse at once if it is taken."""
    busy = " (another `ifbench run`, or `ifbench leaderboard`); wait for it to finish, or write to another --results folder"
    with _locked(directory, fcntl.LOCK_EX, busy) as handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"ifbench run, pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


@contextlib.contextmanager
def shared(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock shared while reading records and writing beside them (``ifbench leaderboard``):
    refused at once while a run holds it, and a run cannot start meanwhile."""
    with _locked(directory, fcntl.LOCK_SH, ": its leaderboard is rewritten when that run ends; wait for it"):
        yield


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


def record_line(record: Record | dict[str, Any]) -> str:
    """``record`` as one strict-JSON line of ``records.jsonl`` (no newline): a dict is the JSON object of a
    record, checked against the schema first (:meth:`Record.from_json`)."""
    typed = record if isinstance(record, Record) else Record.from_json(_json_safe({"schema_version": SCHEMA_VERSION,
                                                                                             **record}))
    return json.dumps(_json_safe(typed.to_json()), sort_keys=True, allow_nan=False)


def write_records(path: Path, records: list[Record]) -> None:
    """``records`` as a ``records.jsonl`` file at ``path`` (replacing it whole)."""
    atomic_write(path, lambda target: target.write_text("".join(record_line(r) + "\n" for r in records)))


class ResultsStore:
    """``DIR/records.jsonl`` plus ``DIR/artifacts/<cell_key>.npz`` (predicted vs actual)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / RECORDS_FILE

    def records(self) -> list[Record]:
        """Every whole record in the file, in order (a torn last line is skipped with a warning); a record
        this code cannot read is a :class:`bench.records.RecordSchemaError` naming the file and line."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping unreadable line %d of %s (a torn write?)", number, self.path)
                continue
            records.append(Record.from_json(data, where=f"line {number} of {self.path}"))
        return records

    def latest(self) -> dict[str, Record]:
        """The last record of each cell key."""
        return {r.cell_key: r for r in self.records()}

    def append(self, record: Record | dict[str, Any]) -> None:
        """Append ``record`` (a :class:`Record`, or the JSON object of one: checked against the schema first)."""
        line = record_line(record)
        self.directory.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not self._ends_with_newline()
        payload = (("\n" if needs_newline else "") + line + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask
        try:
            start = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(payload):
                    count = os.write(fd, payload[written:])
                    if count <= 0:
                        raise OSError(errno.EIO, f"no progress writing {self.path}")
                    written += count
                os.fsync(fd)
            except OSError as err:
                os.ftruncate(fd, start)  # the whole record or nothing
                raise naming(err, self.path) from err
        finally:
            os.close(fd)

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def prediction_path(self, key: str) -> Path:
        return self.directory / "predictions" / f"{key}.npz"

    def save_prediction(self, key: str, prediction: np.ndarray, meta: dict[str, Any]) -> None:
        """An estimator's prediction (one array) with what it cost, apart from any metric of it."""
        meta_text = json.dumps(_json_safe(meta), sort_keys=True)
        prediction = np.asarray(prediction)
        atomic_savez(self.prediction_path(key), {"prediction": prediction, "meta": np.array(meta_text), "key": np.array(key),
                                                 "sha256": np.array(arrays_digest({"prediction": prediction}))})

    def load_prediction(self, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """A saved prediction and its metadata, or None (missing, unreadable or saved under another key)."""
        path = self.prediction_path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                prediction = data["prediction"]
                if str(data["key"]) != key:
                    raise ValueError("saved under another key")
                if str(data["sha256"]) != arrays_digest({"prediction": prediction}):
                    raise ValueError("changed since it was written (checksum mismatch)")
                return prediction, json.loads(str(data["meta"]))
        except Exception as err:  # a corrupt prediction is recomputed
            log.warning("cannot reuse %s (%s); recomputing it", path, err)
            return None

    def artifact_path(self, cell_key: str) -> Path:
        return self.directory / "artifacts" / f"{cell_key}.npz"

    def save_artifact(self, cell_key: str, predicted: np.ndarray, actual: np.ndarray) -> None:
        atomic_savez(self.artifact_path(cell_key), {"predicted": predicted, "actual": actual}, compressed=True)

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
