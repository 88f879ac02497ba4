"""Call-time selection: precedence (cache > shipped > nearest > default), memoisation, stale and
failed entries, modes, the record file, and broken caches that must not break a forward pass."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import adasplash_tune
from adasplash_tune.api import clear_memo
from adasplash_tune.cache import locations
from adasplash_tune.cache.lookup import FileLookup
from adasplash_tune.cache.store import Entry, open_store
from adasplash_tune.device import fingerprint
from adasplash_tune.kernels import reference
from adasplash_tune.kernels.registry import get_spec

CPU = fingerprint("cpu").as_dict()
SPEC = get_spec("adasplash", "torch")
ENT_SPEC = get_spec("entmax", "torch")


def _qkv(n: int, *, b: int = 1, h: int = 2, d: int = 32):
    g = torch.Generator().manual_seed(n)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, h, n, d, generator=g)
    return q, k, torch.randn(b, h, n, d, generator=g)


def _key(n: int) -> dict:
    """The problem key a call at sequence length ``n`` uses (the memo is cleared again)."""
    key = adasplash_tune.select("adasplash", *_qkv(n), is_causal=True, backend="torch").key
    clear_memo()
    return key


def _entry(key: dict, config: dict, *, kernel: str = "adasplash", device: dict = CPU,
           kernel_hash: str | None = None, time_ms: float = 1.0) -> Entry:
    spec = get_spec(kernel, "torch")
    return Entry(kernel, "torch", dict(device), kernel_hash or spec.source_hash(), dict(key),
                 config, time_ms=time_ms, error=1e-6, trials=3, strategy="grid")


def _put(location, *entries: Entry) -> None:
    with open_store(location) as store:
        for e in entries:
            store.upsert_best(e)


def _ship(*entries: Entry) -> None:
    """Write a shipped cache for the CPU 'model' the way releases do: an exported .sqlite."""
    with open_store("sqlite://") as mem:
        for e in entries:
            mem.upsert_best(e)
        mem.export(locations.shipped_dir() / locations.shipped_name(CPU["name"]))


def _select(n: int, **kw):
    return adasplash_tune.select("adasplash", *_qkv(n), is_causal=True, backend="torch", **kw)


CFG_A = {"q_chunk": 64, "k_chunk": 128, "niter": 12}
CFG_B = {"q_chunk": 32, "k_chunk": 512, "niter": 10}


def _user() -> str:
    """The user cache: conftest points ADASPLASH_TUNE_CACHE at a fresh file per test."""
    return os.environ[locations.ENV_CACHE]


def test_default_on_an_empty_cache():
    open_store(_user()).close()
    sel = _select(100)
    assert sel.source == "default" and sel.config == SPEC.default().as_dict()
    assert sel.key["seq"] == 128 and sel.key["backend"] == "torch"


def test_cache_after_an_entry_for_the_exact_key_is_added():
    key = _key(100)
    _put(_user(), _entry(key, CFG_A))
    sel = _select(100)
    assert (sel.source, sel.config, sel.key) == ("cache", CFG_A, key)


def test_shipped_when_only_the_shipped_cache_has_it():
    key = _key(100)
    _ship(_entry(key, CFG_B))
    sel = _select(100)
    assert (sel.source, sel.config) == ("shipped", CFG_B)


def test_user_cache_beats_shipped():
    key = _key(100)
    _ship(_entry(key, CFG_B))
    _put(_user(), _entry(key, CFG_A, time_ms=5.0))  # slower, but the user's own measurement
    sel = _select(100)
    assert (sel.source, sel.config) == ("cache", CFG_A)


def test_nearest_for_an_unseen_sequence_length():
    _put(_user(), _entry(_key(1000), CFG_A), _entry(dict(_key(1000), seq=16384), CFG_B))
    sel = _select(300)  # seq bucket 512: 1024 is nearer than 16384
    assert sel.key["seq"] == 512
    assert (sel.source, sel.config) == ("nearest", CFG_A)


def test_nearest_from_a_shipped_cache_of_the_same_arch():
    other = dict(CPU, name="CPU other model", device_id="CPU other model|%s|triton-0.0" % CPU["arch"])
    _ship(_entry(_key(60), CFG_B, device=other))
    sel = _select(60)
    assert (sel.source, sel.config) == ("nearest", CFG_B)


def test_stale_entries_are_ignored():
    key = _key(100)
    _put(_user(), _entry(key, CFG_A, kernel_hash="feedfacefeedface"))
    sel = _select(100)
    assert sel.source == "default"


def test_entries_that_failed_verify_are_skipped():
    key = _key(100)
    bad = _entry(key, CFG_A)
    _put(_user(), bad, _entry(dict(key, seq=256), CFG_B))
    with open_store(_user()) as store:
        store.mark_failed(bad)
    sel = _select(100)
    assert (sel.source, sel.config) == ("nearest", CFG_B)


def test_memoised_per_key_the_database_is_not_touched_again(monkeypatch):
    _put(_user(), _entry(_key(100), CFG_A))
    calls = []
    original = FileLookup.get_exact

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FileLookup, "get_exact", counting)
    first = _select(100)
    assert len(calls) == 1
    # a different call signature (seq 120, same bucket) and repeated calls: no more queries
    for n in (100, 120, 127, 120):
        assert _select(n).config == first.config == CFG_A
    assert len(calls) == 1


def test_mode_off_uses_defaults_only(monkeypatch):
    _put(_user(), _entry(_key(100), CFG_A))
    monkeypatch.setenv("ADASPLASH_TUNE_MODE", "off")
    sel = _select(100)
    assert (sel.source, sel.config) == ("default", SPEC.default().as_dict())


def test_mode_online_is_cache_with_one_warning(monkeypatch, caplog):
    _put(_user(), _entry(_key(100), CFG_A))
    monkeypatch.setenv("ADASPLASH_TUNE_MODE", "online")
    with caplog.at_level(logging.WARNING, logger="adasplash_tune"):
        assert _select(100).source == "cache"
        assert _select(300).source == "nearest"
    assert sum("online is reserved" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("content", [b"not a database at all " * 100, None])
def test_unreadable_or_missing_cache_warns_once_and_the_forward_pass_runs(content, caplog):
    path = _user()
    if content is not None:
        with open(path, "wb") as fh:
            fh.write(content)
    x = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(7))
    with caplog.at_level(logging.WARNING, logger="adasplash_tune"):
        outs = [adasplash_tune.entmax(x, alpha=a, backend="torch") for a in (1.5, 2.0, 1.3)]
        assert _select(100).source == "default"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and path in warnings[0].getMessage()
    for alpha, out in zip((1.5, 2.0, 1.3), outs):
        err = reference.relative_error(out, reference.entmax_reference(x, alpha))
        assert err <= reference.tolerance(torch.float32)
    if content is not None:
        assert open(path, "rb").read() == content


@pytest.mark.parametrize("niter", [1, 16])
def test_cached_entmax_config_is_the_one_that_runs(niter):
    """niter=1 is far from converged: its error proves the cached config (not the default) ran."""
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(3))
    key = adasplash_tune.select("entmax", x, alpha=1.25, backend="torch").key
    clear_memo()
    cfg = {"niter": niter, "row_chunk": 256}
    _put(_user(), _entry(key, cfg, kernel="entmax"))
    sel = adasplash_tune.select("entmax", x, alpha=1.25, backend="torch")
    assert (sel.source, sel.config) == ("cache", cfg)
    out = adasplash_tune.entmax(x, alpha=1.25, backend="torch")
    assert torch.equal(out, adasplash_tune.entmax(x, alpha=1.25, backend="torch", config=cfg))
    err = reference.relative_error(out, reference.entmax_reference(x, 1.25))
    tol = reference.tolerance(torch.float32)
    if niter == 1:
        assert err > 100 * tol
    else:
        assert err <= tol


def test_explicit_config_is_reported_as_explicit():
    sel = _select(100, config={"q_chunk": 16})
    assert sel.source == "explicit" and sel.config["q_chunk"] == 16


def test_record_file_gets_each_new_key_once_with_its_shape(tmp_path, monkeypatch):
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("ADASPLASH_TUNE_RECORD", str(record))
    for n in (100, 120, 100, 300):  # 100 and 120 share a key
        _select(n)
    x = torch.randn(4, 3, 50)
    adasplash_tune.select("entmax", x, alpha=2.0, dim=1, backend="torch")
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["kernel"], r["key"].get("seq") or r["key"].get("cols")) for r in lines] == [
        ("adasplash", 128), ("adasplash", 512), ("entmax", 16)]
    assert lines[0]["shape"] == {"batch": 1, "heads": 2, "kv_heads": 2, "seq_len": 100,
                                 "head_dim": 32, "alpha": 1.5, "causal": True, "varlen": False,
                                 "dtype": "float32"}
    assert lines[2]["shape"] == {"rows": 200, "cols": 3, "alpha": 2.0, "dtype": "float32"}
    assert all(r["backend"] == "torch" and r["device"] == CPU["device_id"] for r in lines)


def test_outdated_user_cache_is_upgraded_and_used(tmp_path, monkeypatch):
    import shutil

    from .conftest import DATA

    path = tmp_path / "v1.sqlite"
    shutil.copy(DATA / "cache-v1.sqlite", path)
    monkeypatch.setenv(locations.ENV_CACHE, str(path))
    _put(path, _entry(_key(100), CFG_A))  # writable open upgrades; then add our entry
    clear_memo()
    assert _select(100).source == "cache"


def _child_resolve(n: int, queue) -> None:
    sel = _select(n)
    queue.put((sel.source, sel.config))


def test_forked_child_reopens_the_cache_instead_of_sharing_connections():
    import multiprocessing

    _put(_user(), _entry(_key(100), CFG_A), _entry(_key(1000), CFG_B))
    assert _select(100).source == "cache"  # the parent holds the store open now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_resolve, args=(1000, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and result == ("cache", CFG_B)
    assert _select(1000).config == CFG_B
