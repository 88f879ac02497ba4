"""One cache, several writers at once (tuners on several hosts): an SQLite file and, with the
``postgres`` marker, a PostgreSQL server. Every writer opens its own store (its own engine and
connections), as separate processes would."""

from __future__ import annotations

import random
import threading

import pytest

from adasplash_tune.cache.store import open_store

from .._postgres import fresh_schema
from .conftest import GPU, GPU_SAME_ARCH, attn_key

WRITERS = 4
ROUNDS = 8


@pytest.fixture(params=["file", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_location(request, tmp_path):
    """Where every writer opens the cache: a path, or a URL of an empty PostgreSQL schema."""
    if request.param == "postgres":
        with fresh_schema() as url:
            yield url
        return
    yield str(tmp_path / "shared.sqlite")


def _run_writers(location: str, target) -> list[BaseException]:
    """``target(index, store)`` in WRITERS threads, each with its own store; the errors raised."""
    barrier = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            with open_store(location) as store:
                barrier.wait(timeout=60)  # every first write (device and kernel rows too) at once
                target(index, store)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_concurrent_upserts_keep_exactly_the_fastest_entry_per_key(shared_location, make_entry):
    keys = [attn_key(seq=s, bh=7) for s in (333, 1000, 4097)]
    rng = random.Random(7)
    # every writer offers every key ROUNDS times, on two devices, with distinct random times
    times = {(w, r, k, d): rng.uniform(0.05, 9.0) for w in range(WRITERS) for r in range(ROUNDS)
             for k in range(len(keys)) for d in range(2)}
    entries = {ident: make_entry(key=keys[ident[2]], device=(GPU, GPU_SAME_ARCH)[ident[3]], time_ms=t)
               for ident, t in times.items()}

    def offer(index: int, store) -> None:
        for ident, entry in entries.items():
            if ident[0] == index:
                store.upsert_best(entry)
        store.record_failure(GPU, "adasplash", "torch", entries[(index, 0, 0, 0)].kernel_hash, keys[0],
                             entries[(index, 0, 0, 0)].config, "runtime", f"writer {index}")

    assert _run_writers(shared_location, offer) == []
    with open_store(shared_location, readonly=True) as store:
        stored = store.entries(kernel="adasplash")
        assert len(stored) == len(keys) * 2 and store.count() == len(keys) * 2
        assert sorted(d["device_id"] for d in store.devices()) == sorted([GPU["device_id"], GPU_SAME_ARCH["device_id"]])
        for entry in stored:
            k = keys.index(entry.key)
            d = [GPU["device_id"], GPU_SAME_ARCH["device_id"]].index(entry.device_id)
            fastest = min((t, ident) for ident, t in times.items() if ident[2] == k and ident[3] == d)
            assert entry.time_ms == pytest.approx(fastest[0])
            assert entry.config == entries[fastest[1]].config
        failures = store.failures(kernel="adasplash")
        assert sorted(f["detail"] for f in failures) == [f"writer {i}" for i in range(WRITERS)]
