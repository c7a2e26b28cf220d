import json

import pytest

from bench.records import Fact, Profile, Record, RecordSchemaError, fact
from bench.store import ResultsStore


def _record(key, **fields):
    return {"cell_key": key, "task": "t", "protocol": "p", "estimator": "e", "status": "ok", **fields}


def test_append_and_read_back(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_record("a", metrics={"pearson": float("nan")}))
    store.append(_record("b", metrics={"pearson": 0.5}))
    records = store.records()
    assert [r.cell_key for r in records] == ["a", "b"]
    assert records[0].metrics["pearson"] is None
    assert {json.loads(line)["schema_version"] for line in store.path.read_text().splitlines()} == {2}


def test_a_record_round_trips_through_its_json_with_typed_pieces(tmp_path):
    record = Record.from_json({"schema_version": 2, **_record(
        "a", ci={"pearson": [0.1, 0.3]}, facts=[fact("{} queries × {} points", 5, 4)], profile={"fit_s": 1.5},
        metric_specs={"pearson": {"title": "Pearson", "higher_is_better": True}}, cause="cell", details={"x": [1]})})
    assert record.ci["pearson"] == (0.1, 0.3) and record.facts == (Fact("{} queries × {} points", ("5", "4")),)
    assert record.profile == Profile(fit_s=1.5) and record.extra == {"cause": "cell", "details": {"x": [1]}}
    store = ResultsStore(tmp_path)
    store.append(record)
    assert store.records() == [record]


def test_another_schema_version_is_refused_naming_the_line_and_both_versions(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_record("a"))
    with store.path.open("a") as handle:
        handle.write(json.dumps({"schema_version": 9, **_record("b")}) + "\n")
    with pytest.raises(RecordSchemaError, match=r"line 2 of .*records.jsonl has schema version 9; this ifbench "
                       r"reads versions 1, 2"):
        store.records()


def test_a_malformed_record_is_refused_before_it_is_written(tmp_path):
    store = ResultsStore(tmp_path)
    for bad, message in (({"cell_key": "a"}, "lacks the required text fields"),
                         (_record("a", status="done"), "status 'done'; valid: ok, failed, not-applicable"),
                         (_record("a", profile={"fit_seconds": 1.0}), r"profile fields \['fit_seconds'\]"),
                         (_record("a", ci={"pearson": ["low", "high"]}), "an interval must be")):
        with pytest.raises(RecordSchemaError, match=message):
            store.append(bad)
    assert not store.path.exists()


def test_version_1_records_are_read_with_their_sentences_upgraded(tmp_path):
    store = ResultsStore(tmp_path)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text(json.dumps({"schema_version": 1, **_record("a", facts=["100 queries × 4 points"])}) + "\n")
    (record,) = store.records()
    assert record.facts == (Fact("{} queries × {} points", ("100", "4")),)


def test_torn_last_line_is_skipped_and_next_append_is_clean(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_record("a"))
    with store.path.open("a") as handle:
        handle.write('{"cell_key": "torn", "metr')  # a crash mid-write
    assert [r.cell_key for r in store.records()] == ["a"]
    store.append(_record("b"))
    assert [r.cell_key for r in store.records()] == ["a", "b"]
    assert all(json.loads(line) for line in store.path.read_text().splitlines()[-1:])


def test_latest_keeps_last_record_per_cell(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_record("a", status="failed"))
    store.append(_record("a", status="ok"))
    assert store.latest()["a"].status == "ok"


def test_trained_model_round_trips_through_the_cache(tmp_path):
    import torch

    from bench.cache import ArtifactCache, pack_trained, unpack_trained
    from tasks.base import Checkpoint, TrainedModel

    base = TrainedModel({"w": torch.arange(6.0).view(2, 3)}, (Checkpoint({"w": torch.ones(2, 3)}, 0.1, 5),), {"acc": 0.9})
    cache = ArtifactCache(tmp_path)
    cache.save_model("k", *pack_trained(base, "t"))
    back = unpack_trained(*cache.load_model("k"), device=torch.device("cpu"))
    assert torch.equal(back.params["w"], base.params["w"]) and back.diagnostics == {"acc": 0.9}
    assert back.checkpoints[0].learning_rate == 0.1 and torch.equal(back.checkpoints[0].params["w"], torch.ones(2, 3))


def test_a_short_write_is_continued_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    """os.write may write part of a record: the rest follows. If the disk fills up mid-record, the file is
    truncated back, so no torn record is left, and the error reaches the caller."""
    import errno
    import os

    import pytest

    import bench.store

    store = ResultsStore(tmp_path)
    store.append(_record("a"))
    real_write = os.write
    monkeypatch.setattr(bench.store.os, "write", lambda fd, data: real_write(fd, data[:7]))  # short writes
    store.append(_record("b", metrics={"pearson": 0.5}))
    assert [r.cell_key for r in store.records()] == ["a", "b"]
    before = store.path.read_bytes()
    calls = []

    def disk_full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(bench.store.os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.append(_record("c"))
    assert store.path.read_bytes() == before  # whole records only


def test_memory_is_sampled_per_phase_without_blinding_outside_tools():
    """A phase's own increment is measured, and the process's lifetime peak (VmHWM, what /usr/bin/time and
    getrusage report) is left alone: the old reset through /proc/self/clear_refs made a 1.5 GB peak read 222 MB."""
    import time
    from pathlib import Path

    import pytest
    import torch

    from bench.phase_cost import current_rss_mb, profiled

    if current_rss_mb() is None:
        pytest.skip("no /proc on this platform: the getrusage fallback has no per-phase increment")

    def high_water_mb():
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    spike = torch.ones(400 * 2**20 // 4)  # 400 MB, then freed: the lifetime peak stays above it
    spike += 1
    del spike
    peak_before = high_water_mb()
    with profiled() as phase:
        block = torch.ones(150 * 2**20 // 4)  # 150 MB held for 50 ms: the sampler sees it
        block += 1
        time.sleep(0.05)
        del block
    assert phase.rss_increase_mb >= 120 and phase.peak_rss_mb >= phase.baseline_rss_mb + 120
    assert high_water_mb() >= peak_before  # not reset
