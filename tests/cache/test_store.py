"""ConfigStore: upsert-if-better, exact and nearest queries, failures, verify flags, merge policies.

Every test runs on an SQLite file and on SQLite in memory (through a URL).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from adasplash_tune.cache.entry import EntryError
from adasplash_tune.cache.store import Entry, ImportReport, StoreError, open_store
from adasplash_tune.kernels.registry import get_spec

from .conftest import GPU, GPU_SAME_ARCH, attn_key, ent_key


def _exact(store, entry: Entry) -> Entry | None:
    return store.get_exact(entry.device_id, entry.kernel, entry.backend, entry.kernel_hash, entry.key)


def test_upsert_then_get_exact_round_trips_every_field(store, make_entry):
    entry = make_entry(key=attn_key(seq=512, bh=8))
    assert store.upsert_best(entry) is True
    got = _exact(store, entry)
    assert got is not None
    assert (got.kernel, got.backend, got.kernel_hash) == ("adasplash", "torch", entry.kernel_hash)
    assert got.key == entry.key and got.config == entry.config
    assert got.device == GPU
    assert got.time_ms == pytest.approx(entry.time_ms)
    assert got.error == pytest.approx(entry.error)
    assert (got.trials, got.strategy) == (entry.trials, "tpe")
    assert got.provenance["host"] == "test" and got.provenance["tool"].startswith("adasplash-tune")
    assert got.created_at is not None and got.created_at.tzinfo is not None
    assert got.failed_verify is False


def test_upsert_replaces_only_when_faster(store, make_entry):
    key = attn_key(seq=2048)
    slow = make_entry(key=key, time_ms=2.0)
    fast = make_entry(key=key, time_ms=1.0)
    slower = make_entry(key=key, time_ms=3.0)
    assert store.upsert_best(slow) is True
    assert store.upsert_best(fast) is True
    assert store.upsert_best(slower) is False
    got = _exact(store, slow)
    assert got.config == fast.config and got.time_ms == pytest.approx(1.0)
    assert store.count() == 1


def test_get_exact_misses_other_hash_device_backend_or_key(store, make_entry):
    entry = make_entry(key=attn_key(seq=256))
    store.upsert_best(entry)
    did, h = entry.device_id, entry.kernel_hash
    assert store.get_exact(did, "adasplash", "torch", "ffffffffffffffff", entry.key) is None
    assert store.get_exact(GPU_SAME_ARCH["device_id"], "adasplash", "torch", h, entry.key) is None
    assert store.get_exact(did, "adasplash", "torch", h, attn_key(seq=512)) is None
    assert store.get_exact(did, "entmax", "torch", h, entry.key) is None


def test_upsert_rejects_invalid_config(store, make_entry):
    bad = make_entry(config={"q_chunk": 100, "k_chunk": 1024, "niter": 8})  # 100 not declared
    with pytest.raises(EntryError, match="q_chunk"):
        store.upsert_best(bad)
    assert store.count() == 0


def test_nearest_prefers_sequence_bucket_then_batch_heads(store, make_entry):
    for seq, bh, t in [(512, 32, 1.0), (4096, 32, 2.0), (2048, 4, 3.0), (2048, 512, 4.0)]:
        store.upsert_best(make_entry(key=attn_key(seq=seq, bh=bh), time_ms=t))
    h = get_spec("adasplash", "torch").source_hash()
    # seq 2048 exists for bh 4 and 512: seq distance wins first, then the bh distance (16 vs 4: 4)
    got = store.nearest(GPU["device_id"], "adasplash", "torch", h, attn_key(seq=2048, bh=16))
    assert (got.key["seq"], got.key["bh"]) == (2048, 4)
    # seq 8192: nearest seq bucket is 4096
    got = store.nearest(GPU["device_id"], "adasplash", "torch", h, attn_key(seq=8192, bh=32))
    assert (got.key["seq"], got.key["bh"]) == (4096, 32)


def test_nearest_requires_equal_non_size_fields(store, make_entry):
    store.upsert_best(make_entry(key=attn_key(seq=1024, dtype="float16")))
    h = get_spec("adasplash", "torch").source_hash()
    assert store.nearest(GPU["device_id"], "adasplash", "torch", h,
                         attn_key(seq=2048, dtype="bfloat16")) is None
    assert store.nearest(GPU["device_id"], "adasplash", "torch", h,
                         attn_key(seq=2048, causal=False)) is None


def test_nearest_falls_back_to_same_arch_device(store, make_entry):
    other = make_entry(key=attn_key(seq=1024), device=GPU_SAME_ARCH)
    store.upsert_best(other)
    store.upsert_best(make_entry(key=attn_key(seq=1024), device=dict(
        GPU, arch="sm_80", name="NVIDIA A100", device_id="NVIDIA A100|sm_80|triton-3.6")))
    h = other.kernel_hash
    got = store.nearest(GPU["device_id"], "adasplash", "torch", h, attn_key(seq=2048))
    assert got is not None and got.device_id == GPU_SAME_ARCH["device_id"]
    # the same device, when it has any candidate, beats the arch fallback
    mine = make_entry(key=attn_key(seq=16384))
    store.upsert_best(mine)
    got = store.nearest(GPU["device_id"], "adasplash", "torch", h, attn_key(seq=2048))
    assert got.device_id == GPU["device_id"] and got.key["seq"] == 16384


def test_nearest_for_entmax_uses_cols_then_rows(store, make_entry):
    store.upsert_best(make_entry("entmax", ent_key(cols=256, rows=64)))
    store.upsert_best(make_entry("entmax", ent_key(cols=4096, rows=8)))
    h = get_spec("entmax", "torch").source_hash()
    got = store.nearest(GPU["device_id"], "entmax", "torch", h, ent_key(cols=2048, rows=64))
    assert (got.key["cols"], got.key["rows"]) == (4096, 8)


def test_mark_failed_hides_entry_from_nearest_and_is_replaced_by_a_good_one(store, make_entry):
    entry = make_entry(key=attn_key(seq=1024), time_ms=0.5)
    store.upsert_best(entry)
    store.mark_failed(entry)
    assert _exact(store, entry).failed_verify is True
    assert store.nearest(entry.device_id, "adasplash", "torch", entry.kernel_hash,
                         attn_key(seq=2048)) is None
    slower_but_verified = make_entry(key=entry.key, time_ms=0.9)
    assert store.upsert_best(slower_but_verified) is True
    got = _exact(store, entry)
    assert got.failed_verify is False and got.config == slower_but_verified.config


def test_entries_filters_and_lists_stale_ones(store, make_entry):
    store.upsert_best(make_entry(key=attn_key(seq=128)))
    store.upsert_best(make_entry(key=attn_key(seq=128), kernel_hash="0000000000000000"))
    store.upsert_best(make_entry("entmax", ent_key(cols=64)))
    store.upsert_best(make_entry(key=attn_key(seq=128), device=GPU_SAME_ARCH))
    assert len(store.entries()) == 4
    assert len(store.entries("adasplash")) == 3
    assert len(store.entries("entmax")) == 1
    assert len(store.entries(device_id=GPU_SAME_ARCH["device_id"])) == 1
    assert {e.kernel_hash for e in store.entries("adasplash", GPU["device_id"])} == {
        "0000000000000000", get_spec("adasplash", "torch").source_hash()}
    assert store.count("adasplash") == 3


def test_record_failure_and_query(store):
    h = get_spec("adasplash", "torch").source_hash()
    key = attn_key(seq=64)
    store.record_failure(GPU, "adasplash", "torch", h, key, {"q_chunk": 2048}, "compile", "ptxas: oom")
    store.record_failure(GPU_SAME_ARCH, "adasplash", "torch", h, key, {"q_chunk": 16}, "timeout", "")
    failures = store.failures("adasplash", GPU["device_id"])
    assert len(failures) == 1
    assert failures[0]["reason"] == "compile" and failures[0]["config"] == {"q_chunk": 2048}
    assert failures[0]["key"] == key and failures[0]["detail"] == "ptxas: oom"
    assert len(store.failures()) == 2
    with pytest.raises(ValueError, match="failure reason"):
        store.record_failure(GPU, "adasplash", "torch", h, key, {}, "exploded", "")


@pytest.mark.parametrize("policy, expected_time, counts", [
    ("faster", 1.0, (1, 1, 1)),
    ("newer", 3.0, (1, 1, 1)),
    ("keep", 2.0, (1, 0, 2)),
])
def test_merge_policies(store, make_entry, policy, expected_time, counts):
    key = attn_key(seq=4096)
    old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    stored = make_entry(key=key, time_ms=2.0, updated_at=old)
    store.upsert_best(stored)
    faster_older = make_entry(key=key, time_ms=1.0, updated_at=old - timedelta(days=1))
    slower_newer = make_entry(key=key, time_ms=3.0, updated_at=old + timedelta(days=1))
    fresh = make_entry(key=attn_key(seq=8192), time_ms=5.0)
    report = store.upsert_many([faster_older, slower_newer, fresh], policy=policy)
    assert isinstance(report, ImportReport)
    assert (report.added, report.replaced, report.kept) == counts
    assert report.rejected == 0 and report.reasons == []
    assert _exact(store, stored).time_ms == pytest.approx(expected_time)


def test_unknown_policy_is_a_value_error(store, make_entry):
    with pytest.raises(ValueError, match="policy"):
        store.upsert_many([make_entry()], policy="fastest")


def test_readonly_store_refuses_writes_and_missing_file(tmp_path, make_entry):
    path = tmp_path / "ro.sqlite"
    with pytest.raises(StoreError, match="no cache file"):
        open_store(path, readonly=True)
    with open_store(path) as writable:
        writable.upsert_best(make_entry())
    with open_store(path, readonly=True) as ro:
        assert ro.count() == 1
        with pytest.raises(StoreError, match="read-only"):
            ro.upsert_best(make_entry(key=attn_key(seq=32)))


def test_default_location_comes_from_env(tmp_path, monkeypatch, make_entry):
    target = tmp_path / "from-env.sqlite"
    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", str(target))
    with open_store() as s:
        s.upsert_best(make_entry())
        assert s.location == str(target)
    assert target.exists()
    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", f"sqlite:///{target}")
    with open_store(readonly=True) as s:
        assert s.count() == 1


def test_upsert_adds_host_and_tool_to_provenance(store, make_entry):
    import platform

    entry = make_entry(key=attn_key(seq=32))
    entry.provenance = {"seed": 3}
    store.upsert_best(entry)
    got = _exact(store, entry)
    assert got.provenance["host"] == platform.node() and got.provenance["seed"] == 3
    assert got.provenance["tool"].startswith("adasplash-tune ")
    named = make_entry(key=attn_key(seq=64))
    named.provenance = {"host": "gpu-7", "tool": "adasplash-tune 9.9"}
    store.upsert_best(named)
    assert _exact(store, named).provenance == {"host": "gpu-7", "tool": "adasplash-tune 9.9"}


@pytest.mark.parametrize("field, value", [("time_ms", float("nan")), ("time_ms", -1.0),
                                          ("error", float("inf")), ("trials", -2)])
def test_upsert_rejects_bad_metrics(store, make_entry, field, value):
    entry = make_entry()
    setattr(entry, field, value)
    with pytest.raises(EntryError, match=field):
        store.upsert_best(entry)


def test_unmeasured_spread_is_stored_as_unknown(store, make_entry):
    entry = make_entry()
    entry.spread_ms = float("nan")
    store.upsert_best(entry)
    assert _exact(store, entry).spread_ms is None
