"""Where an eager call's host time goes: cProfile over many warm calls on a GPU.

    python benchmarks/profile_host.py --out benchmarks/results/h200-host-profile.json

Cases at tiny shapes (the kernels take microseconds, so the host sets the pace): adasplash forward
without grad and forward+backward at (1, 2, 128, 64) causal, entmax at (64, 128), SDPA's forward;
bfloat16. For each: host µs per call without the profiler, then the profiler's table (sorted by
own time) over the same number of calls. cProfile inflates small Python functions, so read the
table for where time goes, and the unprofiled µs for how much.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import time
from typing import Any, Callable

import torch

log = logging.getLogger("profile_host")


def _cases(device: str) -> list[tuple[str, Callable[[], Any], int]]:
    import adasplash_tune as at

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    x = torch.randn(64, 128, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(q)

    def forward() -> None:
        with torch.no_grad():
            at.adasplash(q, k, v, alpha=1.5, is_causal=True)

    def forward_backward() -> None:
        at.adasplash(qg, kg, vg, alpha=1.5, is_causal=True).backward(grad)

    def entmax() -> None:
        at.entmax(x, alpha=1.5, dim=-1)

    def sdpa() -> None:
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return [("forward", forward, 3000), ("forward_backward", forward_backward, 1000), ("entmax", entmax, 3000),
            ("sdpa_forward", sdpa, 3000)]


def profile(fn: Callable[[], Any], calls: int, rows: int) -> dict[str, Any]:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    return {"calls": calls, "us_per_call": us, "profile": text.getvalue()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON report")
    p.add_argument("--rows", type=int, default=30, help="profiler rows per case")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("profile_host.py needs a CUDA GPU: it profiles the eager path a GPU call takes")
        return 2
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn, calls in _cases("cuda"):
        report[name] = profile(fn, calls, args.rows)
        log.info("===== %s: %.1f us per call (no profiler)\n%s", name, report[name]["us_per_call"],
                 report[name]["profile"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
