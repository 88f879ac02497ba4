"""Benchmark the Triton AdaSplash attention against upstream adasplash (v1, v2) and torch SDPA.

Forward and forward+backward times (median of ``triton.testing.do_bench``, L2 flushed between
repetitions) on the anchor shapes of shared/anchors/README.md, bf16, alpha = 1.5, randn inputs;
our output (and gradient) error against the fp64 oracle on a slice of heads; the measured block
density (share of active mask tiles among tiles holding any valid pair) at our mask tile and at
16 x 16. Upstream v2 autotunes on its first call (40-107 s per shape): its first-call time is
reported. ``--stages`` also times each of our stages alone, and variants that bound them.

    python benchmarks/bench_attention.py --out benchmarks/results/h200-attention.json
    python benchmarks/bench_attention.py --impls ours,sdpa --stages --variants variants.json
    python benchmarks/bench_attention.py --cpu-smoke          # tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ANCHORS = [  # (B, H, N, D), causal
    ((4, 16, 4096, 64), False),
    ((4, 16, 4096, 64), True),
    ((1, 16, 16384, 64), True),
    ((1, 16, 16384, 64), False),
    ((4, 16, 4096, 128), False),
]
SMOKE = [((1, 2, 64, 16), False), ((1, 2, 48, 16), True)]
IMPLS = ("ours", "v1", "v2", "sdpa")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    p.add_argument("--impls", default="ours,v1,v2,sdpa", help=f"comma list of {','.join(IMPLS)}")
    p.add_argument("--shapes", help="comma list of B:H:N:D:c|n (default: the anchor shapes)")
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32 (CPU)")
    p.add_argument("--config", help="JSON config for ours (default: the declared default)")
    p.add_argument("--variants", help="JSON file: {name: config} of extra configs of ours to time")
    p.add_argument("--stages", action="store_true", help="also time each stage of ours alone")
    p.add_argument("--no-bwd", action="store_true", help="forward only")
    p.add_argument("--err-heads", type=int, default=2, help="heads checked against the fp64 oracle")
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time (ms)")
    return p.parse_args(argv)


def _shapes(args) -> list[tuple[tuple[int, int, int, int], bool]]:
    if args.shapes:
        out = []
        for item in args.shapes.split(","):
            b, h, n, d, c = item.split(":")
            out.append(((int(b), int(h), int(n), int(d)), c == "c"))
        return out
    return SMOKE if args.cpu_smoke else ANCHORS


def _timer(device: str, args) -> Callable[[Callable[[], Any]], float]:
    if device == "cuda":
        import triton.testing

        def cuda_ms(fn: Callable[[], Any]) -> float:
            return float(triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))

        return cuda_ms

    def cpu_ms(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_ms


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _impl_fn(impl: str, alpha: float, causal: bool, cfg: Any):
    """(callable(q, k, v) -> out) for one implementation, or raise ImportError / ValueError."""
    import torch

    if impl == "ours":
        from adasplash_tune.kernels.attention.op import adasplash_triton

        return lambda q, k, v: adasplash_triton(q, k, v, alpha, causal, None, 1.0 / math.sqrt(q.shape[-1]), cfg)
    if impl == "v1":
        import adasplash

        return lambda q, k, v: adasplash.adasplash_v1(q, k, v, alpha=alpha, is_causal=causal, niter=10)
    if impl == "v2":
        if not causal or alpha != 1.5:
            raise ValueError("v2 runs causal alpha=1.5 only")
        import adasplash

        return lambda q, k, v: adasplash.adasplash_v2(q, k, v)
    if impl == "sdpa":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    raise ValueError(f"unknown implementation {impl!r}")


def _errors(fn, q, k, v, grad, alpha, causal, heads: int, with_grad: bool) -> dict[str, float]:
    """Relative errors on the first batch entry's first ``heads`` query heads (and their kv heads)."""
    import torch

    from adasplash_tune.kernels.reference import attention_reference, relative_error

    group = q.shape[1] // k.shape[1]
    hq = max(1, min(heads, q.shape[1]))
    hkv = max(1, math.ceil(hq / group))
    hq = hkv * group if group > 1 else hq
    qs, ks, vs = (t[:1, :h].detach().clone().requires_grad_() for t, h in ((q, hq), (k, hkv), (v, hkv)))
    g = grad[:1, :hq]
    out = fn(qs, ks, vs)
    ref = attention_reference(qs, ks, vs, alpha, causal)
    errs = {"fwd_err": relative_error(out, ref)}
    if with_grad:
        got = torch.autograd.grad(out, (qs, ks, vs), g)
        want = torch.autograd.grad(ref, (qs, ks, vs), g.double())
        errs["grad_err"] = max(relative_error(a, b) for a, b in zip(got, want))
    return errs


def _density(q, k, v, alpha, causal, cfg) -> dict[str, float]:
    from adasplash_tune.kernels.attention.op import block_density, forward_stages

    scale = 1.0 / math.sqrt(q.shape[-1])
    out: dict[str, float] = {}
    st = forward_stages(q, k, v, alpha, causal, None, scale, cfg)
    out["density"] = block_density(st["mask"], q.shape[2], (cfg["mask_m"], cfg["mask_n"]), causal)
    fine = cfg.replace(mask_m=16, mask_n=16)
    st = forward_stages(q, k, v, alpha, causal, None, scale, fine)
    out["density_16"] = block_density(st["mask"], q.shape[2], (16, 16), causal)
    return out


def _stage_times(q, k, v, alpha, causal, cfg, ms) -> dict[str, float]:
    """Each stage of ours alone (benchmarks/bench_stages.py), with the tau kernel's counters."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_stages import stage_times

    import torch

    return stage_times(q, k, v, torch.randn_like(q), alpha, causal, cfg, ms, True)


def _bench_one(impl, shape, causal, tensors, args, ms, device, cfg, detail: bool = True) -> dict[str, Any]:
    import torch

    q, k, v, grad = tensors
    row: dict[str, Any] = {"impl": impl, "shape": list(shape), "causal": causal, "alpha": args.alpha,
                           "dtype": str(q.dtype).replace("torch.", "")}
    try:
        fn = _impl_fn(impl, args.alpha, causal, cfg)
    except (ImportError, ValueError) as exc:
        row["skipped"] = str(exc)
        return row
    try:
        if impl == "v2":  # autotunes on its first call: report that time once per shape
            t0 = time.perf_counter()
            fn(q, k, v)
            _sync(device)
            row["first_call_fwd_s"] = round(time.perf_counter() - t0, 2)
        row["fwd_ms"] = round(ms(lambda: fn(q, k, v)), 4)
        if not args.no_bwd:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

            def fwd_bwd():
                out = fn(qg, kg, vg)
                torch.autograd.grad(out, (qg, kg, vg), grad)

            if impl == "v2":
                t0 = time.perf_counter()
                fwd_bwd()
                _sync(device)
                row["first_call_fwdbwd_s"] = round(time.perf_counter() - t0, 2)
            row["fwdbwd_ms"] = round(ms(fwd_bwd), 4)
        if impl != "sdpa" and detail:
            row.update({k: float(f"{e:.3e}") for k, e in _errors(
                fn, q, k, v, grad, args.alpha, causal, args.err_heads, not args.no_bwd).items()})
        if impl == "ours":
            row["config"] = cfg.as_dict()
        if impl == "ours" and detail:
            row.update({k: round(d, 4) for k, d in _density(q, k, v, args.alpha, causal, cfg).items()})
            if args.stages:
                row["stages"] = _stage_times(q, k, v, args.alpha, causal, cfg, ms)
    except Exception as exc:  # noqa: BLE001 - one failing implementation must not end the run
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def _variant_rows(shape, causal, tensors, args, ms, device, variants) -> list[dict[str, Any]]:
    from adasplash_tune.kernels.attention.op import checked_config

    rows = []
    for name, values in variants.items():
        try:
            from adasplash_tune.kernels.declarations.attention import TRITON

            cfg = checked_config(TRITON.validate(values), tensors[0])
        except ValueError as exc:
            rows.append({"impl": f"ours:{name}", "shape": list(shape), "causal": causal, "error": str(exc)})
            continue
        row = _bench_one("ours", shape, causal, tensors, args, ms, device, cfg, detail=False)
        row["impl"] = f"ours:{name}"
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'shape':>18} {'c':>1} {'impl':>16} {'fwd ms':>8} {'f+b ms':>8} {'fwd err':>8} {'grad err':>8} {'dens':>5} {'d16':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = "x".join(str(s) for s in r["shape"])
        def f(key, fmt):
            val = r.get(key)
            return format(val, fmt) if isinstance(val, (int, float)) else "-"
        note = "  " + (r.get("skipped") or r.get("error") or "")
        lines.append(f"{shape:>18} {'c' if r['causal'] else 'n':>1} {r['impl'][:16]:>16} {f('fwd_ms', '8.3f')} "
                     f"{f('fwdbwd_ms', '8.3f')} {f('fwd_err', '8.1e')} {f('grad_err', '8.1e')} "
                     f"{f('density', '5.2f')} {f('density_16', '5.2f')}{note.rstrip()}")
    return "\n".join(lines)


def _meta(device: str) -> dict[str, Any]:
    import torch
    import triton

    meta = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "device": device, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    try:
        import adasplash

        meta["adasplash"] = getattr(adasplash, "__version__", "?")
    except ImportError:
        meta["adasplash"] = None
    return meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from adasplash_tune.kernels.attention.op import checked_config
    from adasplash_tune.kernels.declarations.attention import TRITON

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu-smoke")
    dtype = getattr(torch, args.dtype or ("float32" if args.cpu_smoke else "bfloat16"))
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if args.cpu_smoke:
        impls = [i for i in impls if i in ("ours", "sdpa")]
        args.err_heads, args.stages = 2, args.stages
    variants = json.loads(Path(args.variants).read_text()) if args.variants else {}
    ms = _timer(device, args)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape, causal in _shapes(args):
        b, h, n, d = shape
        q, k, v, grad = (torch.randn(b, h, n, d, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
        cfg = checked_config(TRITON.validate(json.loads(args.config)) if args.config else TRITON.default(), q)
        for impl in impls:
            rows.append(_bench_one(impl, shape, causal, (q, k, v, grad), args, ms, device, cfg))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
        for row in _variant_rows(shape, causal, (q, k, v, grad), args, ms, device, variants):
            rows.append(row)
            print(_table([row]).splitlines()[-1], flush=True)
        del q, k, v, grad
        if device == "cuda":
            torch.cuda.empty_cache()
    result = {"meta": _meta(device), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(_table(rows))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
