"""One malformed row never cancels an import: every field is checked against the schema's real
limits (column lengths, 32-bit integer columns, UTF-8 text, JSON depth) and a bad row is rejected
with a reason naming the file and the row, while the valid rows are stored."""

from __future__ import annotations

import itertools
import json

import pytest

from adasplash_tune.cache.entry import MAX_DEPTH
from adasplash_tune.cache.store import open_store

from .conftest import attn_key

VALID_ROWS = 2000
DEEP = 100_000  # far beyond Python's recursion limit


def _valid_rows(make_entry) -> list[dict]:
    """2,000 distinct valid entries (as exported)."""
    keys = itertools.product([2 ** i for i in range(4, 20)], [2 ** i for i in range(12)],
                             ("float16", "bfloat16", "float32"), (False, True), (64, 128))
    return [make_entry(key=attn_key(seq=seq, bh=bh, dtype=dtype, causal=causal, head_dim=dim)).to_dict()
            for seq, bh, dtype, causal, dim in itertools.islice(keys, VALID_ROWS)]


def _bad(base: dict, **changes) -> dict:
    row = json.loads(json.dumps(base))
    for path, value in changes.items():
        target = row
        *parents, last = path.split("__")
        for name in parents:
            target = target[name]
        target[last] = value
    return row


def _nest(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def bad_rows(base: dict) -> dict[str, tuple[str, str]]:
    """kind -> (JSON text of the row, a word the rejection reason must contain)."""
    rows = {
        "trials 2**70": (_bad(base, trials=2 ** 70), "trials"),
        "trials 2**31 (PostgreSQL integer)": (_bad(base, trials=2 ** 31), "trials"),
        "sm_count 2**31 (PostgreSQL integer)": (_bad(base, device__sm_count=2 ** 31), "sm_count"),
        "a key size 2**31 (PostgreSQL integer)": (_bad(base, key__seq=2 ** 31), "major size"),
        "lone surrogate in a string field": (_bad(base, strategy="tpe\ud800"), "UTF-8"),
        "lone surrogate in the provenance": (_bad(base, provenance={"host": "\udcff"}), "UTF-8"),
        "non-numeric sm_count": (_bad(base, device__sm_count="many"), "sm_count"),
        "non-numeric time": (_bad(base, time_ms="fast"), "time_ms"),
        "name longer than its column": (_bad(base, device__name="N" * 129), "device.name"),
        "strategy longer than its column": (_bad(base, strategy="s" * 33), "strategy"),
        "kernel hash longer than its column": (_bad(base, kernel_hash="f" * 65), "kernel_hash"),
        "non-finite number in the provenance": (_bad(base, provenance={"t": float("inf")}), "non-finite"),
        "timestamp out of range": (_bad(base, updated_at="0001-01-01T00:00:00+01:00"), "updated_at"),
    }
    texts = {kind: (json.dumps(row, sort_keys=True), word) for kind, (row, word) in rows.items()}
    # rows that json.dumps cannot even make: deep nesting, a 5,000-digit integer
    texts["deeply nested line"] = ('{"kernel": "adasplash", "provenance": ' + "[" * DEEP + "]" * DEEP + "}",
                                   "nested deeper")
    texts["nested just too deep"] = (json.dumps(_bad(base, provenance=_nest(MAX_DEPTH))), "nested deeper")
    texts["integer of 5,000 digits"] = (json.dumps(_bad(base, trials=0)).replace('"trials": 0', '"trials": ' + "9" * 5000),
                                        "trials")
    return texts


KINDS = list(bad_rows({"trials": 1, "device": {}, "key": {}}))


def _document(suffix: str, texts: list[str]) -> str:
    if suffix == ".jsonl":
        return "\n".join(texts) + "\n"
    return '{"format": "adasplash-tune-cache", "entries": [' + ",\n".join(texts) + "]}"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_2000_valid_rows_are_stored_and_each_bad_row_rejected_naming_file_and_row(
        store, make_entry, tmp_path, suffix):
    valid = _valid_rows(make_entry)
    bad = bad_rows(make_entry(key=attn_key(seq=1 << 20)).to_dict())
    texts = [json.dumps(r) for r in valid]
    positions = {}
    for index, (kind, (text, _)) in enumerate(bad.items()):  # spread the bad rows through the file
        at = (index + 1) * VALID_ROWS // (len(bad) + 1) + index
        texts.insert(at, text)
        positions[kind] = at
    path = tmp_path / f"mixed{suffix}"
    path.write_text(_document(suffix, texts), encoding="utf-8", errors="surrogatepass")
    report = store.import_file(path)
    assert (report.added, report.rejected) == (VALID_ROWS, len(bad))
    assert store.count() == VALID_ROWS
    for reason, (kind, (_, word)) in zip(report.reasons, sorted(bad.items(), key=lambda kv: positions[kv[0]])):
        where = f"line {positions[kind] + 1}" if suffix == ".jsonl" else f"entry {positions[kind]}"
        assert reason.startswith(f"mixed{suffix} {where}: "), (kind, reason)
        assert word in reason, (kind, reason)
        assert "\n" not in reason and len(reason) < 300, (kind, reason)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_bad_row_alone(make_entry, tmp_path, kind):
    valid = [make_entry(key=attn_key(seq=64)).to_dict(), make_entry(key=attn_key(seq=128)).to_dict()]
    text, word = bad_rows(make_entry(key=attn_key(seq=256)).to_dict())[kind]
    path = tmp_path / "one.jsonl"
    path.write_text(_document(".jsonl", [json.dumps(valid[0]), text, json.dumps(valid[1])]),
                    encoding="utf-8", errors="surrogatepass")
    with open_store(tmp_path / "c.sqlite") as store:
        report = store.import_file(path)
        assert (report.added, report.rejected) == (2, 1)
        assert report.reasons[0].startswith("one.jsonl line 2: ") and word in report.reasons[0]
        assert store.count() == 2


def test_a_line_that_is_not_utf8_rejects_only_that_line(make_entry, tmp_path):
    rows = [json.dumps(make_entry(key=attn_key(seq=s)).to_dict()).encode() for s in (64, 128)]
    bad = json.dumps(make_entry(key=attn_key(seq=256)).to_dict()).replace('"tpe"', '"tp\\u00e9"').encode()
    bad = bad.replace(b"tp\\u00e9", b"tp\xe9")  # Latin-1 bytes, not UTF-8
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([rows[0], bad, rows[1]]) + b"\n")
    with open_store(tmp_path / "c.sqlite") as store:
        report = store.import_file(path)
    assert (report.added, report.rejected) == (2, 1)
    assert report.reasons[0].startswith("latin1.jsonl line 2: strategy is not valid UTF-8")


def test_direct_upserts_are_held_to_the_same_limits(store, make_entry):
    huge, long_name, surrogate = make_entry(), make_entry(), make_entry(key=attn_key(seq=128))
    huge.trials = 2 ** 40
    long_name.device = dict(long_name.device, name="x" * 200)
    surrogate.strategy = "\ud800"
    with pytest.raises(ValueError, match="trials"):
        store.upsert_best(huge)
    with pytest.raises(ValueError, match="device.name"):
        store.upsert_best(long_name)
    report = store.upsert_many([make_entry(key=attn_key(seq=64)), surrogate])
    assert (report.added, report.rejected) == (1, 1) and "UTF-8" in report.reasons[0]
    assert store.count() == 1
