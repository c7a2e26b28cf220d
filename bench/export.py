"""``ifbench export``: publish a results folder as data, so a new estimator is scored against its truth.

Writes into ``out`` (the published ``leaderboard/``): the leaderboard (``README.md``, figures), the records it
shows (``records.jsonl``), the scaling and peers measurements, the suite (``suite.toml``), every ground truth
the records were judged against as a Hugging Face ``datasets`` ``DatasetDict`` (``groundtruth/<name>/``, see
:mod:`bench.truth_tables`, with a data card), the base models' weights where small (``models/``, the cache's
safetensors format) and a fingerprint otherwise, and ``manifest.json``: schema version, versions, every
truth's keys, digests, seeds and configs, and a SHA-256 of every file (checked by :mod:`bench.published`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from bench import keys
from bench.atomic import arrays_digest, atomic_write, file_digest
from bench.cache import ArtifactCache, tensors_digest
from bench.config import BUILTIN_SUITES, ConfigError, load_suite
from bench.planning import Plan, PlannedComponent, PlannedTask
from bench.pooling import select_latest
from bench.records import Record
from bench.store import ResultsStore, write_records
from bench.truth_tables import to_tables

#: 2: records of schema 2 (typed facts; :mod:`bench.records`); 1 is read too (its records are upgraded on read)
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
SUITE_FILE = "suite.toml"
RECORDS_FILE = "records.jsonl"
TRUTH_DIR = "groundtruth"
MODEL_DIR = "models"
CARD_FILE = "DATA.md"
MEASUREMENT_FILES = ("profile.json", "peers.json")
#: weights up to this size are published; larger ones (rt-bert's 28 MB) as a fingerprint, retrained from the recipe
SHIPPED_MODEL_BYTES = 2_000_000


@dataclass(frozen=True)
class TruthSource:
    """One ground truth the records were judged against, and where the plan puts it."""

    name: str
    planned: PlannedTask
    protocol: PlannedComponent
    key: str
    digest: str
    base_models: tuple[int, ...]


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    truths: int
    shipped_models: int
    fingerprinted_models: int
    total_bytes: int


def suite_text(source: str) -> str:
    """The TOML of a built-in suite (by name) or a suite file."""
    if source in BUILTIN_SUITES:
        return resources.files("bench.suites").joinpath(f"{source}.toml").read_text()
    return Path(source).read_text()


def truth_sources(plan: Plan, records: list[Record]) -> list[TruthSource]:
    """Every planned ground truth that some record was judged against, keyed as this checkout plans it; a record
    judged against another key for the same (task, base model, protocol) means another version made it."""
    judged = {(r.task, r.base_model or 0, r.protocol): (r.truth_key, r.truth_digest)
              for r in records if r.truth_key and r.truth_digest}
    found: dict[str, TruthSource] = {}
    for planned in plan.tasks:
        for base_model in range(planned.spec.base_models):
            for protocol in (p for p in planned.protocols if p.covers(base_model)):
                where = (planned.spec.name, base_model, protocol.name)
                if where not in judged:
                    continue
                key = keys.truth_key(plan.suite, planned, base_model, protocol)
                if judged[where][0] != key:
                    raise ConfigError(f"{'/'.join(map(str, where))}: the records were judged against ground truth "
                                      f"{judged[where][0]}, this checkout plans {key}: export with the version of "
                                      "ifbench that ran the suite")
                if key in found:
                    found[key] = TruthSource(**{**found[key].__dict__,
                                                "base_models": (*found[key].base_models, base_model)})
                    continue
                shared = not protocol.cls.depends_on_base or planned.spec.base_models == 1 or not protocol.covers(1)
                name = f"{planned.spec.name}--{protocol.name}" + ("" if shared else f"--base{base_model}")
                found[key] = TruthSource(name, planned, protocol, key, judged[where][1], (base_model,))
    return list(found.values())


def export(results: Path, out: Path, *, suite: str | None = None, with_figures: bool = True) -> ExportSummary:
    """Publish ``results`` into ``out`` (see the module docstring); raises ConfigError before writing anything
    if the records, cache and plan do not fit together."""
    import datasets

    from bench.catalog import default_registries
    from bench.planning import plan_suite

    datasets.disable_progress_bars()  # a few small tables: the command says what it wrote
    records = select_latest(ResultsStore(results).records())
    if not records:
        raise ConfigError(f"no records in {results}: run the suite first")
    kept = Path(results) / SUITE_FILE
    source = suite or (str(kept) if kept.is_file() else records[0].suite)
    plan = plan_suite(load_suite(source), default_registries(entry_points=False))
    sources = truth_sources(plan, records)
    cache = ArtifactCache(Path(results) / "cache")
    loaded = {s.key: _cached_truth(cache, s) for s in sources}  # every truth read and checked before any write
    out = Path(out)
    for generated in (TRUTH_DIR, MODEL_DIR, "figures"):
        shutil.rmtree(out / generated, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = {planned.spec.name: _task_data(plan, planned) for planned in plan.tasks
            if any(s.planned is planned for s in sources)}
    truths = [_write_truth(out, s, *loaded[s.key], data[s.planned.spec.name], plan) for s in sources]
    models = _write_models(out, cache, plan, records, sources, loaded)
    _write_report(results, out, records, source, with_figures)
    card = resources.files("bench").joinpath("published_card.md").read_text()
    (out / TRUTH_DIR / CARD_FILE).write_text(card)
    manifest = _manifest(plan, records, source, truths, models, out)
    atomic_write(out / MANIFEST_FILE, lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n"))
    return ExportSummary(out, len(truths), sum(m["shipped"] for m in models), sum(not m["shipped"] for m in models),
                         manifest["total_bytes"])


def _cached_truth(cache: ArtifactCache, source: TruthSource) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    found = cache.load_arrays(source.key)
    if found is None:
        raise ConfigError(f"ground truth {source.key} ({source.name}) is not in {cache.root}: the records were "
                          "judged against it; export from the folder that ran them")
    return found


def _task_data(plan: Plan, planned: PlannedTask) -> dict[str, Any]:
    """The task's query set (indices into its test split) and split sizes, loaded once."""
    import torch

    task = planned.cls(planned.config, seed=keys.task_seed(plan.suite, planned.spec.name), device=torch.device("cpu"))
    loaded = task.load_data()
    return {"query_idx": loaded.query_idx.cpu().numpy(), "n_train": len(loaded.train), "n_test": len(loaded.test),
            "task": task}


def _write_truth(out: Path, source: TruthSource, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                 data: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """One truth's tables under ``groundtruth/<name>/`` and its manifest entry."""
    import copy

    n_queries, n_columns = arrays["actual"].shape
    test_index = _query_test_index(n_queries, data, getattr(source.protocol.config, "n_queries", 0))
    tables, layout = to_tables(arrays, test_index)
    tables.save_to_disk(str(out / TRUTH_DIR / source.name))
    task = copy.copy(data["task"])
    task.base_model = source.base_models[0]
    protocol = keys.protocol_instance(plan.suite, source.protocol)
    seeds = len(arrays["replicates"]) if "replicates" in arrays else int(meta["diagnostics"].get("seeds", 1) or 1)
    return {"name": source.name, "path": f"{TRUTH_DIR}/{source.name}", "task": source.planned.spec.name,
            "protocol": source.protocol.name, "truth_key": source.key, "truth_digest": source.digest,
            "arrays_digest": arrays_digest(arrays), "has_model": bool(meta.get("has_model")),
            "depends_on_base": bool(source.protocol.cls.depends_on_base), "base_models": list(source.base_models),
            "task_keys": [keys.task_key(plan.suite, source.planned, b) for b in source.base_models],
            "n_queries": int(n_queries), "n_columns": int(n_columns), "column_noun": source.protocol.cls.column_noun,
            "replicate_seeds": protocol.replicate_seeds(task, seeds), "layout": layout, "meta": meta,
            "protocol_config": _plain(source.protocol.config), "task_config": _plain(source.planned.config),
            "query_test_index": test_index is not None}


def _query_test_index(n_queries: int, data: dict[str, Any], limit: int) -> np.ndarray | None:
    """Which test examples a truth's query rows are: the task's queries, the first ``limit`` of them (a protocol
    that scores fewer, e.g. the replay track), or the whole test split; None where none of these fits."""
    query_idx = data["query_idx"]
    if n_queries == len(query_idx):
        return query_idx
    if limit and n_queries == min(limit, len(query_idx)):
        return query_idx[:n_queries]
    return np.arange(n_queries) if n_queries == data["n_test"] else None


def _write_models(out: Path, cache: ArtifactCache, plan: Plan, records: list[Record],
                  sources: list[TruthSource], loaded: dict[str, Any]) -> list[dict[str, Any]]:
    """θ̂ of every base model and every truth's own model: copied where small, else a fingerprint to retrain and
    check it against (its digest and test accuracy)."""
    wanted: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.task_key and record.base_digest:
            wanted.setdefault(record.task_key, {"role": "base model", "task": record.task,
                                                "base_model": record.base_model or 0, "digest": record.base_digest,
                                                "test_accuracy": record.task_diagnostics.get("test_accuracy")})
    for source in sources:
        if loaded[source.key][1].get("has_model"):
            wanted[f"{source.key}-model"] = {"role": f"{source.protocol.name} truth's model", "task": source.planned.spec.name,
                                             "base_model": source.base_models[0], "digest": None, "test_accuracy": None}
    found = []
    for key, entry in wanted.items():
        weights, info = cache.model_paths(key)
        if not weights.exists():
            raise ConfigError(f"model {key} ({entry['role']} of {entry['task']}) is not in {cache.root}")
        tensors, meta = cache.load_model(key)
        digest = tensors_digest(tensors)
        if entry["digest"] not in (None, digest):
            raise ConfigError(f"cached model {weights} is not the one the records were judged against")
        shipped = weights.stat().st_size <= SHIPPED_MODEL_BYTES
        if shipped:
            (out / MODEL_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(weights, out / MODEL_DIR / weights.name)
            shutil.copyfile(info, out / MODEL_DIR / info.name)
        found.append({**entry, "key": key, "digest": digest, "shipped": shipped, "bytes": weights.stat().st_size,
                      "test_accuracy": entry["test_accuracy"] or meta.get("diagnostics", {}).get("test_accuracy")})
    return found


def _write_report(results: Path, out: Path, records: list[Record], source: str, with_figures: bool) -> None:
    """The leaderboard, the records it shows, the measurements beside them and the suite."""
    from bench.leaderboard import write_leaderboard

    write_leaderboard(results, out / "README.md", with_figures=with_figures)
    write_records(out / RECORDS_FILE, records)
    for name in MEASUREMENT_FILES:
        if (Path(results) / name).exists() and (Path(results) / name).resolve() != (out / name).resolve():
            shutil.copyfile(Path(results) / name, out / name)
    (out / SUITE_FILE).write_text(suite_text(source))


def _manifest(plan: Plan, records: list[Record], source: str, truths: list[dict[str, Any]],
              models: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    from bench import environment

    files = {str(p.relative_to(out)): {"sha256": file_digest(p), "bytes": p.stat().st_size}
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    first = records[0]
    return {"schema_version": SCHEMA_VERSION, "ifbench": first.versions.get("ifbench"),
            "exported_by": environment.git_commit(), "run_commits": sorted({r.git_commit for r in records}),
            "versions": dict(first.versions), "device": first.device, "threads": plan.suite.threads,
            "seed": plan.suite.seed, "suite": {"name": plan.suite.name, "source": source, "file": SUITE_FILE},
            "records": RECORDS_FILE, "truths": truths, "models": models, "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values())}


def _plain(config: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(config) if is_dataclass(config) else {}
