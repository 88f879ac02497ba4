"""benchmarks/bench_stages.py runs end to end on CPU (Triton interpreter, tiny shapes), for both
backward modes, and every stage it times comes from ``stage_calls``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_stages_cpu_smoke(tmp_path):
    out = tmp_path / "stages.json"
    variants = json.dumps({"fused_bwd": {"bwd_mode": "fused"}})
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_stages.py"), "--cpu-smoke",
                           "--problems", "1,2,80,16,full", "--families", "randn:1", "--variants", variants,
                           "--out", str(out)],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [row] = json.loads(out.read_text())["rows"]
    split, fused = row["variants"]["default"], row["variants"]["fused_bwd"]
    for res in (split, fused):
        assert "error" not in res
        for key in ("tau_ms", "lists_fwd_ms", "fwd_ms", "lists_bwd_ms", "bwd_kv_ms", "ours_fwdbwd_ms"):
            assert res[key] > 0, key
        assert res["fwd_err"] < 1e-4 and res["grad_err"] < 1e-4  # fp32 against the fp64 oracle
    assert split["bwd_q_ms"] > 0 and "fwd_train_ms" not in split
    assert fused["bwd_q_ms"] == 0.0 and fused["fwd_train_ms"] > 0  # dQ inside the fused kernel
