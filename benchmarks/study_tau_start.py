"""How many Halley sweeps the tau solve needs from each candidate start (a CPU study, float64).

The tau kernel makes one dense pass (row max, the eight largest 64-key tile maxima), starts Halley
from the threshold of those eight values (a certified lower bound, ``tau_init="subset"``) and
sweeps the row's active tiles until a step is at most ``tol`` of the support width. On ``randn``
that is two sweeps after the dense pass: each costs about as much as SDPA's whole forward
(issue 12). This study replays that iteration exactly on sampled rows (same bracket, same
safeguarded Halley step, same stopping rule; sums in float64) from several starts the dense pass
could compute, to see which would save a sweep before any kernel is written:

* ``subset8`` (today), ``subset16``, ``subset32``: the threshold of the top K tile maxima;
* ``moments``: the pass also accumulates count, sum z and sum z^2 of the scores above the running
  max - 1 (a superset of the support, since tau >= max - 1): for b = 2 (alpha = 1.5) the larger
  root of sum_S (z - tau)^2 = 1 is an upper bound of tau, for b = 1 (alpha = 2) the root of
  sum_S (z - tau) = 1 a lower bound; start there (the bracket shrinks accordingly);
* ``moments+subset``: start at the mean of the subset bound and the moments bound;
* ``bracket``: the moments of the final bracket [max - 1, max] (needs max first: a second
  dense pass; the ideal of the moments idea).

    python benchmarks/study_tau_start.py --out benchmarks/results/cpu-tau-start.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Callable

import torch

from adasplash_tune.tuner.inputs import synthetic_inputs

log = logging.getLogger("study_tau_start")

TILE = 64  # tau_block_n: the dense pass's key tile
BLOCK = 64  # tau_block_m: rows that sweep together until the last of them converges


def powers(u: torch.Tensor, b: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum u^b, sum u^(b-1), sum u^(b-2)) over the positive part, per row."""
    pos = u > 0
    up = torch.where(pos, u, torch.ones_like(u))
    s0 = torch.where(pos, up ** b, 0).sum(-1)
    s1 = torch.where(pos, up ** (b - 1), 0).sum(-1)
    s2 = torch.where(pos, up ** (b - 2), 0).sum(-1) if b != 1 else torch.zeros_like(s0)
    return s0, s1, s2


def halley(tau, lo, hi, s0, s1, s2, b):
    """The kernel's safeguarded Halley step (kernels/threshold.py halley_step)."""
    f, df = s0 - 1.0, -b * s1
    d2f = b * (b - 1.0) * s2
    above = f > 0
    lo, hi = torch.where(above, tau, lo), torch.where(above, hi, tau)
    den = 2.0 * df * df - f * d2f
    ok = den != 0
    cand = tau - torch.where(ok, 2.0 * f * df / torch.where(ok, den, torch.ones_like(den)), 0)
    inside = ok & (cand >= lo) & (cand <= hi)
    new = torch.where(f == 0, tau, torch.where(inside, cand, 0.5 * (lo + hi)))
    return new, lo, hi


def sweeps(z: torch.Tensor, tau0, lo, hi, zmax, b: float, tol: float, niter: int,
           update: Callable = halley) -> tuple[torch.Tensor, torch.Tensor]:
    """(sweeps run per row, final tau) of the kernel's loop from ``tau0``; ``update``: the step
    from one sweep's sums (the kernel's safeguarded Halley step unless given)."""
    tau, count = tau0.clone(), torch.zeros_like(tau0)
    active = torch.ones_like(tau0, dtype=torch.bool)
    for it in range(niter):
        s0, s1, s2 = powers(z - tau[:, None], b)
        new, lo, hi = update(tau, lo, hi, s0, s1, s2, b)
        step = (new - tau).abs() / (zmax - new).clamp(min=1e-6)
        count += active.double()
        tau = torch.where(active, new, tau)
        active = active & (step > tol)
        if not active.any():
            break
    return count, tau


def subset_tau(vals: torch.Tensor, zmax, b: float, iters: int = 8) -> torch.Tensor:
    lo, hi, tau = zmax - 1.0, zmax.clone(), zmax - 1.0
    for _ in range(iters):
        s0, s1, s2 = powers(vals - tau[:, None], b)
        tau, lo, hi = halley(tau, lo, hi, s0, s1, s2, b)
    return tau


def running_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """count, sum z, sum z^2 of the scores above (running max - 1), tiles visited in order."""
    rows, n = z.shape
    m = torch.full((rows,), -math.inf, dtype=z.dtype)
    c = torch.zeros(rows, dtype=z.dtype)
    s1, s2 = torch.zeros_like(c), torch.zeros_like(c)
    for j0 in range(0, n, TILE):
        t = z[:, j0:j0 + TILE]
        m = torch.maximum(m, t.max(-1).values)
        keep = t > (m - 1.0)[:, None]
        c += keep.sum(-1)
        s1 += torch.where(keep, t, 0).sum(-1)
        s2 += torch.where(keep, t * t, 0).sum(-1)
    return c, s1, s2


def moments_tau(c, s1, s2, b: float) -> torch.Tensor:
    """The superset's root: b = 2: the larger root of c t^2 - 2 s1 t + s2 - 1 = 0 (an upper bound of
    tau; +inf, no information, when the superset's spread alone exceeds 1 and there is no root);
    b = 1: (s1 - 1) / c (a lower bound)."""
    if b == 1:
        return (s1 - 1.0) / c
    disc = s1 * s1 - c * (s2 - 1.0)
    return torch.where(disc >= 0, (s1 + disc.clamp(min=0).sqrt()) / c, torch.full_like(c, math.inf))


def starts(z: torch.Tensor, b: float) -> dict[str, Callable[[], tuple]]:
    n = z.shape[1]
    zmax = z.max(-1).values
    lo0 = zmax - 1.0
    hi0 = zmax - n ** (-1.0 / b)  # zmax - n^(1 - alpha)
    tiles = z.view(z.shape[0], -1, TILE).max(-1).values

    def clamp(t, lo, hi):
        return torch.minimum(torch.maximum(t, lo), hi)

    def subset(k: int):
        top = tiles.topk(min(k, tiles.shape[1]), dim=-1).values
        return lambda: (clamp(subset_tau(top, zmax, b), lo0, hi0), lo0.clone(), hi0.clone())

    def moments():
        t = moments_tau(*running_moments(z), b)
        lo, hi = (lo0.clone(), torch.minimum(hi0, t)) if b == 2 else (torch.maximum(lo0, t), hi0.clone())
        return clamp(t, lo, hi), lo, hi

    def mixed():
        sub = clamp(subset(8)()[0], lo0, hi0)
        start, lo, hi = moments()
        if b == 2:
            lo = torch.maximum(lo, sub)
        return clamp(0.5 * (sub + start), lo, hi), lo, hi

    def bracket():
        keep = z > lo0[:, None]
        c, s1, s2 = keep.sum(-1).double(), torch.where(keep, z, 0).sum(-1), torch.where(keep, z * z, 0).sum(-1)
        t = moments_tau(c, s1, s2, b)
        return clamp(t, lo0, hi0), lo0.clone(), hi0.clone()

    found = {"subset8": subset(8), "subset16": subset(16), "subset32": subset(32)}
    if b in (1.0, 2.0):  # closed-form moment roots
        found.update({"moments": moments, "moments+subset": mixed, "bracket": bracket})
    return found


def rows_of(family: str, scale: float, n: int, blocks: int, d: int, alpha: float, seed: int) -> torch.Tensor:
    """z = (alpha - 1) q.k / sqrt(d) for ``blocks`` blocks of BLOCK consecutive query rows (the
    rows one tau program solves together; full rows: non-causal) in float64."""
    gen = torch.Generator().manual_seed(seed)
    heads = 2
    q, k = synthetic_inputs(family, scale, (1, heads, n, d), heads, gen, "cpu")
    starts = torch.randperm(n // BLOCK, generator=gen)[:blocks] * BLOCK
    z = torch.cat([q[0, i % heads, s:s + BLOCK].double() @ k[0, i % heads].double().T
                   for i, s in enumerate(starts.tolist())])
    return (alpha - 1.0) / math.sqrt(d) * z


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--blocks", type=int, default=4, help="row blocks of 64 per case")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--families", default="randn:1,randn:4,randn:16,local:2")
    p.add_argument("--alphas", default="1.5,2,1.3333333333333333")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = {"seq_len": args.seq_len, "blocks": args.blocks, "block_rows": BLOCK, "head_dim": args.head_dim, "tile": TILE,
              "tol": {"1.5": 0.1, "other": 0.03}, "niter": 8, "date": time.strftime("%Y-%m-%d"), "cases": []}
    for alpha in (float(a) for a in args.alphas.split(",")):
        b = 1.0 / (alpha - 1.0)
        tol = 0.1 if alpha == 1.5 else 0.03  # tau_tol="auto" for 16-bit inputs
        b = round(b, 9)
        for spec in args.families.split(","):
            family, _, scale = spec.partition(":")
            z = rows_of(family, float(scale or 1), args.seq_len, args.blocks, args.head_dim, alpha, seed=7)
            exact = sweeps(z, *starts(z, b)["subset8"](), z.max(-1).values, b, 0.0, 60)[1]
            width = (z.max(-1).values - exact).clamp(min=1e-12)
            case = {"alpha": alpha, "inputs": spec, "support_mean": float((z > exact[:, None]).sum(-1).double().mean()),
                    "starts": {}}
            for name, start in starts(z, b).items():
                tau0, lo, hi = start()
                count, tau = sweeps(z, tau0, lo, hi, z.max(-1).values, b, tol, 8)
                case["starts"][name] = {
                    "sweeps_mean": float(count.mean()), "sweeps_max": float(count.max()),
                    "block_sweeps_mean": float(count.view(-1, BLOCK).max(-1).values.mean()),
                    "start_error_rel": float(((tau0 - exact).abs() / width).median()),
                    "final_error_rel_max": float(((tau - exact).abs() / width).max()),
                }
            report["cases"].append(case)
            log.info("alpha %.2f %-9s support %7.1f  %s", alpha, spec, case["support_mean"],
                     "  ".join(f"{k} {v['block_sweeps_mean']:.2f}/{v['sweeps_mean']:.2f} ({v['start_error_rel']:.2g})"
                               for k, v in case["starts"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
