"""Two ways to spend fewer dense sweeps on tau, replayed on the CPU in float64 (issue 12).

The tau kernel starts Halley from the threshold of the dense pass's top tile maxima and sweeps
until a step is at most ``tol`` of the support width; on ``randn`` that is about two dense sweeps
before the forward, each costing about SDPA's whole forward. This study checks two ideas against
the exact threshold before any kernel is written:

* ``quad``: for alpha = 1.5 (b = 2) the sums one sweep gathers (sum u^2, sum u, count) define
  f exactly as a quadratic in tau as long as no key leaves the support, so a sweep could take the
  quadratic's root instead of a Halley step. Reported: 64-row blocks' sweeps (the kernel's unit:
  a program sweeps until its last row converges) and the worst final error, against Halley's.
* ``moments``: skip the sweeps after the start and run the forward once at the start tau0, keeping
  the moments sum u0^k v (k = 0..b) of the keys above tau0; the same sums give f's polynomial, so
  the forward can solve for tau1 = tau0 + d and return sum (u0 - d)^b v / sum (u0 - d)^b. Keys
  between tau0 and tau1 keep a weight (u0 - d)^b they should not have (first order in d at
  alpha = 2). Reported: the step d (share of the width), the share of blocks whose every row's
  step is within the auto tolerance, and the output's relative error against the exact output
  with random v (worst row).

    python benchmarks/study_tau_refine.py --out benchmarks/results/cpu-tau-refine.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("study_tau_refine")


def _study_start():
    """benchmarks/study_tau_start.py (its replay of the kernel's loop, starts and rows)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import study_tau_start

    return study_tau_start


def quad_step(tau, lo, hi, s0, s1, s2, b: float):
    """b = 2: the root nearest tau of s2 d^2 - 2 s1 d + (s0 - 1) (the sweep's quadratic model),
    safeguarded by the bracket like the kernel's Halley step (else the midpoint)."""
    f = s0 - 1.0
    above = f > 0
    lo, hi = torch.where(above, tau, lo), torch.where(above, hi, tau)
    disc = s1 * s1 - s2 * f
    ok = (disc >= 0) & (s1 > 0)
    d = f / torch.where(ok, s1 + disc.clamp(min=0).sqrt(), torch.ones_like(s1))
    cand = tau + d
    inside = ok & (cand >= lo) & (cand <= hi)
    new = torch.where(f == 0, tau, torch.where(inside, cand, 0.5 * (lo + hi)))
    return new, lo, hi


def entmax_out(z, tau, b: float, v):
    """sum_j [z - tau]_+^b v_j / sum_j [z - tau]_+^b per row."""
    p = (z - tau[:, None]).clamp(min=0) ** b
    return (p @ v) / p.sum(-1, keepdim=True)


def moment_forward(z, tau0, b: float, v):
    """(output, step d) of one forward at tau0 corrected by its moments (b = 1 or 2)."""
    u0 = (z - tau0[:, None]).clamp(min=0)
    ind = (u0 > 0).to(z.dtype)
    if b == 2:
        s0, s1, s2 = (u0 * u0).sum(-1), u0.sum(-1), ind.sum(-1)
        disc = (s1 * s1 - s2 * (s0 - 1.0)).clamp(min=0)
        d = (s0 - 1.0) / (s1 + disc.sqrt())
        num = (u0 * u0) @ v - 2 * d[:, None] * (u0 @ v) + (d * d)[:, None] * (ind @ v)
        den = s0 - 2 * d * s1 + d * d * s2
    elif b == 1:
        s0, s1 = u0.sum(-1), ind.sum(-1)
        d = (s0 - 1.0) / s1
        num = u0 @ v - d[:, None] * (ind @ v)
        den = s0 - d * s1
    else:
        raise ValueError("moments: b = 1 or 2 only")
    return num / den[:, None], d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", default="16384,4096", help="comma list")
    p.add_argument("--blocks", type=int, default=8, help="row blocks of 64 per case")
    p.add_argument("--families", default="randn:1,randn:2,randn:4,randn:16,local:2,randn:0.5,randn:0.25")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study = _study_start()
    report = {"date": time.strftime("%Y-%m-%d"), "blocks": args.blocks, "block_rows": study.BLOCK,
              "tol": {"1.5": 0.1, "2": 0.03}, "cases": []}
    gen = torch.Generator().manual_seed(1)
    for n in (int(x) for x in args.seq_len.split(",")):
        for spec in args.families.split(","):
            family, _, scale = spec.partition(":")
            for alpha in (1.5, 2.0):
                b = 1.0 / (alpha - 1.0)
                tol = 0.1 if alpha == 1.5 else 0.03
                z = study.rows_of(family, float(scale or 1), n, args.blocks, 64, alpha, seed=3)
                zmax = z.max(-1).values
                exact = study.sweeps(z, *study.starts(z, b)["subset8"](), zmax, b, 0.0, 80)[1]
                width = (zmax - exact).clamp(min=1e-12)
                v = torch.randn(z.shape[1], 64, generator=gen, dtype=torch.float64)
                ref = entmax_out(z, exact, b, v)
                case = {"n": n, "inputs": spec, "alpha": alpha, "starts": {}}
                for name in ("subset8", "subset16"):
                    res = {}
                    steps = {"halley": study.halley, "quad": quad_step} if b == 2 else {"halley": study.halley}
                    for label, fn in steps.items():
                        tau0, lo, hi = study.starts(z, b)[name]()
                        count, tau = study.sweeps(z, tau0, lo, hi, zmax, b, tol, 8, fn)
                        res[label] = {"block_sweeps_mean": float(count.view(-1, study.BLOCK).max(-1).values.mean()),
                                      "error_rel_max": float(((tau - exact).abs() / width).max())}
                    tau0 = study.starts(z, b)[name]()[0]
                    out, d = moment_forward(z, tau0, b, v)
                    step = d.abs() / (zmax - tau0 - d).clamp(min=1e-6)
                    err = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
                    ok = step <= tol
                    res["moments"] = {"step_median": float(step.median()), "step_max": float(step.max()),
                                      "blocks_within_tol": float(ok.view(-1, study.BLOCK).all(-1).double().mean()),
                                      "out_error_max": float(err.max()),
                                      "out_error_max_within_tol": float(err[ok].max()) if ok.any() else None}
                    case["starts"][name] = res
                report["cases"].append(case)
                log.info("N %5d %-10s a %.1f  %s", n, spec, alpha, "  ".join(
                    f"{k}: halley {r['halley']['block_sweeps_mean']:.2f}"
                    + (f" quad {r['quad']['block_sweeps_mean']:.2f}" if "quad" in r else "")
                    + f" moments ok {r['moments']['blocks_within_tol']:.2f} err {r['moments']['out_error_max']:.1e}"
                    for k, r in case["starts"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
