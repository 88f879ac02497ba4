"""Files that are not our caches are refused in one line and left untouched; concurrent writers
never lose rows; a committed old-version cache upgrades."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3

import pytest

from adasplash_tune.cache.models import SCHEMA_VERSION
from adasplash_tune.cache.store import SchemaOutdatedError, StoreError, open_store
from adasplash_tune.kernels.registry import get_spec

from .conftest import DATA, GPU, attn_key, ent_key


def _random_bytes(path):
    path.write_bytes(os.urandom(8192))


def _other_application(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users (name) VALUES ('ada')")
    con.commit()
    con.close()


def _other_application_with_schema_version(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE schema_version (version INTEGER)")
    con.execute("INSERT INTO schema_version VALUES (7)")
    con.commit()
    con.close()


def _newer_schema(path):
    with open_store(path) as s:
        s.close()
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()


@pytest.mark.parametrize("make, message", [
    (_random_bytes, "not an SQLite database"),
    (_other_application, "another application"),
    (_other_application_with_schema_version, "another application"),
    (_newer_schema, "newer than this adasplash-tune supports"),
])
@pytest.mark.parametrize("readonly", [False, True])
def test_non_cache_file_gives_one_line_error_and_stays_unchanged(tmp_path, make, message, readonly):
    path = tmp_path / "victim.sqlite"
    make(path)
    before = path.read_bytes()
    with pytest.raises(StoreError) as info:
        open_store(path, readonly=readonly)
    text = str(info.value)
    assert "\n" not in text and str(path) in text and message in text
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("victim")) == ["victim.sqlite"]


def _writer(path: str, worker: int, count: int, barrier) -> None:
    from adasplash_tune.cache.store import Entry

    barrier.wait()
    h = get_spec("adasplash", "torch").source_hash()
    store = open_store(path)
    try:
        for i in range(count):
            key = attn_key(seq=2 ** (4 + i % 10), bh=2 ** worker, head_dim=16 * (1 + i // 10))
            store.upsert_best(Entry("adasplash", "torch", dict(GPU), h, key,
                                    {"q_chunk": 64, "k_chunk": 256, "niter": 8}, time_ms=1.0 + i))
    finally:
        store.close()


def test_eight_processes_write_one_sqlite_file_and_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    workers, per_worker = 8, 20
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(path, w, per_worker, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    with open_store(path, readonly=True) as store:
        entries = store.entries()
    assert len(entries) == workers * per_worker
    seen = {(e.key["bh"], e.key["seq"], e.key["head_dim"]) for e in entries}
    expected = {(2 ** w, 2 ** (4 + i % 10), 16 * (1 + i // 10))
                for w in range(workers) for i in range(per_worker)}
    assert seen == expected


def test_committed_v1_cache_upgrades_in_place(tmp_path):
    committed = DATA / "cache-v1.sqlite"
    original = committed.read_bytes()
    path = tmp_path / "old.sqlite"
    shutil.copy(committed, path)
    with pytest.raises(SchemaOutdatedError, match="needs an upgrade"):
        open_store(path, readonly=True)
    with open_store(path) as store:
        entries = store.entries()
        assert len(entries) == 3
        by_seq = {e.key.get("seq"): e for e in entries}
        assert by_seq[1024].config == {"k_chunk": 512, "niter": 6, "q_chunk": 128}
        assert by_seq[4096].time_ms == pytest.approx(7.5)
        assert by_seq[1024].provenance == {"host": "gpu-node-1", "tool": "adasplash-tune 0.0.1"}
        assert all(e.failed_verify is False for e in entries)
        # the back-filled lookup columns serve nearest queries
        near = store.nearest(GPU["device_id"], "adasplash", "torch", "0123456789abcdef",
                             dict(by_seq[1024].key, seq=8192))
        assert near is not None and near.key["seq"] == 4096
        ent = store.nearest(GPU["device_id"], "entmax", "torch", "0123456789abcdef",
                            dict(ent_key(cols=2048, rows=4096, alpha=2.0)))
        assert ent is not None and ent.config == {"niter": 5, "row_chunk": 1024}
        assert [f["reason"] for f in store.failures()] == ["compile"]
    with open_store(path, readonly=True) as store:  # now current: read-only works
        assert store.count() == 3
    assert committed.read_bytes() == original


def test_upgraded_schema_matches_a_fresh_one(tmp_path):
    from sqlalchemy import create_engine, inspect

    path = tmp_path / "old.sqlite"
    shutil.copy(DATA / "cache-v1.sqlite", path)
    open_store(path).close()
    open_store(tmp_path / "fresh.sqlite").close()

    def columns(p):
        engine = create_engine(f"sqlite:///{p}")
        insp = inspect(engine)
        result = {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}
        indexes = {i["name"] for i in insp.get_indexes("tuned_entries")}
        engine.dispose()
        return result, indexes

    assert columns(path) == columns(tmp_path / "fresh.sqlite")
