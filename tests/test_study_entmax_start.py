"""benchmarks/study_entmax_start.py: its chunk maxima are the kernel's, and the script runs."""

from __future__ import annotations

import json

import torch

from tests.scripts import load_script


def _study():
    return load_script("benchmarks/study_entmax_start.py", siblings=True)


def test_chunk_maxima_are_strided_and_grouped_like_the_kernel():
    study = _study()
    z = torch.randn(3, 50, dtype=torch.float64)
    c = study.chunk_maxima(z, 8)
    for k in range(8):  # chunk k: the columns congruent to k mod 8 (the tile padded to 56)
        assert torch.equal(c[:, k], z[:, k::8].amax(dim=1))
    g = study.chunk_maxima(z, 8, group=4)
    assert g.shape == (3, 2) and torch.equal(g[:, 1], c[:, 4:].amax(dim=1))


def test_a_start_at_the_root_needs_one_step_and_a_far_one_more():
    study = _study()
    z = torch.full((2, 64), -5.0, dtype=torch.float64)
    z[:, 0] = 0.0  # alpha = 1.5: tau = -1 exactly (one score in the support), a max in the subset
    steps = study.full_steps(z, 1.5, chunks=8, group=1, iters=4, tol=0.1)
    assert steps.tolist() == [1.0, 1.0]
    flat = 0.01 * torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flat = flat - flat.amax(dim=1, keepdim=True)
    assert (study.full_steps(flat, 1.5, chunks=8, group=8, iters=1, tol=0.01) > 1).all()


def test_study_runs_and_reports_every_start(tmp_path):
    out = tmp_path / "s.json"
    assert _study().main(["--rows", "4", "--cols", "300", "--warps", "1", "--alphas", "1.5,2",
                          "--scales", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["chunks"] == 256 and report["group"] == 8
    assert len(report["results"]) == 2 and all(len(r["full_steps"]) == 8 for r in report["results"])
    assert all(v >= 1.0 for r in report["results"] for v in r["full_steps"].values())
