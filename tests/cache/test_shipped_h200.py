"""The H200 cache shipped in the package: valid for the current declarations, and what the loader
serves on an H200 (simulated here by its fingerprint): its entries while they were tuned on the
current kernel sources, the built-in defaults once a kernel change has left them stale (until the
campaign, benchmarks/campaign_h200.sh, is run again)."""

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


def test_every_shipped_entry_is_valid_for_the_current_declarations(entries):
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


def _current(entries, kernel: str) -> bool:
    """Whether the shipped entries of ``kernel`` were tuned on the current kernel sources (the
    campaign, benchmarks/campaign_h200.sh, re-stamps them; a kernel change leaves them stale)."""
    spec = get_spec(kernel, "triton")
    hashes = {e.kernel_hash for e in entries if e.kernel == kernel}
    assert len(hashes) == 1, f"shipped {kernel} entries from several kernel versions: {hashes}"
    return hashes == {spec.source_hash()}


def test_the_loader_serves_shipped_entries_on_an_h200_only_while_current(entries, tmp_path, monkeypatch):
    """Current shipped entries are served ("shipped", "nearest"); stale ones never are: the
    loader falls back to the built-in default."""
    monkeypatch.setattr(locations, "SHIPPED_DIR", SHIPPED.parent)
    loader.clear_memo()
    user = str(tmp_path / "empty-user-cache.sqlite")
    spec = get_spec("adasplash", "triton")
    grid = attention_key(backend="triton", dtype="bfloat16", batch=4, q_heads=16, kv_heads=16, seq_len=4096,
                         head_dim=64, alpha=1.5, causal=True, varlen=False)
    with open_store(str(SHIPPED), readonly=True) as store:
        stamped = [e for e in store.entries(kernel="adasplash") if e.key == grid]
    assert stamped, "the shipped cache has no entry for the (4,16,4096,64) causal grid point"
    config, source = loader._lookup(spec, grid, H200, user)
    other = dict(grid, bh=128)  # an unseen batch x heads
    if _current(entries, "adasplash"):
        assert source == "shipped" and config.as_dict() == stamped[0].config
        assert loader._lookup(spec, other, H200, user)[1] == "nearest"
    else:
        assert source == "default" and config == spec.default()
        assert loader._lookup(spec, other, H200, user)[1] == "default"
    ekey = entmax_key(backend="triton", dtype="bfloat16", rows=4096, cols=8192, alpha=1.5)
    expected = "shipped" if _current(entries, "entmax") else "default"
    assert loader._lookup(get_spec("entmax", "triton"), ekey, H200, user)[1] == expected
    loader.clear_memo()


@pytest.mark.gpu
def test_select_returns_the_shipped_entry_on_an_h200_while_current(tmp_path, monkeypatch):
    import torch

    from adasplash_tune.device import fingerprint

    here = fingerprint("cuda:0")
    if here.device_id != H200.device_id:
        pytest.skip(f"the shipped cache is for {H200.device_id}; this is {here.device_id}")
    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "empty.sqlite"))
    monkeypatch.setattr(locations, "SHIPPED_DIR", SHIPPED.parent)
    loader.clear_memo()
    with open_store(str(SHIPPED), readonly=True) as store:
        entries = store.entries()
    q, k, v = (torch.randn(4, 16, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sel = adasplash_tune.select("adasplash", q, k, v, 1.5, True)
    assert sel.source == ("shipped" if _current(entries, "adasplash") else "default")
    x = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
    assert adasplash_tune.select("entmax", x, alpha=1.5).source == ("shipped" if _current(entries, "entmax")
                                                                    else "default")
    loader.clear_memo()
