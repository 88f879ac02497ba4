"""How many full-row Halley steps the one-tile entmax kernel needs after each candidate start (a CPU
study, float64).

A row that fits one tile (kernels/entmax.py, ``SINGLE``) finds its max and the maxima of strided
column chunks in registers, solves the threshold of a subset of those maxima with a few Halley
steps from max - 1 (each a cross-warp reduction on the GPU), then runs full-row Halley steps until
one moves tau by at most ``tau_tol`` of the support width. This study replays that iteration on
sampled rows (the kernel's safeguarded step and stopping rule, from
``benchmarks/study_tau_start.py``; sums in float64) to compare starts before timing them:

* ``chunks`` maxima of strided column chunks (chunk c: the columns = c mod ``chunks``), optionally
  merged ``group`` consecutive chunks at a time (the chunks one thread holds: one maximum per
  thread), then ``iters`` Halley steps on them.

The kernel before 2026-12-03 used 2048 maxima (8 warps, rows of 8192) and 4 steps; now one maximum
per thread (256) and 3 steps.

    python benchmarks/study_entmax_start.py --out benchmarks/results/cpu-entmax-start.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

import study_tau_start  # next to this script: its replay of the kernel's safeguarded Halley loop

log = logging.getLogger("study_entmax_start")

NITER = 10  # the kernel's default cap on full-row steps


def chunk_maxima(z: torch.Tensor, chunks: int, group: int = 1) -> torch.Tensor:
    """[rows, chunks // group] maxima of the strided chunks of ``z`` [rows, cols] (the tile padded
    with -inf to a multiple of ``chunks``), ``group`` consecutive chunks merged."""
    rows, cols = z.shape
    tile = -(-cols // chunks) * chunks
    padded = torch.full((rows, tile), float("-inf"), dtype=z.dtype)
    padded[:, :cols] = z
    c = padded.view(rows, tile // chunks, chunks).amax(dim=1)
    return c.view(rows, chunks // group, group).amax(dim=2) if group > 1 else c


def full_steps(z: torch.Tensor, alpha: float, chunks: int, group: int, iters: int, tol: float) -> torch.Tensor:
    """Full-row steps per row (z shifted so that its max is 0) after the start of ``iters`` Halley
    steps on the (grouped) chunk maxima, clamped into the bracket."""
    sts = study_tau_start
    b = 1.0 / (alpha - 1.0)
    zmax = torch.zeros(z.shape[0], dtype=z.dtype)
    lo = zmax - 1.0
    hi = zmax - float(z.shape[1]) ** (1.0 - alpha)
    tau0 = sts.subset_tau(chunk_maxima(z, chunks, group), zmax, b, iters)
    tau0 = torch.minimum(torch.maximum(tau0, lo), hi)
    count, _ = sts.sweeps(z, tau0, lo.clone(), hi.clone(), zmax, b, tol, NITER)
    return count


def rows_of(n_rows: int, cols: int, scale: float, alpha: float, seed: int) -> torch.Tensor:
    """bf16 randn rows (times ``scale``) as the kernel sees them: z = (alpha - 1) x - max, float64."""
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n_rows, cols, generator=gen)).to(torch.bfloat16).to(torch.float64)
    z = (alpha - 1.0) * x
    return z - z.amax(dim=1, keepdim=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--warps", type=int, default=8, help="num_warps of the launch (the default config's)")
    p.add_argument("--alphas", default="1.5,2,1.3")
    p.add_argument("--scales", default="1,0.25,4")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from adasplash_tune.kernels.declarations.entmax import TRITON
    from adasplash_tune.kernels.entmax import launch_params, resolve_tol

    lp = launch_params(TRITON.default().replace(num_warps=args.warps), args.cols)  # the kernel's chunking
    chunks, group = lp.chunks, lp.group
    starts = [(chunks, 1, it) for it in (1, 2, 3, 4)] + [(chunks, group, it) for it in (1, 2, 3, 4)]
    results = []
    t0 = time.perf_counter()
    for alpha in (float(a) for a in args.alphas.split(",")):
        tol = resolve_tol("auto", torch.bfloat16, alpha)
        for scale in (float(s) for s in args.scales.split(",")):
            z = rows_of(args.rows, args.cols, scale, alpha, seed=len(results))
            row = {"alpha": alpha, "scale": scale, "tol": tol, "full_steps": {}}
            for c, g, it in starts:
                key = f"{c // g} maxima, {it} steps"
                row["full_steps"][key] = round(full_steps(z, alpha, c, g, it, tol).mean().item(), 3)
            results.append(row)
            log.info("alpha %s scale %s: %s", alpha, scale,
                     ", ".join(f"{k}: {v}" for k, v in row["full_steps"].items()))
    report = {"study": "full-row Halley steps of the one-tile entmax after each start (float64 replay)",
              "rows": args.rows, "cols": args.cols, "warps": args.warps, "chunks": chunks, "group": group,
              "niter": NITER, "seconds": round(time.perf_counter() - t0, 1), "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
