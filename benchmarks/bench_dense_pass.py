"""What the tau kernel's dense pass costs, piece by piece, against SDPA's forward in the same run.

The dense pass (kernels/attention/tau.py ``_dense_pass``) sweeps every key tile once for each
row's max; on the way it may keep the row's 8 or 16 largest tile maxima (``TOPK``, the subset
start) and the per-chunk bound codes (``CODES``, what lets the first Halley sweep skip). This
benchmark runs that very function alone, in a probe kernel with the tau kernel's prologue, at
several tile shapes, warps and stages, with each extra switched on and off, so the floor of a
QK^T + row-max pass on this GPU and the price of each extra are read off one table.

    python benchmarks/bench_dense_pass.py --out benchmarks/results/h200-dense-pass.json
    python benchmarks/bench_dense_pass.py --cpu-smoke            # tiny, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("bench_dense_pass")

#: (tau_block_m, tau_block_n, warps, stages, topk, codes, mask_m); the first row is the default
#: config's pass (subset start: eight maxima, chunk codes on 64-row groups).
DEFAULT_VARIANTS = (
    (64, 64, 4, 3, 8, True, 64),
    (64, 64, 4, 3, 0, False, 64),
    (64, 64, 4, 3, 8, False, 64),
    (64, 64, 4, 3, 0, True, 64),
    (64, 64, 4, 3, 16, True, 64),
    (64, 64, 4, 3, 16, False, 64),
    (64, 64, 4, 3, 0, True, 16),
    (64, 64, 4, 3, 0, True, 32),
    (64, 64, 4, 2, 8, True, 64),
    (64, 64, 4, 4, 8, True, 64),
    (64, 128, 4, 3, 8, True, 64),
    (64, 128, 4, 3, 0, False, 64),
    (128, 64, 8, 3, 8, True, 64),
    (128, 128, 8, 3, 8, True, 64),
    (128, 128, 8, 3, 0, False, 64),
)
SMOKE_VARIANTS = ((16, 16, 2, 1, 8, True, 16), (16, 16, 2, 1, 16, False, 16), (32, 16, 2, 1, 0, True, 16))


def run_variant(probe, q, k, causal: bool, variant, ms) -> dict[str, Any]:
    """Time one dense-pass variant; returns its row (and checks the row max against torch's)."""
    import torch
    import triton

    from adasplash_tune.kernels.attention.common import Geometry, dot_precision

    bm, bn, warps, stages, topk, codes, mm = variant
    geo = Geometry.of(q, k)
    mn = min(64, bn)
    tm, tn = triton.cdiv(geo.seq_len, mm), triton.cdiv(geo.seq_len, mn)
    mask = torch.empty((geo.rows, tm, tn), dtype=torch.int8, device=q.device)
    out = torch.empty((geo.rows, geo.seq_len, 2), dtype=torch.float32, device=q.device)
    n_mblocks = triton.cdiv(geo.seq_len, bm)

    def call():
        probe[(n_mblocks, geo.rows)](
            q, k, mask, out, geo.seq_len, geo.q_heads, geo.group, tm, tn, n_mblocks, 0.5,
            IS_CAUSAL=causal, HEAD_DIM=geo.head_dim, EVEN_D=geo.even_d, EVEN_N=geo.even_n(bn), TOPK=topk,
            CODES=codes, BM=bm, BN=bn, BD=geo.block_d, MM=mm, MN=mn, DOT_PREC=dot_precision(q.dtype), num_warps=warps,
            num_stages=stages)

    call()
    s = (q[:1, :1].float() @ k[:1, :1].float().transpose(-1, -2))[0, 0]
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    max_err = (out[0, :, 0] - s.max(-1).values).abs().max().item()
    return {"tau_block_m": bm, "tau_block_n": bn, "warps": warps, "stages": stages, "topk": topk, "codes": codes, "mask_m": mm,
            "ms": ms(call), "row_max_err": max_err}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="1,16,16384,64,causal;4,16,4096,64,full",
                   help="';'-separated B,H,N,D,causal|full")
    p.add_argument("--variants", default=None,
                   help="JSON list of [tau_block_m, tau_block_n, warps, stages, topk, codes, mask_m] "
                        "(default: a sweep)")
    p.add_argument("--out", default=None, help="JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cpu_smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from adasplash_tune.tuner.timing import TimingOptions, measure

    sys.path.insert(0, str(Path(__file__).resolve().parent))

    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    problems = "1,2,40,16,causal;1,1,33,16,full" if args.cpu_smoke else args.problems
    variants = (json.loads(args.variants) if args.variants else
                (SMOKE_VARIANTS if args.cpu_smoke else DEFAULT_VARIANTS))
    if any(not isinstance(v, (list, tuple)) or len(v) != 7 for v in variants):
        p.error("--variants: each variant is [tau_block_m, tau_block_n, warps, stages, topk, codes, mask_m]")
    opts = TimingOptions() if not args.cpu_smoke else TimingOptions(warmup_ms=0.0, rep_ms=0.0)

    def ms(fn) -> float:
        return round(measure(fn, device, opts).median_ms, 4)

    from _dense_probe import probe

    rows, start = [], time.time()
    for text in problems.split(";"):
        parts = text.split(",")
        shape, causal = tuple(int(t) for t in parts[:4]), parts[4] == "causal"
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))
        sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
        for variant in variants:
            row = run_variant(probe, q, k, causal, tuple(variant), ms)
            row.update(shape=list(shape), causal=causal, sdpa_fwd_ms=sdpa, ratio_to_sdpa_fwd=round(row["ms"] / sdpa, 3))
            b, h, n, d = shape
            pairs = b * h * (n * (n + 1) / 2 if causal else n * n)
            row["qk_tflops"] = round(2 * pairs * d / (row["ms"] * 1e-3) / 1e12, 1)
            log.info("%s %s bm=%d bn=%d w=%d s=%d topk=%d codes=%d mm=%d  %.4f ms (%.2fx SDPA fwd %.4f)  %.0f TFLOP/s",
                     shape, "causal" if causal else "full", row["tau_block_m"], row["tau_block_n"], row["warps"],
                     row["stages"], row["topk"], row["codes"], row["mask_m"], row["ms"], row["ratio_to_sdpa_fwd"], sdpa,
                     row["qk_tflops"])
            rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype)[6:], "interpreter": bool(args.cpu_smoke),
            "method": "tuner.timing.measure medians (CUDA events, L2 flushed); probe kernel = tau kernel prologue "
                      "+ _dense_pass only; qk_tflops counts the QK^T products of valid pairs"}
    result = {"meta": meta, "rows": rows, "wall_s": round(time.time() - start, 1)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    bad = [r for r in rows if not math.isfinite(r["row_max_err"]) or r["row_max_err"] > 0.05]
    if bad:
        log.error("row max wrong in %d variants", len(bad))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
