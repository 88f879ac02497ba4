"""Export / import: round trips through every format, and row-by-row validation on import."""

from __future__ import annotations

import json

from adasplash_tune.kernels.registry import get_spec

import pytest

from adasplash_tune.cache.store import StoreError, open_store

from .conftest import GPU_SAME_ARCH, attn_key, ent_key


def _fill(store, make_entry) -> list:
    entries = [
        make_entry(key=attn_key(seq=128, bh=2)),
        make_entry(key=attn_key(seq=1024, bh=64, dtype="bfloat16", causal=False)),
        make_entry(key=attn_key(seq=256), device=GPU_SAME_ARCH),
        make_entry(key=attn_key(seq=256), kernel_hash="aaaaaaaaaaaaaaaa"),  # stale, still exported
        make_entry("entmax", ent_key(cols=512, rows=8)),
        make_entry("entmax", ent_key(cols=32768, rows=1, alpha=2.0)),
    ]
    for e in entries:
        assert store.upsert_best(e)
    return entries


def _comparable(entries) -> list[tuple]:
    return sorted((e.kernel, e.backend, e.device_id, e.kernel_hash, json.dumps(e.key, sort_keys=True),
                   json.dumps(e.config, sort_keys=True), e.time_ms, e.error, e.trials,
                   e.failed_verify) for e in entries)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".sqlite", ".db"])
def test_export_import_round_trip(store, make_entry, tmp_path, suffix):
    entries = _fill(store, make_entry)
    store.mark_failed(entries[0])
    target = tmp_path / f"export{suffix}"
    assert store.export(target) == len(entries)
    with open_store(tmp_path / "empty.sqlite") as fresh:
        report = fresh.import_file(target)
        assert (report.added, report.replaced, report.kept, report.rejected) == (len(entries), 0, 0, 0)
        assert _comparable(fresh.entries()) == _comparable(store.entries())
        # importing again changes nothing under every policy: the same rows are kept
        for policy in ("faster", "newer", "keep"):
            again = fresh.import_file(target, policy=policy)
            assert (again.added, again.replaced, again.kept) == (0, 0, len(entries))


def test_export_filters_by_kernel_and_device(store, make_entry, tmp_path):
    _fill(store, make_entry)
    assert store.export(tmp_path / "e.json", kernel="entmax") == 2
    assert store.export(tmp_path / "d.json", device_id=GPU_SAME_ARCH["device_id"]) == 1
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["format"] == "adasplash-tune-cache"
    assert {row["kernel"] for row in data["entries"]} == {"entmax"}


def test_exported_sqlite_is_a_single_file_readable_read_only(store, make_entry, tmp_path):
    _fill(store, make_entry)
    out = tmp_path / "out"
    target = out / "ship.sqlite"
    store.export(target)
    assert [p.name for p in out.iterdir()] == ["ship.sqlite"]
    with open_store(target, readonly=True, immutable=True) as ro:
        assert ro.count() == 6


def _valid_rows(make_entry) -> list[dict]:
    return [make_entry(key=attn_key(seq=512)).to_dict(),
            make_entry("entmax", ent_key(cols=128)).to_dict()]


def _invalid_rows(make_entry) -> dict[str, dict]:
    base = make_entry(key=attn_key(seq=2048)).to_dict()
    rows = {
        "unknown kernel": dict(base, kernel="flashattn"),
        "unknown config field": dict(base, config=dict(base["config"], warp_size=32)),
        "not an allowed value": dict(base, config=dict(base["config"], q_chunk=100)),
        "malformed JSON": dict(base, config='{"q_chunk": 64, '),
        "key fields": dict(base, key={"seq": 2048}),
        "lacks fields": {k: v for k, v in base.items() if k != "config"},
    }
    return rows


def test_import_rejects_invalid_rows_and_keeps_valid_ones(store, make_entry, tmp_path):
    valid = _valid_rows(make_entry)
    invalid = _invalid_rows(make_entry)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"format": "adasplash-tune-cache", "entries": valid + list(invalid.values())}))
    report = store.import_file(path)
    assert (report.added, report.rejected) == (2, len(invalid))
    assert len(report.reasons) == len(invalid)
    for expected, reason in zip(invalid, report.reasons):
        assert expected in reason and "mixed.json" in reason
    assert store.count() == 2


def test_import_rejects_violated_constraint(make_entry, tmp_path):
    entry = make_entry(key=attn_key(seq=512, backend="triton"))
    entry.backend = "triton"
    spec_cfg = dict(get_spec("adasplash", "triton").default().as_dict(), mask_m=64, fwd_block_m=32,
                    fwd_mode="staged")
    good = dict(entry.to_dict(), config=dict(spec_cfg, fwd_block_m=128))
    bad = dict(entry.to_dict(), config=spec_cfg)  # fwd_block_m 32 is not a multiple of mask_m 64
    path = tmp_path / "constraint.json"
    path.write_text(json.dumps([good, bad]))
    with open_store(tmp_path / "c.sqlite") as s:
        report = s.import_file(path)
        assert (report.added, report.rejected) == (1, 1)
        assert "fwd_block_m % mask_m == 0" in report.reasons[0]


def test_jsonl_malformed_line_rejects_only_that_line(store, make_entry, tmp_path):
    good = [json.dumps(r) for r in _valid_rows(make_entry)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([good[0], '{"kernel": "adasplash", "backend": ', good[1]]) + "\n")
    report = store.import_file(path)
    assert (report.added, report.rejected) == (2, 1)
    assert "line 2" in report.reasons[0] and "malformed JSON" in report.reasons[0]


@pytest.mark.parametrize("content", [b"\x00\x01garbage\xff" * 50, b'{"entries": 3}',
                                     b'{"format": "something-else", "entries": []}'])
def test_import_of_a_non_export_raises_store_error_naming_it(store, tmp_path, content):
    path = tmp_path / "junk.json"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="junk.json"):
        store.import_file(path)
    assert path.read_bytes() == content


def test_import_from_sqlite_revalidates_rows(store, make_entry, tmp_path):
    """A cache file edited by hand: its bad row is rejected like any JSON row."""
    import sqlite3

    src = tmp_path / "edited.sqlite"
    with open_store(src) as s:
        s.upsert_best(make_entry(key=attn_key(seq=64)))
        s.upsert_best(make_entry(key=attn_key(seq=128)))
    con = sqlite3.connect(src)
    con.execute("UPDATE tuned_entries SET config_json = '{\"q_chunk\": 7}' WHERE id = 2")
    con.commit()
    con.close()
    report = store.import_file(src)
    assert (report.added, report.rejected) == (1, 1)
    assert "q_chunk" in report.reasons[0]


# --------------------------------------------------------------------------- untrusted SQLite files


def _crafted_view_file(path, rows: int) -> None:
    """A small file of the cache's layout whose "tuned_entries" is a view generating ``rows``
    rows (the probe that drove an importer past 10 GB)."""
    import sqlite3

    con = sqlite3.connect(path)
    con.executescript(f"""
        CREATE TABLE schema_version (app TEXT PRIMARY KEY, version INTEGER, updated_at TEXT);
        INSERT INTO schema_version VALUES ('adasplash-tune', 2, '2026-12-01 00:00:00');
        CREATE TABLE devices (id INTEGER PRIMARY KEY, device_id TEXT);
        CREATE TABLE kernels (id INTEGER PRIMARY KEY, name TEXT, backend TEXT, source_hash TEXT);
        CREATE VIEW tuned_entries AS
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT {rows})
            SELECT i AS id, 1 AS device_pk, 1 AS kernel_pk, '{{}}' AS key_json FROM n;
    """)
    con.close()


@pytest.mark.parametrize("command", ["import", "open", "open read-only"])
def test_a_view_posing_as_the_entries_table_is_refused_before_reading(store, tmp_path, command):
    path = tmp_path / "crafted.sqlite"
    _crafted_view_file(path, rows=3_000_000)
    before = path.read_bytes()
    assert len(before) < 70_000
    with pytest.raises(StoreError) as info:
        if command == "import":
            store.import_file(path)
        else:
            open_store(path, readonly=command == "open read-only")
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "tuned_entries is a view, not a table" in message
    assert "\n" not in message
    assert path.read_bytes() == before and store.count() == 0


def test_import_reads_at_most_max_file_rows_of_each_table(store, make_entry, tmp_path, monkeypatch):
    from adasplash_tune.cache import files

    src = tmp_path / "big.sqlite"
    with open_store(src) as s:
        for seq in (64, 128, 256, 512):
            s.upsert_best(make_entry(key=attn_key(seq=seq)))
    monkeypatch.setattr(files, "MAX_FILE_ROWS", 3)
    with pytest.raises(StoreError, match=r"big.sqlite: more than 3 rows in tuned_entries"):
        store.import_file(src)
    json_file = tmp_path / "big.jsonl"
    json_file.write_text("\n".join(json.dumps(make_entry(key=attn_key(seq=s)).to_dict())
                                   for s in (64, 128, 256, 512)))
    with pytest.raises(StoreError, match=r"big.jsonl: more than 3 entries"):
        store.import_file(json_file)
    assert store.count() == 0
    monkeypatch.setattr(files, "MAX_FILE_ROWS", 4)
    assert store.import_file(src).added == 4


def test_a_damaged_sqlite_file_is_an_error_naming_it(store, make_entry, tmp_path):
    src = _damaged_cache(tmp_path / "damaged.sqlite", make_entry)
    with pytest.raises(StoreError) as info:
        store.import_file(src)
    assert str(info.value).startswith(f"{src}: ") and "malformed" in str(info.value)


def _damaged_cache(path, make_entry):
    """A cache whose pages after the first (the schema) are overwritten: opening works, reading
    the entries finds a malformed database image."""
    with open_store(path) as s:
        s.upsert_many([make_entry(key=attn_key(seq=2 ** (4 + i % 12), bh=2 ** (i // 12)))
                       for i in range(300)])
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = DELETE")
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 6 * page
    data[2 * page:len(data) - page] = bytes([0xA5]) * (len(data) - 3 * page)
    path.write_bytes(bytes(data))
    return path


def test_a_zero_byte_file_is_an_empty_cache(store, make_entry, tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    report = store.import_file(empty)  # as a source: nothing to import
    assert (report.added, report.rejected) == (0, 0)
    with open_store(empty, readonly=True) as ro:  # read-only: an empty cache, left at 0 bytes
        assert ro.count() == 0 and ro.entries() == []
    assert empty.stat().st_size == 0
    with open_store(empty) as rw:  # for writing: initialised, then used
        assert rw.upsert_best(make_entry())
    with open_store(empty, readonly=True) as ro:
        assert ro.count() == 1


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".sqlite"])
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exports_follow_the_umask_also_over_an_existing_file(store, make_entry, tmp_path, suffix, umask):
    import os
    import stat

    store.upsert_best(make_entry())
    target = tmp_path / f"out{suffix}"
    old = os.umask(umask)
    try:
        store.export(target)
        fresh = stat.S_IMODE(target.stat().st_mode)
        target.chmod(0o644)
        store.export(target)  # overwrite
        again = stat.S_IMODE(target.stat().st_mode)
    finally:
        os.umask(old)
    assert fresh == again == 0o666 & ~umask
