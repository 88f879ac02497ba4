"""Fixtures for the cache tests: isolated cache locations, stores over every backend, entries."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import pytest

from adasplash_tune.cache.store import Entry, open_store
from adasplash_tune.kernels.problem import attention_key, entmax_key
from adasplash_tune.kernels.registry import get_spec

from .._postgres import fresh_schema

DATA = Path(__file__).parent / "data"

GPU = {"backend": "cuda", "vendor": "NVIDIA", "name": "NVIDIA H200", "arch": "sm_90",
       "sm_count": 132, "shared_mem": 232448, "torch_version": "2.11.0",
       "triton_version": "3.6.0", "runtime_version": "12.8",
       "device_id": "NVIDIA H200|sm_90|triton-3.6"}
#: Another model of the same architecture (for the arch fallback of nearest).
GPU_SAME_ARCH = dict(GPU, name="NVIDIA H100 80GB HBM3", sm_count=132,
                     device_id="NVIDIA H100 80GB HBM3|sm_90|triton-3.6")


@pytest.fixture(autouse=True)
def _isolated(isolated_locations):
    """No test reads the real user cache, shipped caches or record file."""


@pytest.fixture(params=["file", "memory", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """A fresh writable store: an SQLite file, SQLite in memory through a URL, or (marker
    ``postgres``) an empty schema on the PostgreSQL test server."""
    if request.param == "postgres":
        with fresh_schema() as url:
            s = open_store(url)
            yield s
            s.close()
        return
    target = str(tmp_path / "store.sqlite") if request.param == "file" else "sqlite://"
    s = open_store(target)
    yield s
    s.close()


def attn_key(seq: int = 1024, bh: int = 32, *, dtype: str = "float16", causal: bool = True,
             head_dim: int = 64, backend: str = "torch") -> dict[str, Any]:
    return attention_key(backend=backend, dtype=dtype, batch=1, q_heads=bh, kv_heads=bh,
                         seq_len=seq, head_dim=head_dim, alpha=1.5, causal=causal, varlen=False)


def ent_key(cols: int = 1024, rows: int = 64, *, alpha: float = 1.5) -> dict[str, Any]:
    return entmax_key(backend="torch", dtype="float32", rows=rows, cols=cols, alpha=alpha)


def random_config(kernel: str, backend: str, rng: random.Random) -> dict[str, Any]:
    """A random valid config drawn from the declaration (never just the default)."""
    spec = get_spec(kernel, backend)
    while True:
        values = {p.name: rng.choice(p.choices) for p in spec.params}
        if spec.is_valid(values):
            return values


@pytest.fixture
def make_entry() -> Callable[..., Entry]:
    rng = random.Random(1234)

    def make(kernel: str = "adasplash", key: dict[str, Any] | None = None, *,
             device: dict[str, Any] = GPU, time_ms: float | None = None, config=None,
             kernel_hash: str | None = None, **extra: Any) -> Entry:
        backend = "torch"
        if key is None:
            key = attn_key() if kernel == "adasplash" else ent_key()
        return Entry(
            kernel=kernel, backend=backend, device=dict(device),
            kernel_hash=kernel_hash or get_spec(kernel, backend).source_hash(), key=dict(key),
            config=config or random_config(kernel, backend, rng),
            time_ms=rng.uniform(0.1, 5.0) if time_ms is None else time_ms,
            spread_ms=0.01, error=rng.uniform(1e-7, 1e-5), trials=rng.randint(1, 60),
            strategy="tpe", provenance={"host": "test"}, **extra,
        )

    return make
