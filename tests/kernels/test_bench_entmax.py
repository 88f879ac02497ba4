"""benchmarks/bench_entmax.py runs end to end (``--cpu-smoke``: CPU tensors, Triton interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_entmax_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_entmax.py"), "--cpu-smoke",
         "--cases", "3x100", "--alpha", "2.0", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3x100 | 2 |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["environment"]["interpreter"] is True
    (case,) = report["results"]
    assert (case["rows"], case["cols"], case["alpha"], case["dtype"]) == (3, 100, 2.0, "bfloat16")
    tol = case["tolerance"]
    assert case["ours_default"]["ok"] and case["ours_default"]["err"] <= tol
    assert case["ours_default"]["config"]["niter"] == 10
    assert len(case["sweep"]) == 2 and all(r["err"] <= tol for r in case["sweep"])
    # the accuracy knobs, one at a time on the best launch config (their defaults left out)
    swept = {(r["knob"], r["value"]) for r in case["knob_sweep"]}
    assert swept == {("niter", 2), ("tau_tol", 0.1), ("tau_tol", 0.0), ("tau_init", "lo")}
    for r in case["knob_sweep"]:
        assert r["config"][r["knob"]] == r["value"] and r["err"] <= tol
    assert case["ours_best_gated"]["err"] <= tol
    assert case["softmax"]["ms"] > 0 and case["floor"]["ms"] > 0 and case["ours_best"]["ms"] > 0
    assert "tau_tol=0.0 tau_init=subset" in proc.stdout  # the per-config listing
    assert "skipped" in case["upstream"]
