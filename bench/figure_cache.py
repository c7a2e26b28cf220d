"""Figures drawn only when what they show has changed.

Each figure is named by a digest of its inputs (the values it plots and its caption) and of the source of
the code that draws it; ``figures/.drawn.json`` keeps, per figure file, that digest and the file's own
SHA-256. A figure whose entry matches both is current and is not drawn again (so re-rendering a leaderboard
whose records did not change loads no plotting library); a changed input, changed drawing code, or an
edited or missing PNG draws it anew. Torch- and matplotlib-free: the report floor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.atomic import atomic_write, file_digest

LEDGER = ".drawn.json"


def inputs_digest(inputs: Any, code: Sequence[Path]) -> str:
    """SHA-256 of ``inputs`` (JSON; numpy arrays by their bytes, shape and dtype) and the ``code`` files."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=_encoded).encode())
    for path in code:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def drawn(path: Path, inputs: Any, draw: Callable[[Path], None], code: Sequence[Path]) -> Path:
    """``path``, drawn by ``draw(path)`` unless the ledger says it is current for ``inputs`` and ``code``."""
    path = Path(path)
    ledger_path = path.parent / LEDGER
    ledger = _read(ledger_path)
    wanted = inputs_digest(inputs, code)
    entry = ledger.get(path.name)
    if path.is_file() and entry == {"inputs": wanted, "png": file_digest(path)}:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(path)
    ledger = _read(ledger_path)  # as it is now (another figure may have been added meanwhile)
    ledger[path.name] = {"inputs": wanted, "png": file_digest(path)}
    text = json.dumps(ledger, indent=1, sort_keys=True) + "\n"
    atomic_write(ledger_path, lambda target: target.write_text(text))
    return path


def _read(ledger_path: Path) -> dict[str, Any]:
    try:
        found = json.loads(ledger_path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every figure is drawn again
    return found if isinstance(found, dict) else {}


def _encoded(value: Any) -> Any:
    """A value ``json`` cannot write: arrays by digest, dataclasses and others by their repr."""
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):
        return {"array": hashlib.sha256(value.tobytes()).hexdigest(), "shape": list(value.shape),
                "dtype": str(value.dtype)}
    return repr(value)
