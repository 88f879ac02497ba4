"""benchmarks/bench_dense_pass.py: the probe runs the tau kernel's own dense pass, and it is right.

The CPU smoke run goes through the Triton interpreter at tiny shapes; every variant's row max must
match torch's (the script exits non-zero otherwise), and every variant is reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_dense_pass.py"


def test_cpu_smoke_reports_every_variant_with_the_right_row_max(tmp_path):
    out = tmp_path / "dense.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    variants = {(r["tau_block_m"], r["tau_block_n"], r["topk"], r["codes"], r["mask_m"]) for r in rows}
    assert variants == {(16, 16, 8, True, 16), (16, 16, 16, False, 16), (32, 16, 0, True, 16)}
    assert len(rows) == 6 and {tuple(r["shape"]) for r in rows} == {(1, 2, 40, 16), (1, 1, 33, 16)}
    assert all(r["row_max_err"] <= 1e-5 and r["ms"] > 0 and r["sdpa_fwd_ms"] > 0 for r in rows)
    assert data["meta"]["interpreter"] is True


def test_a_wrong_variant_is_refused(tmp_path):
    """A variant the probe cannot run is an error, not a silent row."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--variants", "[[16, 16, 2, 1, 8]]"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "each variant is" in proc.stderr
