"""The H200 cache shipped in the package: valid, made by the current kernels, and what the loader
serves on an H200 (simulated here by its fingerprint; on the GPU machine ``adasplash-tune bench``
shows the selections come from "shipped", see benchmarks/results/h200-bench.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

import adasplash_tune
from adasplash_tune.cache import loader, locations
from adasplash_tune.cache.store import open_store
from adasplash_tune.device import DeviceFingerprint
from adasplash_tune.kernels.problem import attention_key, entmax_key
from adasplash_tune.kernels.registry import get_spec

SHIPPED = Path(adasplash_tune.__file__).parent / "cache" / "shipped" / "nvidia-h200.sqlite"
H200 = DeviceFingerprint(backend="cuda", vendor="NVIDIA", name="NVIDIA H200", arch="sm_90", sm_count=132,
                         shared_mem=232448, torch_version="2.11.0+cu130", triton_version="3.6.0",
                         runtime_version="13.0")


@pytest.fixture()
def entries():
    assert SHIPPED.is_file(), "the package ships no H200 cache"
    with open_store(str(SHIPPED), readonly=True) as store:
        return store.entries()


def test_every_shipped_entry_is_valid_and_made_by_the_current_kernels(entries):
    kernels = {e.kernel for e in entries}
    assert kernels == {"adasplash", "entmax"} and len(entries) >= 60
    for entry in entries:
        spec = get_spec(entry.kernel, entry.backend)
        assert entry.device["device_id"] == H200.device_id
        context = {"max_shared_mem": H200.shared_mem}
        if entry.kernel == "adasplash":
            context.update(head_dim=entry.key["head_dim"], dtype_bytes=2 if entry.key["dtype"] != "float32" else 4)
        spec.validate(entry.config, context)  # raises ConfigError naming the field
        assert entry.error is not None and entry.time_ms > 0
        assert entry.kernel_hash == spec.source_hash(), (
            f"the shipped {entry.kernel} entries were tuned on other kernel sources: re-run "
            "benchmarks/campaign_h200.sh on an H200 (the loader ignores stale entries)")


def test_the_loader_serves_shipped_entries_on_an_h200(tmp_path, monkeypatch):
    monkeypatch.setattr(locations, "SHIPPED_DIR", SHIPPED.parent)
    loader.clear_memo()
    user = str(tmp_path / "empty-user-cache.sqlite")
    spec = get_spec("adasplash", "triton")
    grid = attention_key(backend="triton", dtype="bfloat16", batch=4, q_heads=16, kv_heads=16, seq_len=4096,
                         head_dim=64, alpha=1.5, causal=True, varlen=False)
    config, source = loader._lookup(spec, grid, H200, user)
    assert source == "shipped"
    with open_store(str(SHIPPED), readonly=True) as store:
        entry = store.get_exact(H200.device_id, "adasplash", "triton", spec.source_hash(), grid)
    assert entry is not None and config.as_dict() == entry.config
    # an unseen batch x heads: the nearest shipped problem
    other = dict(grid, bh=128)
    assert loader._lookup(spec, other, H200, user)[1] == "nearest"
    # the standalone entmax grid too
    ekey = entmax_key(backend="triton", dtype="bfloat16", rows=4096, cols=8192, alpha=1.5)
    assert loader._lookup(get_spec("entmax", "triton"), ekey, H200, user)[1] == "shipped"
    loader.clear_memo()


@pytest.mark.gpu
def test_select_returns_the_shipped_entry_on_an_h200(tmp_path, monkeypatch):
    import torch

    from adasplash_tune.device import fingerprint

    here = fingerprint("cuda:0")
    if here.device_id != H200.device_id:
        pytest.skip(f"the shipped cache is for {H200.device_id}; this is {here.device_id}")
    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "empty.sqlite"))
    monkeypatch.setattr(locations, "SHIPPED_DIR", SHIPPED.parent)
    loader.clear_memo()
    q, k, v = (torch.randn(4, 16, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sel = adasplash_tune.select("adasplash", q, k, v, 1.5, True)
    assert sel.source == "shipped"
    x = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
    assert adasplash_tune.select("entmax", x, alpha=1.5).source == "shipped"
    loader.clear_memo()
