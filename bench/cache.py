"""On-disk cache of base models (safetensors) and ground truths (npz), keyed by content hashes.

Each entry stores its key and a SHA-256 checksum of its contents; an entry whose
stored key or checksum does not match (unreadable, written for other settings,
or altered after it was written) is reported as corrupt and recomputed, never
silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from bench.atomic import arrays_digest, atomic_savez, atomic_write, file_digest
from bench.groundtruth.base import GroundTruth
from tasks.base import Checkpoint, TrainedModel

log = logging.getLogger(__name__)


class CacheCorruptError(RuntimeError):
    """A cache file is unreadable or was written for other settings."""


class ArtifactCache:
    """``root/models/<key>.safetensors`` + ``.json``; ``root/groundtruth/<key>.npz``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- models ------------------------------------------------------------
    def model_paths(self, key: str) -> tuple[Path, Path]:
        return self.root / "models" / f"{key}.safetensors", self.root / "models" / f"{key}.json"

    def save_model(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Weights first, then the metadata with their checksum: metadata on disk implies whole weights."""
        weights, info = self.model_paths(key)
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        payload = save(cpu, metadata={"key": key})  # bytes, written by Python's I/O: a full disk is an OSError
        atomic_write(weights, lambda p: p.write_bytes(payload))
        record = {"key": key, "sha256": file_digest(weights), **meta}
        atomic_write(info, lambda p: p.write_text(json.dumps(record, indent=2, sort_keys=True)))

    def load_model(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        weights, info = self.model_paths(key)
        if not weights.exists() or not info.exists():
            return None
        try:
            tensors = load_file(str(weights))
            meta = json.loads(info.read_text())
        except Exception as err:  # safetensors raises several error types
            raise CacheCorruptError(f"corrupt cached model {weights}: {err}") from err
        if meta.get("key") != key:
            raise CacheCorruptError(f"cached model {info} was written for key {meta.get('key')!r}, expected {key!r}")
        if meta.get("sha256") != file_digest(weights):
            raise CacheCorruptError(f"cached model {weights} has changed since it was written (checksum mismatch)")
        return tensors, meta

    # -- ground truths -----------------------------------------------------
    def groundtruth_path(self, key: str) -> Path:
        return self.root / "groundtruth" / f"{key}.npz"

    def save_arrays(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        payload = {**arrays, "__key__": np.array(key), "__meta__": np.array(json.dumps(meta, sort_keys=True)),
                   "__sha256__": np.array(arrays_digest(arrays))}
        atomic_savez(self.groundtruth_path(key), payload)

    def load_arrays(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        path = self.groundtruth_path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as err:  # zip and format errors come in many types
            raise CacheCorruptError(f"corrupt cached ground truth {path}: {err}") from err
        if str(arrays.pop("__key__", "")) != key:
            raise CacheCorruptError(f"cached ground truth {path} was written for other settings")
        meta = json.loads(str(arrays.pop("__meta__")))
        if str(arrays.pop("__sha256__", "")) != arrays_digest(arrays):
            raise CacheCorruptError(f"cached ground truth {path} has changed since it was written (checksum mismatch)")
        return arrays, meta


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (any dtype, any device)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_digest(model: TrainedModel) -> str:
    """What a trained model is, bit for bit: its parameters and checkpoints (not where it is stored)."""
    return tensors_digest(pack_trained(model, "")[0])


def truth_digest(truth: GroundTruth) -> str:
    """What a ground truth is, bit for bit: its arrays and, if it has one, its model."""
    arrays = arrays_digest(pack_truth(truth)[0])
    return arrays if truth.model is None else hashlib.sha256(f"{arrays}|{model_digest(truth.model)}".encode()).hexdigest()


def load_or_none(load: Any, key: str) -> Any:
    """``load(key)``, or None (with a warning) when the entry is missing or corrupt."""
    try:
        return load(key)
    except CacheCorruptError as err:
        log.warning("%s; recomputing it", err)
        return None


def pack_trained(base: TrainedModel, task_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (θ̂ and ``checkpoint.<i>.<name>``) and metadata for :meth:`ArtifactCache.save_model`."""
    tensors = dict(base.params)
    for i, checkpoint in enumerate(base.checkpoints):
        tensors.update({f"checkpoint.{i}.{name}": value for name, value in checkpoint.params.items()})
    meta = {
        "task": task_name, "diagnostics": base.diagnostics, "order": list(base.params),
        "checkpoints": [{"learning_rate": c.learning_rate, "step": c.step} for c in base.checkpoints],
    }
    return tensors, meta


def in_order(params: dict[str, torch.Tensor], order: Sequence[str]) -> dict[str, torch.Tensor]:
    """``params`` with the names in ``order`` first, in that order, then the rest as they were."""
    return {**{name: params[name] for name in order if name in params}, **params}


def unpack_trained(tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, device: torch.device) -> TrainedModel:
    """Inverse of :func:`pack_trained`, on ``device``. Parameters come back in their original order
    (safetensors sorts names; flattened-parameter conventions such as a task's closed-form Hessian
    depend on the order)."""
    params = {k: v.to(device) for k, v in tensors.items() if not k.startswith("checkpoint.")}
    params = in_order(params, meta.get("order", ()))
    checkpoints = tuple(
        Checkpoint({k.split(".", 2)[2]: v.to(device) for k, v in tensors.items() if k.startswith(f"checkpoint.{i}.")},
                   info["learning_rate"], info["step"])
        for i, info in enumerate(meta.get("checkpoints", []))
    )
    return TrainedModel(params, checkpoints, meta["diagnostics"])


def pack_truth(truth: GroundTruth) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (``extra`` under an ``extra.`` prefix) and metadata for :meth:`ArtifactCache.save_arrays`;
    a protocol's own model is saved apart (``save_model``)."""
    arrays = {"train_idx": truth.train_idx, "actual": truth.actual, **{f"extra.{k}": v for k, v in truth.extra.items()}}
    if truth.replicates is not None:
        arrays["replicates"] = truth.replicates
    return arrays, {"diagnostics": truth.diagnostics, "has_model": truth.model is not None}


def unpack_truth(protocol: str, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                 model: TrainedModel | None) -> GroundTruth:
    """Inverse of :func:`pack_truth`, with the protocol's model (if it has one) loaded separately."""
    extra = {k.removeprefix("extra."): v for k, v in arrays.items() if k.startswith("extra.")}
    return GroundTruth(protocol, arrays["train_idx"], arrays["actual"], meta["diagnostics"], arrays.get("replicates"),
                       extra, model)
