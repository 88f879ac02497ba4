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
         "--cases", "3x100", "--alpha", "4/3", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3x100 | 1.333 |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["environment"]["interpreter"] is True
    assert {"launcher_us", "api_us", "softmax_us"} <= set(report["host"])
    (case,) = report["results"]
    assert (case["rows"], case["cols"], case["alpha"], case["dtype"]) == (3, 100, 4 / 3, "bfloat16")
    assert case["floor"]["bytes"] == 2 * 3 * 100 * 2 and case["floor"]["ms"] > 0 and case["softmax"]["ms"] > 0
    tol = case["tolerance"]
    default = case["default"]
    assert default["ok"] and default["err"] <= tol and default["config"]["niter"] == 10
    assert 1 <= default["sweeps_mean"] <= default["sweeps_max"] <= 10
    by_knob = {row["knob"]: row for row in case["sweep"]}
    assert set(by_knob) == {"init", "tol", "niter", "chunks", "launch"}
    assert all(row["err"] is not None and row["ms"] > 0 for row in case["sweep"])
    assert by_knob["niter"]["changed"] == {"niter": 1} and by_knob["niter"]["sweeps_max"] == 1
    assert by_knob["init"]["config"]["init"] == "bracket" and by_knob["init"]["sweeps_max"] >= 1
    assert by_knob["launch"]["config"]["rows"] == 2 and by_knob["launch"]["sweeps_max"] >= 1
    assert case["best_gated"]["err"] <= tol
    assert "skipped" in case["upstream"]
