"""benchmarks/study_tau_refine.py: the quadratic step and the moment-corrected forward it studies
are right where they must be exact, and the script runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "study_tau_refine.py"


def _module():
    return load_script("benchmarks/study_tau_refine.py")


def _exact(study, z, b):
    return study.sweeps(z, *study.starts(z, b)["subset8"](), z.max(-1).values, b, 0.0, 80)[1]


def test_quadratic_step_converges_to_the_threshold():
    mod = _module()
    study = mod._study_start()
    gen = torch.Generator().manual_seed(0)
    z = 0.5 * torch.randn(5, 640, generator=gen, dtype=torch.float64)
    exact, zmax = _exact(study, z, 2.0), z.max(-1).values
    tau0, lo, hi = study.starts(z, 2.0)["subset8"]()
    count, tau = study.sweeps(z, tau0, lo, hi, zmax, 2.0, 0.0, 60, mod.quad_step)
    assert torch.allclose(tau, exact, atol=1e-9) and (count >= 1).all()


def test_moment_forward_is_exact_when_no_key_leaves_the_support():
    """From tau0 = tau - eps with no score in (tau0, tau], the corrected output is entmax's; from
    tau0 = tau the step is zero."""
    mod = _module()
    study = mod._study_start()
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(320, 8, generator=gen, dtype=torch.float64)
    for b in (1.0, 2.0):
        z = 0.3 * torch.randn(4, 320, generator=gen, dtype=torch.float64)
        exact = _exact(study, z, b)
        ref = mod.entmax_out(z, exact, b, v)
        out, d = mod.moment_forward(z, exact, b, v)
        assert torch.allclose(out, ref, atol=1e-10) and torch.allclose(d, torch.zeros_like(d), atol=1e-10)
        # the largest score off the support
        below = torch.where(z <= exact[:, None], z, torch.full_like(z, -1e9)).max(-1).values
        tau0 = 0.5 * (exact + below)
        out, d = mod.moment_forward(z, tau0, b, v)
        assert torch.allclose(tau0 + d, exact, atol=1e-10)
        assert torch.allclose(out, ref, atol=1e-10)


def test_script_runs(tmp_path):
    out = tmp_path / "refine.json"
    subprocess.run([sys.executable, str(SCRIPT), "--seq-len", "256", "--blocks", "1", "--families", "randn:1",
                    "--out", str(out)], check=True, cwd=REPO, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    (a15, a2) = report["cases"]
    assert {a15["alpha"], a2["alpha"]} == {1.5, 2.0}
    assert set(a15["starts"]["subset8"]) == {"halley", "quad", "moments"}
    assert set(a2["starts"]["subset16"]) == {"halley", "moments"}
    assert a15["starts"]["subset8"]["moments"]["out_error_max"] >= 0.0
