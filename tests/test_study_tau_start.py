"""benchmarks/study_tau_start.py: the replayed tau iteration is the kernel's, and the script runs.

The study's conclusions rest on its replay of the kernel's loop, so the pieces are checked against
the exact threshold (a bisection to machine precision here, independent of the study's code)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "study_tau_start.py"


def _study():
    return load_script("benchmarks/study_tau_start.py")


def _bisect_tau(z: torch.Tensor, b: float) -> torch.Tensor:
    """sum [z - tau]_+^b = 1 by bisection on [max - 1, max], float64."""
    lo, hi = z.max(-1).values - 1.0, z.max(-1).values
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = (z - mid[:, None]).clamp(min=0).pow(b).sum(-1) > 1.0
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def test_replayed_iteration_converges_to_the_threshold():
    study = _study()
    gen = torch.Generator().manual_seed(0)
    z = 0.5 * torch.randn(6, 640, generator=gen, dtype=torch.float64)
    for b in (1.0, 2.0, 3.0):
        exact = _bisect_tau(z, b)
        zmax = z.max(-1).values
        for name, start in study.starts(z, b).items():
            tau0, lo, hi = start()
            count, tau = study.sweeps(z, tau0, lo, hi, zmax, b, 0.0, 60)
            assert torch.allclose(tau, exact, atol=1e-9), (b, name)
            assert (count >= 1).all()
        # the subset of every score is the row itself: its threshold is exact
        whole = study.subset_tau(z, zmax, b, iters=60)
        assert torch.allclose(whole, exact, atol=1e-9)
        # a start at the root stops after the one sweep that confirms it
        count, _ = study.sweeps(z, exact, zmax - 1.0, zmax, zmax, b, 1e-6, 8)
        assert (count == 1).all()


def test_moment_bounds_bracket_the_threshold():
    """b = 2: the superset's larger root is an upper bound (or +inf); b = 1: its root a lower bound."""
    study = _study()
    gen = torch.Generator().manual_seed(1)
    z = 0.4 * torch.randn(8, 512, generator=gen, dtype=torch.float64)
    counts = study.running_moments(z)
    assert torch.all(study.moments_tau(*counts, 2.0) >= _bisect_tau(z, 2.0) - 1e-12)
    assert torch.all(study.moments_tau(*counts, 1.0) <= _bisect_tau(z, 1.0) + 1e-12)


def test_script_writes_its_report(tmp_path):
    out = tmp_path / "study.json"
    subprocess.run([sys.executable, str(SCRIPT), "--seq-len", "256", "--blocks", "1", "--families", "randn:1,local:2",
                    "--alphas", "1.5", "--out", str(out)], check=True, cwd=REPO, timeout=300)
    report = json.loads(out.read_text())
    assert [case["inputs"] for case in report["cases"]] == ["randn:1", "local:2"]
    for case in report["cases"]:
        assert set(case["starts"]) >= {"subset8", "subset16", "moments"}
        for row in case["starts"].values():
            assert 1 <= row["sweeps_mean"] <= row["block_sweeps_mean"] <= 8
            assert math.isfinite(row["final_error_rel_max"])
