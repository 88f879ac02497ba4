"""benchmarks/bench_sparsity.py: its crossover arithmetic, input families, --v2 points, --budget stop and an
end-to-end ``--cpu-smoke`` run (CPU tensors, Triton interpreter) checked against the fp64 oracle; and
benchmarks/plot_sparsity.py on a small synthetic result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adasplash_tune.kernels.reference import tolerance
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_sparsity.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_sparsity.py")


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
    """Causal smoke run: every method's rows, both densities, errors, v2 asked for but skipped with a note."""
    out = tmp_path / "sparsity.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--causal", "--v2", "randn:1",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "crossover density" in proc.stdout and "ours-default" in proc.stdout
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["interpreter"] is True and meta["device"] == "cpu"
    assert meta["shape"] == [1, 2, 128, 16] and meta["dtype"] == "float32"
    assert meta["torch"] == torch.__version__ and meta["triton"] and meta["date"]
    assert set(meta["selection"]) == {"causal"} and meta["v2_points"] == [["randn", 1.0]]
    assert report["skipped"] == [] and report["stopped"] is None
    points = report["points"]
    assert [(p["family"], p["s"]) for p in points] == [("local", 1.0), ("local", 16.0), ("randn", 1.0)]
    for p in points:
        assert "error" not in p and p["err_ok"] is True and p["causal"] is True
        assert 0.0 < p["density_16"] <= 1.0 and 0.0 < p["density_64"] <= 1.0
    assert points[1]["density_16"] < points[0]["density_16"]  # larger logits: sparser mask
    assert "notes" not in points[0]  # v2 asked for at randn:1 only, where the CPU run cannot have it
    assert len(points[2]["notes"]) == 1 and points[2]["notes"][0].startswith("upstream-v2 skipped: ")
    rows = report["rows"]
    assert len(rows) == 3 * 3 * 2  # points x (ours-selected, ours-default, sdpa) x (fwd, fwd+bwd)
    keys = {"family", "s", "shape", "causal", "density_16", "density_64", "method", "pass", "time_ms", "ratio_sdpa"}
    for r in rows:
        assert keys <= set(r), r
        assert r["method"] in ("ours-selected", "ours-default", "sdpa") and r["pass"] in ("fwd", "fwd+bwd")
        assert r["shape"] == [1, 2, 128, 16] and r["time_ms"] > 0
        sdpa = next(x for x in rows if (x["family"], x["s"], x["pass"], x["method"]) ==
                    (r["family"], r["s"], r["pass"], "sdpa"))
        assert r["ratio_sdpa"] == pytest.approx(r["time_ms"] / sdpa["time_ms"], rel=1e-2)
        if r["method"] != "sdpa":
            assert r["err"] <= tolerance(torch.float32, grad=r["pass"] == "fwd+bwd")
    assert set(report["crossover"]) == {"causal"}
    assert set(report["crossover"]["causal"]) == {"pooled", "local", "randn"}
    assert set(report["crossover"]["causal"]["local"]) == {"ours-selected", "ours-default"}
    assert set(report["crossover"]["causal"]["local"]["ours-selected"]) == {"fwd@16", "fwd@64", "fwd+bwd@16",
                                                                            "fwd+bwd@64"}


def test_v2_points(bench):
    scales = {"local": (1.0, 2.0, 3.0), "randn": (1.0, 8.0), "captured:/x/a.safetensors": (1.0, 2.0)}
    assert bench.v2_points("", scales) == set()
    assert bench.v2_points("randn:1, local", scales) == {("randn", 1.0), ("local", 1.0), ("local", 2.0),
                                                          ("local", 3.0)}
    assert bench.v2_points("captured:/x/a.safetensors:2", scales) == {("captured:/x/a.safetensors", 2.0)}
    assert bench.v2_points("captured:/x/a.safetensors", scales) == {("captured:/x/a.safetensors", 1.0),
                                                                     ("captured:/x/a.safetensors", 2.0)}
    assert len(bench.v2_points("all", scales)) == 7
    with pytest.raises(ValueError, match="not in --families"):
        bench.v2_points("sink", scales)
    with pytest.raises(ValueError, match="not among"):
        bench.v2_points("randn:4", scales)
    with pytest.raises(SystemExit):
        bench._parse(["--cpu-smoke", "--v2", "local:3"])  # smoke scales of local: 1, 16


def test_upstream_v2_skipped_with_a_reason(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "adasplash", None)  # the upstream package absent: import raises
    fn, why = bench.upstream_v2(1.5, True, "cuda")
    assert fn is None and "not importable" in why
    assert bench.upstream_v2(1.5, False, "cuda") == (None, "upstream v2 is causal only")
    fn, why = bench.upstream_v2(1.25, True, "cuda")
    assert fn is None and "alpha = 1.5 only" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the Triton interpreter")
def test_point_with_a_stand_in_v2(bench):
    """The v2 path of one point: first call untimed, both passes timed and checked; a failing v2 is a note."""
    import adasplash_tune

    args = bench._parse(["--cpu-smoke", "--causal", "--families", "randn", "--v2", "randn", "--seq-len", "64"])
    ctx = bench._Ctx(args, "cpu")
    ctx.v2_calls[True] = (lambda q, k, v: adasplash_tune.adasplash(q, k, v, 1.5, True, backend="torch"), "stand-in")
    point, rows = bench._point(ctx, "randn", 1.0, True, True)
    v2 = {r["pass"]: r for r in rows if r["method"] == "upstream-v2"}
    assert set(v2) == {"fwd", "fwd+bwd"} and point["v2_first_call_s"] >= 0 and "notes" not in point
    assert v2["fwd"]["err"] <= tolerance(torch.float32) and v2["fwd+bwd"]["err"] <= tolerance(torch.float32, grad=True)
    assert [r["method"] for r in rows[::2]] == ["ours-selected", "ours-default", "upstream-v2", "sdpa"]

    def broken(q, k, v):
        raise RuntimeError("no kernel for this GPU")

    ctx.v2_calls[True] = (broken, "broken")
    point, rows = bench._point(ctx, "randn", 1.0, True, True)
    assert point["notes"] == ["upstream-v2 failed: RuntimeError: no kernel for this GPU"] and point["err_ok"]
    assert {r["method"] for r in rows} == {"ours-selected", "ours-default", "sdpa"}


@pytest.mark.parametrize("stop", ["budget", "interrupt"])
def test_budget_stop_writes_what_finished(bench, monkeypatch, tmp_path, stop):
    """Past --budget (or on Ctrl-C) no point starts; the JSON keeps the finished ones and lists the rest."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def fake_point(ctx, family, s, causal, with_v2):
        calls.append((family, s, causal))
        if stop == "interrupt" and len(calls) == 2:
            raise KeyboardInterrupt
        ctx.start -= 10.0  # each point "takes" 10 s
        point = {"family": family, "s": s, "shape": list(ctx.shape), "causal": causal,
                 "density_16": 0.5, "density_64": 0.8, "err_ok": True}
        rows = [{"family": family, "s": s, "shape": list(ctx.shape), "causal": causal, "density_16": 0.5,
                 "density_64": 0.8, "method": m, "pass": p, "time_ms": t, "ratio_sdpa": t / 2.0}
                for m, t in (("ours-selected", 3.0), ("sdpa", 2.0)) for p in ("fwd", "fwd+bwd")]
        return point, rows

    monkeypatch.setattr(bench, "_point", fake_point)
    out = tmp_path / "sp.json"
    assert bench.main(["--cpu-smoke", "--budget", "15", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(calls) == 2  # 0 s and 10 s < 15 s; at 20 s the budget is spent (interrupt: the 2nd raised)
    finished = 2 if stop == "budget" else 1
    assert len(report["points"]) == finished and len(report["rows"]) == 4 * finished
    assert len(report["skipped"]) == 6 - finished  # smoke plan: (local 1, 16; randn 1) x both modes
    assert report["stopped"].startswith("time budget (15 s) spent" if stop == "budget" else "interrupted")
    assert report["meta"]["budget_s"] == 15.0


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


def _synthetic_result(path: Path) -> None:
    rows = []
    for family, s, d16, d64 in (("local", 2.0, 0.3, 0.5), ("local", 8.0, 0.04, 0.06), ("randn", 1.0, 0.9, 1.0)):
        for pas, sdpa in (("fwd", 1.2), ("fwd+bwd", 4.2)):
            for method, factor in (("ours-selected", 1.5), ("ours-default", 1.7), ("upstream-v2", 0.8), ("sdpa", 1.0)):
                if method == "upstream-v2" and family != "randn":
                    continue
                t = sdpa * factor * (d16 + 0.5)
                rows.append({"family": family, "s": s, "shape": [1, 16, 16384, 64], "causal": True,
                             "density_16": d16, "density_64": d64, "method": method, "pass": pas,
                             "time_ms": t, "ratio_sdpa": t / (sdpa * (d16 + 0.5)) if method != "sdpa" else 1.0})
    path.write_text(json.dumps({"meta": {"device_name": "test", "dtype": "bfloat16", "alpha": 1.5}, "rows": rows}))


@pytest.fixture(scope="module")
def plotter():
    return load_script("benchmarks/plot_sparsity.py")


@pytest.mark.parametrize("tile", ["16", "64"])
def test_plot_sparsity(plotter, tmp_path, capsys, tile):
    pytest.importorskip("matplotlib")
    src, png = tmp_path / "sp.json", tmp_path / "sp.png"
    _synthetic_result(src)
    assert plotter.main([str(src), str(src), "--tile", tile, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "upstream-v2" in table and "ours-default" in table and "f+b/sdpa" in table
    assert plotter.main([str(src)]) == 0 and src.with_suffix(".png").is_file()  # default: beside the JSON


def test_plot_sparsity_rejects_other_json(plotter, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [{"family": "local", "s": 1.0, "ours_fwd_ms": 1.0}]}))
    assert plotter.main([str(old), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
