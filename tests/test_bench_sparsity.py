"""benchmarks/bench_sparsity.py: its crossover arithmetic, its input families, and an end-to-end
``--cpu-smoke`` run (CPU tensors, Triton interpreter) checked against the fp64 oracle."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adasplash_tune.kernels.reference import tolerance

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_sparsity.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sparsity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crossover_interpolates_in_density(bench):
    # ours - sdpa: +5 at 1.0, +1 at 0.5, -3 at 0.1 -> zero at 0.5 + (0.1 - 0.5) * 1 / 4 = 0.4
    points = [(0.1, 2.0, 5.0), (1.0, 10.0, 5.0), (0.5, 6.0, 5.0)]
    got = bench.crossover(points)
    assert got["density"] == pytest.approx(0.4)
    assert "0.5000" in got["note"] and "0.1000" in got["note"]


def test_crossover_never_and_always(bench):
    never = bench.crossover([(1.0, 9.0, 5.0), (0.3, 7.0, 5.0), (0.05, 5.5, 5.0)])
    assert never["density"] is None and "never" in never["note"] and "0.0500" in never["note"]
    always = bench.crossover([(0.9, 3.0, 5.0), (0.2, 1.0, 5.0)])
    assert always["density"] is None and "already faster" in always["note"]
    # a point exactly at parity is the crossover; failed (NaN) timings are ignored
    assert bench.crossover([(0.8, 6.0, 5.0), (0.33, 5.0, 5.0), (0.1, math.nan, 1.0)])["density"] == pytest.approx(0.33)
    assert bench.crossover([])["density"] is None


@pytest.mark.parametrize("scale", [1.5, 7.0])
def test_local_family_scores(bench, scale):
    """Sink + locality: query i scores s on key 0 and on key i, and less elsewhere."""
    b, h, n, d = 1, 2, 96, 24
    q, k, v, g = bench.make_inputs("local", scale, (b, h, n, d), torch.float32, "cpu", seed=3, corr_len=4.0)
    assert q.shape == k.shape == v.shape == g.shape == (b, h, n, d)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    assert torch.allclose(scores[..., 0], torch.full((b, h, n), scale), rtol=1e-5)
    diag = scores.diagonal(dim1=-2, dim2=-1)[..., 1:]
    assert torch.allclose(diag, torch.full_like(diag, scale), rtol=1e-5)
    off = scores[..., 1:, 1:] - torch.diag_embed(scores.diagonal(dim1=-2, dim2=-1)[..., 1:])
    assert off.max().item() < scale * (1 - 1e-4)
    # locality: neighbours score higher than keys far away
    i = torch.arange(10, n)
    near = scores[..., i, i - 1]  # (i, i - 1): correlation length 4 tokens
    far = scores[..., 60:, 1:20]
    assert near.mean().item() > 0.8 * scale > far.abs().mean().item()
    q2, k2, *_ = bench.make_inputs("randn", scale, (b, h, n, d), torch.float32, "cpu", seed=3, corr_len=4.0)
    assert q2.std().item() == pytest.approx(scale, rel=0.1) and k2.std().item() == pytest.approx(1.0, rel=0.1)


def test_cpu_smoke_end_to_end(tmp_path):
    out = tmp_path / "sparsity.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "crossover density" in proc.stdout
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["interpreter"] is True and meta["device"] == "cpu"
    assert meta["shape"] == [1, 2, 128, 16] and meta["dtype"] == "float32"
    assert meta["torch"] == torch.__version__ and meta["triton"] and meta["date"]
    assert set(meta["selection"]) == {"causal", "non-causal"}
    rows = report["rows"]
    assert len(rows) == 2 * 3  # (local 1, 16; randn 1) x both causal modes
    for r in rows:
        assert "error" not in r, r
        assert 0.0 < r["density"] <= 1.0 and 0.0 < r["density_16"] <= 1.0
        assert r["fwd_err"] <= tolerance(torch.float32)
        assert r["grad_err"] <= tolerance(torch.float32, grad=True)
        assert r["err_ok"] is True
        assert all(r[f"{w}_{p}_ms"] > 0 for w in ("ours", "sdpa") for p in ("fwd", "fwdbwd"))
    for causal in (False, True):
        local = {r["s"]: r for r in rows if r["family"] == "local" and r["causal"] == causal}
        assert local[16.0]["density_16"] < local[1.0]["density_16"]  # larger logits: sparser mask
    assert set(report["crossover"]) == {"causal", "non-causal"}
    assert set(report["crossover"]["causal"]) == {"pooled", "local", "randn"}


def test_captured_family_reads_a_capture_and_sharpens_it(bench, tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen) for _ in range(3))
    path = tmp_path / "layer01.safetensors"
    save_file({"q": q, "k": k, "v": v}, str(path), metadata={"layer": "1"})
    args = bench._parse(["--cpu-smoke", "--families", f"captured:{path},local", "--seq-len", "32"])
    assert args.scale_map[f"captured:{path}"] == (1.0,) and args.scale_map["local"] == (1.0, 16.0)
    q2, k2, v2, g = bench.make_inputs(f"captured:{path}", 3.0, (2, 4, 32, 16), torch.float32, "cpu", 0, 1.0)
    assert q2.shape == (2, 4, 32, 16) and torch.equal(q2[1, 2:], 3.0 * q[0]) and torch.equal(v2[0, :2], v[0])
    with pytest.raises(SystemExit):
        bench._parse(["--families", f"captured:{tmp_path / 'missing.safetensors'}"])
    with pytest.raises(ValueError, match="N x D"):
        bench.make_inputs(f"captured:{path}", 1.0, (1, 2, 64, 16), torch.float32, "cpu", 0, 1.0)
