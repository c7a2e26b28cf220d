"""Files written whole or not at all, with the mode a plain ``open`` gives, and digests of numpy arrays.

Only the standard library and numpy: the report layer (records, leaderboard) writes through this module
without loading torch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see half a file. The file gets the
    mode a plain ``open`` would (0666 less the umask, not ``mkstemp``'s 0600), so a shared results folder
    stays readable; an OSError names ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise naming(err, path) from err
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise naming(err, path) from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name (same errno), unless it names a file already."""
    if err.filename is not None:
        return err
    if err.errno is None:
        return OSError(f"{err} (writing {path})")
    return type(err)(err.errno, err.strerror or str(err), str(path))


def _umask() -> int:
    """The process's umask now: read from ``/proc`` (Linux), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_savez(path: Path, arrays: dict[str, np.ndarray], *, compressed: bool = False) -> None:
    """``np.savez`` (or ``savez_compressed``) through :func:`atomic_write`, the file closed before the rename."""
    save = np.savez_compressed if compressed else np.savez

    def write(tmp: Path) -> None:
        with tmp.open("wb") as file:  # a path would get ".npz" appended by numpy
            save(file, **arrays)

    atomic_write(path, write)


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
