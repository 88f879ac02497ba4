"""Call-time reads of cache files through sqlite3 (cache/lookup.py): the same answers as the
SQLAlchemy store over the same files, no SQLAlchemy on the selection path, and read-only
directories (a WAL cache there is read as an immutable snapshot, never written)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adasplash_tune
from adasplash_tune.cache import loader, locations, readonly
from adasplash_tune.cache.errors import SchemaOutdatedError, StoreError
from adasplash_tune.cache.lookup import FileLookup
from adasplash_tune.cache.store import Entry, open_store
from adasplash_tune.device import DeviceFingerprint, fingerprint
from adasplash_tune.kernels.problem import attention_key, entmax_key
from adasplash_tune.kernels.registry import get_spec

from .conftest import DATA, GPU, GPU_SAME_ARCH, attn_key, ent_key

SHIPPED_H200 = Path(adasplash_tune.__file__).parent / "cache" / "shipped" / "nvidia-h200.sqlite"
A100 = dict(GPU, name="NVIDIA A100", arch="sm_80", device_id="NVIDIA A100|sm_80|triton-3.6")
CPU = fingerprint("cpu").as_dict()
STALE = "0123456789abcdef"
DEVICE_IDS = [GPU["device_id"], GPU_SAME_ARCH["device_id"], A100["device_id"], CPU["device_id"],
              "Unknown GPU|sm_90|triton-3.6", "Unknown GPU|sm_75|triton-3.6", "no-bars"]


def _filled_cache(path: Path, make_entry) -> list[Entry]:
    """Entries on several devices and archs, stale and failed ones included."""
    entries = []
    for device, seqs in ((GPU, (64, 1024, 16384)), (GPU_SAME_ARCH, (256, 4096)), (A100, (128, 2048)),
                         (CPU, (16, 512))):
        for seq, bh, causal in itertools.product(seqs, (1, 32, 512), (False, True)):
            entries.append(make_entry(key=attn_key(seq=seq, bh=bh, causal=causal), device=device))
        entries.append(make_entry("entmax", ent_key(cols=seqs[0], rows=8), device=device))
    entries.append(make_entry(key=attn_key(seq=8192), kernel_hash=STALE))
    with open_store(path) as store:
        for e in entries:
            store.upsert_best(e)
        for e in entries[::7]:  # some failed verification: exact still returns them, nearest skips
            store.mark_failed(e)
    return entries


def _queries(kernel_hashes: dict[str, list[str]]):
    """(device_id, kernel, backend, hash, key) over exact hits, nearest candidates and misses."""
    for device_id, causal in itertools.product(DEVICE_IDS, (False, True)):
        for seq, bh in itertools.product((16, 100, 1024, 8192), (1, 32, 4096)):
            for h in kernel_hashes["adasplash"]:
                yield device_id, "adasplash", "torch", h, attn_key(seq=seq, bh=bh, causal=causal)
        for cols, rows in itertools.product((16, 256, 4096), (1, 64)):
            for h in kernel_hashes["entmax"]:
                yield device_id, "entmax", "torch", h, ent_key(cols=cols, rows=rows)


def _compare(path: Path, queries, *, immutable: bool = False) -> tuple[int, int]:
    """Both readers over ``path``: every exact and nearest answer equal; returns how many of
    each were found (so a test can tell that it compared real answers, not only Nones)."""
    found = [0, 0]
    with open_store(path, readonly=True, immutable=immutable) as old:
        new = FileLookup.open(path, immutable=immutable)
        try:
            for query in queries:
                exact_old, exact_new = old.get_exact(*query), new.get_exact(*query)
                assert exact_new == exact_old, query
                near_old, near_new = old.nearest(*query), new.nearest(*query)
                assert near_new == near_old, query
                found[0] += exact_new is not None
                found[1] += near_new is not None
                if query[0] == GPU["device_id"]:  # an explicit arch, as nearest's API allows
                    assert new.nearest(*query, arch="sm_80") == old.nearest(*query, arch="sm_80")
        finally:
            new.close()
    return found[0], found[1]


def test_file_reader_answers_as_the_store_does(tmp_path, make_entry):
    path = tmp_path / "user.sqlite"
    entries = _filled_cache(path, make_entry)
    current = {k: [get_spec(k, "torch").source_hash(), STALE] for k in ("adasplash", "entmax")}
    exact, near = _compare(path, list(_queries(current)))
    assert exact >= 10 and near >= 100
    # every stored entry, failed or stale, is found exactly and equal in every field
    with open_store(path, readonly=True) as old:
        lookup = FileLookup.open(path)
        for e in entries:
            ident = (e.device_id, e.kernel, e.backend, e.kernel_hash, e.key)
            assert lookup.get_exact(*ident) == old.get_exact(*ident) is not None
        lookup.close()


def test_file_reader_answers_as_the_store_does_on_the_shipped_h200_cache():
    with open_store(SHIPPED_H200, readonly=True, immutable=True) as store:
        entries = store.entries()
    assert entries
    queries = []
    for e, device_id in itertools.product(entries, (GPU["device_id"], GPU_SAME_ARCH["device_id"], "x|sm_90|y")):
        size_major, size_minor = ("seq", "bh") if e.kernel == "adasplash" else ("cols", "rows")
        for major, minor in ((1, 1), (2, 1), (0.25, 4)):
            key = dict(e.key, **{size_major: max(16, int(e.key[size_major] * major)),
                                 size_minor: max(1, int(e.key[size_minor] * minor))})
            for h in {e.kernel_hash, get_spec(e.kernel, e.backend).source_hash()}:
                queries.append((device_id, e.kernel, e.backend, h, key))
    exact, near = _compare(SHIPPED_H200, queries, immutable=True)
    assert exact >= len(entries) and near >= len(entries)


def test_missing_empty_and_outdated_files_behave_as_in_the_store(tmp_path):
    missing = tmp_path / "missing.sqlite"
    for opener in (lambda: open_store(missing, readonly=True), lambda: FileLookup.open(missing)):
        with pytest.raises(StoreError, match="no cache file there"):
            opener()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    key = (GPU["device_id"], "adasplash", "torch", get_spec("adasplash", "torch").source_hash(), attn_key())
    with open_store(empty, readonly=True) as old:
        lookup = FileLookup.open(empty)
        assert old.get_exact(*key) is None and lookup.get_exact(*key) is None
        assert old.nearest(*key) is None and lookup.nearest(*key) is None
    assert empty.stat().st_size == 0
    v1 = DATA / "cache-v1.sqlite"
    for opener in (lambda: open_store(v1, readonly=True), lambda: FileLookup.open(v1)):
        with pytest.raises(SchemaOutdatedError, match="needs an upgrade"):
            opener()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"x" * 4096)
    for opener in (lambda: open_store(junk, readonly=True), lambda: FileLookup.open(junk)):
        with pytest.raises(StoreError, match="not an SQLite database"):
            opener()


def _fingerprint(device: dict) -> DeviceFingerprint:
    return DeviceFingerprint(**{k: v for k, v in device.items() if k != "device_id"})


def _problem_keys(spec_kernel: str):
    if spec_kernel == "adasplash":
        for seq, bh, causal, dtype in itertools.product((16, 32, 100, 2048, 5000), (1, 16), (False, True),
                                                        ("float16", "bfloat16")):
            yield attention_key(backend="torch", dtype=dtype, batch=1, q_heads=bh, kv_heads=bh, seq_len=seq,
                                head_dim=64, alpha=1.5, causal=causal, varlen=False)
    else:
        for cols, rows in itertools.product((16, 300, 5000), (1, 8, 100)):
            yield entmax_key(backend="torch", dtype="float32", rows=rows, cols=cols, alpha=1.5)


def test_the_loader_selects_as_it_did_through_sqlalchemy(tmp_path, make_entry, monkeypatch, isolated_locations):
    """resolve's answers (config and source) with the sqlite3 reader equal those with the
    SQLAlchemy store in its place, over a user cache and shipped caches."""
    user = tmp_path / "user.sqlite"
    _filled_cache(user, make_entry)
    with open_store("sqlite://") as mem:  # a shipped file for the H200 and one for the A100
        for seq in (32, 2048):
            mem.upsert_best(make_entry(key=attn_key(seq=seq, bh=16)))
        mem.export(isolated_locations / "nvidia-h200.sqlite")
    with open_store("sqlite://") as mem:
        mem.upsert_best(make_entry(key=attn_key(seq=4096, bh=64), device=A100))
        mem.export(isolated_locations / "nvidia-a100.sqlite")
    fingerprints = [_fingerprint(d) for d in (GPU, GPU_SAME_ARCH, A100, CPU)]

    def answers() -> list[tuple]:
        loader.clear_memo()
        out = []
        for fp, kernel in itertools.product(fingerprints, ("adasplash", "entmax")):
            spec = get_spec(kernel, "torch")
            for key in _problem_keys(kernel):
                config, source = loader._lookup(spec, key, fp, str(user))
                out.append((fp.device_id, json.dumps(key, sort_keys=True), config.as_dict(), source))
        return out

    new = answers()
    opened = []

    def through_sqlalchemy(cls, path, *, immutable=False):
        opened.append(path)
        return open_store(path, readonly=True, immutable=immutable)

    monkeypatch.setattr(FileLookup, "open", classmethod(through_sqlalchemy))
    old = answers()
    loader.clear_memo()
    assert opened and new == old
    assert {source for *_, source in new} == {"cache", "shipped", "nearest", "default"}


def test_selection_never_imports_sqlalchemy(tmp_path, make_entry):
    """A fresh process selects from a user cache and a shipped cache (exact, shipped, nearest)
    without importing SQLAlchemy."""
    cpu = fingerprint("cpu")
    user, shipped = tmp_path / "user.sqlite", tmp_path / "ships"
    shipped.mkdir()
    probe = """
import json, sys
import adasplash_tune, torch
q = lambda n: torch.zeros(1, 2, n, 32)
sources = [adasplash_tune.select("adasplash", q(n), q(n), q(n), is_causal=True, backend="torch").source
           for n in (100, 1000, 300)]
print(json.dumps({"sources": sources, "sqlalchemy": sorted(m for m in sys.modules if m.startswith("sqlalchemy"))}))
"""

    def key(n: int) -> dict:
        return attention_key(backend="torch", dtype="float32", batch=1, q_heads=2, kv_heads=2, seq_len=n,
                             head_dim=32, alpha=1.5, causal=True, varlen=False)

    config = {"q_chunk": 64, "k_chunk": 128, "niter": 12}
    with open_store(user) as store:
        store.upsert_best(make_entry(key=key(100), device=cpu.as_dict(), config=config))
    with open_store("sqlite://") as mem:
        mem.upsert_best(make_entry(key=key(1000), device=cpu.as_dict(), config=config))
        mem.export(shipped / locations.shipped_name(cpu.name))
    env = dict(os.environ, ADASPLASH_TUNE_CACHE=str(user), ADASPLASH_TUNE_SHIPPED_DIR=str(shipped),
               PYTHONPATH=str(Path(adasplash_tune.__file__).parent.parent))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sources"] == ["cache", "shipped", "nearest"]
    assert result["sqlalchemy"] == []


# --------------------------------------------------------------------------- read-only directories


def _wal_cache(folder: Path, make_entry) -> tuple[Path, Entry]:
    path = folder / "user.sqlite"
    entry = make_entry(key=attn_key(seq=512))
    with open_store(path) as store:  # the store writes in WAL mode
        store.upsert_best(entry)
        entry = store.get_exact(entry.device_id, entry.kernel, entry.backend, entry.kernel_hash, entry.key)
    assert path.read_bytes()[18:20] == b"\x02\x02"  # the header's WAL flags
    assert not any(p.name.startswith("user.sqlite-") for p in folder.iterdir())  # no -wal/-shm left
    return path, entry


def test_a_cache_in_a_read_only_directory_is_read_immutable_and_never_written(
        tmp_path, make_entry, monkeypatch, caplog):
    path, entry = _wal_cache(tmp_path, make_entry)
    before = sorted(p.name for p in tmp_path.iterdir()), path.read_bytes(), path.stat().st_mtime_ns
    targets = []
    connect = readonly.sqlite3.connect

    def spy(target, *args, **kwargs):
        targets.append(target)
        return connect(target, *args, **kwargs)

    monkeypatch.setattr(readonly.sqlite3, "connect", spy)
    monkeypatch.setattr(readonly, "_directory_writable", lambda folder: folder != tmp_path)
    ident = (entry.device_id, entry.kernel, entry.backend, entry.kernel_hash, entry.key)
    with caplog.at_level(logging.INFO, logger="adasplash_tune"):
        for _ in range(2):
            lookup = FileLookup.open(path)
            assert lookup.get_exact(*ident) == entry
            lookup.close()
        with open_store(path, readonly=True) as store:  # the CLI's read-only store: the same rule
            assert store.get_exact(*ident) == entry
    assert targets and all("mode=ro" in t and "immutable=1" in t for t in targets)
    notes = [r.getMessage() for r in caplog.records if "read-only directory" in r.getMessage()]
    assert len(notes) == 1 and str(path) in notes[0]
    assert (sorted(p.name for p in tmp_path.iterdir()), path.read_bytes(), path.stat().st_mtime_ns) == before


def test_a_cache_in_a_writable_directory_is_read_with_mode_ro(tmp_path, make_entry, monkeypatch):
    path, entry = _wal_cache(tmp_path, make_entry)
    targets = []
    connect = readonly.sqlite3.connect
    monkeypatch.setattr(readonly.sqlite3, "connect",
                        lambda target, *a, **kw: targets.append(target) or connect(target, *a, **kw))
    lookup = FileLookup.open(path)
    assert lookup.get_exact(entry.device_id, entry.kernel, entry.backend, entry.kernel_hash, entry.key) == entry
    with pytest.raises(Exception, match="readonly|query_only"):  # the connection cannot write
        lookup._conn.execute("DELETE FROM tuned_entries")
    lookup.close()
    assert targets == [f"file:{path}?mode=ro"]


def _as_another_user(action) -> dict:
    """Run ``action()`` in a forked child without root's power to ignore permission bits (as
    the nobody user when this process is root); returns what it returned (a JSON-able dict)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_fd)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            result = {"ok": action()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def shared_folder():
    """A folder every user can enter (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="adasplash-ro-"))
    folder.chmod(0o755)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder)


def test_a_wal_cache_in_a_read_only_directory_is_read_by_another_user(shared_folder, make_entry, monkeypatch):
    """The real thing: a user who may not write the directory reads the cache (no -shm file can
    be made there), both at call time and through the CLI's read-only store."""
    path, entry = _wal_cache(shared_folder, make_entry)
    path.chmod(0o644)
    shared_folder.chmod(0o555)
    before = {p.name: p.read_bytes() for p in shared_folder.iterdir()}
    monkeypatch.setattr(locations, "SHIPPED_DIR", shared_folder / "none")  # one this user may look for
    spec = get_spec(entry.kernel, entry.backend)
    fp = _fingerprint(GPU)
    import sqlalchemy.dialects.sqlite  # noqa: F401 - loaded before the child loses access to it

    spec.source_hash()  # read (and memoised) here: the package's sources may be private to root

    def read() -> dict:
        loader.clear_memo()
        config, source = loader._lookup(spec, entry.key, fp, str(path))
        with open_store(path, readonly=True) as store:
            count = store.count()
        return {"source": source, "config": config.as_dict(), "count": count}

    result = _as_another_user(read)
    loader.clear_memo()
    assert result == {"ok": {"source": "cache", "config": entry.config, "count": 1}}
    assert {p.name: p.read_bytes() for p in shared_folder.iterdir()} == before


def test_a_read_only_cache_file_is_refused_before_any_work(shared_folder, make_entry):
    """Opening for writing (what ``tune`` and ``import`` do first) fails at once, naming the
    file, when this user cannot write it."""
    path, _ = _wal_cache(shared_folder, make_entry)
    path.chmod(0o444)

    def open_for_writing() -> dict:
        open_store(path).close()
        return {}

    result = _as_another_user(open_for_writing)
    assert result == {"error": f"StoreError: {path}: the cache file is read-only (open it read-only, "
                               f"or make it writable)"}
