"""Stable content hashes of configs and specs, used as cache and cell keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def canonical(obj: Any) -> Any:
    """A JSON-ready form of dataclasses, mappings, sequences and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **{f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return obj  # keep 1.0 distinct from 1 in intent but stable in text
    return obj


def stable_hash(*parts: Any, length: int = 16) -> str:
    text = json.dumps([canonical(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
