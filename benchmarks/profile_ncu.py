"""One kernel of ours, warm, inside a profiler range: the driver for Nsight Compute.

Runs the chosen stage a few times (compiles, warms the caches), then once more between
``cudaProfilerStart`` and ``cudaProfilerStop``, so that ``ncu --profile-from-start off`` captures
exactly that launch with its steady-state inputs:

    ncu --clock-control none --profile-from-start off --set full -o tau \\
        python benchmarks/profile_ncu.py tau --problem 1,16,16384,64,causal --family randn:1

Targets: ``entmax`` (rows x cols, alpha), and the attention stages ``tau`` (the tau kernel: dense
pass and sweeps), ``fwd`` (sparse forward from the stage's tile lists), ``bwd_q`` and ``bwd_kv``
(the split backward), all with the default config of the problem unless ``--config`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("profile_ncu")

TARGETS = ("entmax", "tau", "fwd", "bwd_q", "bwd_kv")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--problem", default="1,16,16384,64,causal", help="attention: B,H,N,D,causal|full")
    p.add_argument("--family", default="randn:1", help="attention input family:scale (bench_sparsity.py)")
    p.add_argument("--entmax", default="4096,8192", help="entmax: rows,cols")
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--config", default="{}", help="JSON overrides of the default config")
    p.add_argument("--warmup", type=int, default=3, help="calls before the profiled one")
    return p.parse_args(argv)


def _entmax_call(args: argparse.Namespace) -> Callable[[], Any]:
    import torch

    from adasplash_tune.kernels.declarations.entmax import TRITON
    from adasplash_tune.kernels.entmax import entmax_forward

    rows, cols = (int(x) for x in args.entmax.split(","))
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    cfg = TRITON.validate(json.loads(args.config))
    return lambda: entmax_forward(x, args.alpha, cfg)


def _attention_call(args: argparse.Namespace) -> Callable[[], Any]:
    import torch

    from adasplash_tune.kernels.attention.op import checked_config
    from adasplash_tune.kernels.declarations.attention import TRITON

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sparsity import make_inputs
    from bench_stages import stage_calls

    b, h, n, d, kind = args.problem.split(",")
    shape = (int(b), int(h), int(n), int(d))
    family, value = args.family.split(":")
    q, k, v = make_inputs(family, float(value), shape, torch.bfloat16, "cuda", 0, max(1.0, shape[2] / 64))[:3]
    cfg = checked_config(TRITON.validate(json.loads(args.config)), q)
    calls = stage_calls(q, k, v, torch.randn_like(q), args.alpha, kind == "causal", cfg)
    if args.target not in calls:
        raise SystemExit(f"{args.target}: this config has no such stage (bwd_mode={cfg['bwd_mode']})")
    return calls[args.target]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    import torch

    if not torch.cuda.is_available():
        log.error("no CUDA device")
        return 2
    call = _entmax_call(args) if args.target == "entmax" else _attention_call(args)
    for _ in range(args.warmup):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    log.info("profiled one %s call", args.target)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
