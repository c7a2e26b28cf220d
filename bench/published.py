"""Read a published leaderboard (:mod:`bench.export`), check it, and seed a results folder from it.

``open_published`` refuses, naming the file, anything that is not what the manifest says: a missing, altered
or truncated file (SHA-256), a manifest of another schema version, a truth whose rebuilt arrays differ from
their digest. ``seed_folder`` writes the published records, ground truths and small base models into a
results folder's cache under the keys this checkout plans, so ``ifbench run --against`` fits and scores only
the new estimators and the runner finds everything else done.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import export, keys
from bench.atomic import arrays_digest, atomic_write, file_digest
from bench.config import ConfigError
from bench.planning import Plan

SEED_MARKER = "published.json"
#: where a hub dataset holds the published folder (its root holds the configs ``push_to_hub`` writes)
HUB_FOLDER = "published"


class PublishedError(ConfigError):
    """A published leaderboard that cannot be used as it is (names the file and what is wrong)."""


@dataclass(frozen=True)
class Published:
    """A checked published leaderboard: its folder and manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def suite_path(self) -> Path:
        return self.root / self.manifest["suite"]["file"]

    @property
    def digest(self) -> str:
        return file_digest(self.root / export.MANIFEST_FILE)

    def truth_arrays(self, entry: dict[str, Any]) -> dict[str, np.ndarray]:
        """A truth's arrays rebuilt from its tables, checked against the digest the manifest gives."""
        import datasets

        path = self.root / entry["path"]
        try:
            tables = datasets.load_from_disk(str(path))
        except Exception as err:  # Arrow and JSON errors come in many types
            raise PublishedError(f"{path}: cannot be read as a datasets folder ({err})") from err
        from bench.truth_tables import from_tables

        arrays = from_tables(tables, entry["layout"])
        if arrays_digest(arrays) != entry["arrays_digest"]:
            raise PublishedError(f"{path}: its arrays differ from the manifest's digest (altered after export)")
        return arrays


def open_published(source: str | Path) -> Published:
    """A published folder (``leaderboard/``, or a hub dataset's name, downloaded first), every file checked."""
    root = Path(source)
    if not root.exists():
        root = _downloaded(str(source))
    manifest_path = root / export.MANIFEST_FILE
    if not manifest_path.is_file():
        raise PublishedError(f"{root} holds no {export.MANIFEST_FILE}: not a leaderboard written by `ifbench export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PublishedError(f"{manifest_path}: unreadable ({err})") from err
    version = manifest.get("schema_version")
    if version not in export.READABLE_VERSIONS:
        raise PublishedError(f"{manifest_path} was written with export schema version {version}; this ifbench reads "
                             f"versions {', '.join(map(str, export.READABLE_VERSIONS))}: use the ifbench version that wrote it "
                             f"({manifest.get('exported_by', 'unknown')})")
    for name, expected in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file():
            raise PublishedError(f"{path} is missing (listed in {manifest_path})")
        if path.stat().st_size != expected["bytes"] or file_digest(path) != expected["sha256"]:
            raise PublishedError(f"{path} differs from {manifest_path} (truncated or altered: SHA-256 mismatch)")
    return Published(root, manifest)


def _downloaded(name: str) -> Path:
    """A hub dataset repository's files (``--push``), or a clear error naming what could not be reached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, repo_type="dataset", allow_patterns=[f"{HUB_FOLDER}/*"])) / HUB_FOLDER
    except Exception as err:  # offline, unknown repository, no access
        raise PublishedError(f"{name!r} is not a published folder here, and the hub dataset {name!r} could not be "
                             f"reached ({type(err).__name__}: {err})") from None


def check_keys(pub: Published, plan: Plan) -> None:
    """Refuse before any work when this checkout plans other keys than the published truths have (a task's or
    protocol's version or options changed since), naming each."""
    by_name = {t["name"]: t for t in pub.manifest["truths"]}
    planned = {(p.spec.name, p_.name): (p, p_) for p in plan.tasks for p_ in p.protocols}
    wrong = []
    for entry in by_name.values():
        if (entry["task"], entry["protocol"]) not in planned:
            continue  # narrowed out with --tasks / --protocols
        task, protocol = planned[entry["task"], entry["protocol"]]
        for base_model in entry["base_models"]:
            key = keys.truth_key(plan.suite, task, base_model, protocol)
            if key != entry["truth_key"]:
                wrong.append(f"{entry['name']} (base model {base_model}): published {entry['truth_key']}, "
                             f"planned here {key}")
    if wrong:
        raise PublishedError("this checkout plans other ground-truth keys than the published ones (a task's or "
                             f"protocol's code or options changed since; published by {pub.manifest.get('exported_by')}"
                             "): " + "; ".join(wrong))


def seed_folder(pub: Published, results: Path, *, rescored: set[str]) -> int:
    """Write the published records (less those of the estimators named in ``rescored``, which are scored again
    here), truths and small models into ``results``; a folder seeded before from the same publication is kept
    as it is. Returns the number of records written."""
    results = Path(results)
    marker = results / SEED_MARKER
    if marker.exists():
        seeded = json.loads(marker.read_text())
        if seeded.get("manifest_sha256") != pub.digest:
            raise PublishedError(f"{results} was seeded from another publication ({seeded.get('source')}): use "
                                 "another --results folder")
        return 0
    if (results / export.RECORDS_FILE).exists():
        raise PublishedError(f"{results} already holds records not seeded from {pub.root}: use another --results folder")
    from bench.cache import ArtifactCache

    cache = ArtifactCache(results / "cache")
    for entry in pub.manifest["truths"]:
        cache.save_arrays(entry["truth_key"], pub.truth_arrays(entry), entry["meta"])
    for model in pub.manifest["models"]:
        if model["shipped"]:
            for suffix in (".safetensors", ".json"):
                target = cache.root / "models" / f"{model['key']}{suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(pub.root / export.MODEL_DIR / f"{model['key']}{suffix}", target)
    for name in export.MEASUREMENT_FILES:
        if (pub.root / name).exists():
            shutil.copyfile(pub.root / name, results / name)
    lines = [line for line in (pub.root / pub.manifest["records"]).read_text().splitlines()
             if line.strip() and json.loads(line)["estimator"] not in rescored]
    atomic_write(results / export.RECORDS_FILE, lambda p: p.write_text("".join(f"{line}\n" for line in lines)))
    marker.write_text(json.dumps({"source": str(pub.root), "manifest_sha256": pub.digest}, indent=1) + "\n")
    return len(lines)


def holding(pub: Published, differing: set[str]) -> list[str]:
    """Sentences on which published truths hold here, given the task keys whose θ̂ differs on this machine."""
    said = []
    for entry in pub.manifest["truths"]:
        if entry["depends_on_base"] and differing & set(entry["task_keys"]):
            said.append(f"{entry['name']}: measured around the published θ̂, which this machine does not reproduce "
                        "bit for bit: not scored here")
    return said


def push(root: Path, name: str) -> list[str]:
    """Upload a published folder to the hub dataset ``name``: every truth with ``datasets``' own ``push_to_hub``
    (one config each: the hub's viewer and ``load_dataset(name, config)``), and the folder itself, every file as
    the manifest lists it, under ``published/`` (what ``--against NAME`` downloads and checks). Returns the
    configs and the folder sent."""
    import datasets
    from huggingface_hub import HfApi

    pub = open_published(root)
    sent = []
    for entry in pub.manifest["truths"]:
        datasets.load_from_disk(str(pub.root / entry["path"])).push_to_hub(name, config_name=entry["name"])
        sent.append(entry["name"])
    HfApi().upload_folder(folder_path=str(pub.root), path_in_repo=HUB_FOLDER, repo_id=name, repo_type="dataset",
                          allow_patterns=[*pub.manifest["files"], export.MANIFEST_FILE])
    sent.append(HUB_FOLDER)
    return sent
