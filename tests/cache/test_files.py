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
    spec_cfg = dict(get_spec("adasplash", "triton").default().as_dict(), mask_m=64, fwd_block_m=32)
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
