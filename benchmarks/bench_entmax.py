"""Benchmark the Triton alpha-entmax forward: default config, a knob sweep, sweeps run, accuracy.

For each (rows x cols) case and alpha, in one run (GPU times: triton.testing.do_bench medians):
  * the bandwidth floor: ``y.copy_(x)`` (one read and one write of the tensor, as entmax needs),
  * torch.softmax (the yardstick of issue 12),
  * our kernel with the declared default config,
  * a one-knob-at-a-time sweep around the default: ``init``, ``chunks``, ``tol``, ``niter`` (the
    cap) and launch shapes (``--sweep small``: the launch and chunk variants only for the alphas in
    ``--full-alpha``; ``wide``: for every alpha and more of them),
  * the fastest of those that passes the dtype's forward tolerance ("best gated"),
  * upstream ``adasplash.triton_entmax`` with its defaults, when importable.
Every config row records its error against the fp64 oracle (on ``--ref-rows`` rows, worst row
and whole slice) and, for the knobs that change the solve (every one but warps and tile width),
the Halley sweeps its programs ran
(:func:`~adasplash_tune.kernels.entmax.forward_sweeps`, a separately compiled counting variant).
A host section times a tiny call (64 x 128) per launch: our launcher, the public API and softmax.

    python benchmarks/bench_entmax.py --out benchmarks/results/h200-entmax.json   # on a GPU
    python benchmarks/bench_entmax.py --cpu-smoke --out /tmp/smoke.json           # CPU, interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

GPU_CASES = ((4096, 8192), (8192, 1024))
SMOKE_CASES = ((3, 200), (4, 64))
ALPHAS = (1.5, 2.0, 4 / 3, 1.7)
HOST_SHAPE = (64, 128)
SMOKE_HOST_SHAPE = (2, 16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on CPU tensors under TRITON_INTERPRET=1 (checks the script runs)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--alpha", default=None, help="comma list of alphas (default 1.5,2,4/3,1.7)")
    parser.add_argument("--full-alpha", default="1.5",
                        help="alphas that get the launch and chunk variants under --sweep small")
    parser.add_argument("--cases", default=None, help="comma list of ROWSxCOLS (default 4096x8192,8192x1024)")
    parser.add_argument("--scale", type=float, default=1.0, help="inputs are scale * randn")
    parser.add_argument("--sweep", default="small", choices=("none", "small", "wide"),
                        help="knob variants around the default config")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--ref-rows", type=int, default=256, help="rows compared with the fp64 oracle")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _alpha(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


# --------------------------------------------------------------------------- helpers


def _timer(device: str, smoke: bool) -> Callable[..., float]:
    """fn -> median milliseconds: do_bench on a GPU, a short perf_counter loop on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        def gpu_time(fn: Callable[[], Any]) -> float:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

        return gpu_time

    reps = 1 if smoke else 5

    def cpu_time(fn: Callable[[], Any]) -> float:
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return cpu_time


def _variants(rows: int, cols: int, full: bool, size: str, smoke: bool) -> list[tuple[str, dict[str, Any]]]:
    """(knob, config values) changed one at a time from the default. ``tol`` and ``niter`` are
    run-time arguments (no recompilation); the others compile a kernel variant each."""
    if size == "none":
        return []
    out: list[tuple[str, dict[str, Any]]] = [("init", {"init": "bracket"})]
    out += [("tol", {"tol": t}) for t in ((0.3, 0.03) if size == "small" else (0.3, 0.03, 0.01, 0.0))]
    out += [("niter", {"niter": n}) for n in ((1, 2) if size == "small" else (1, 2, 3, 4))]
    if smoke:
        return [("init", {"init": "bracket"}), ("tol", {"tol": 0.3}), ("niter", {"niter": 1}),
                ("chunks", {"chunks": 32}), ("launch", {"block_n": 64, "rows": 2, "num_warps": 2})]
    if not (full or size == "wide"):
        return out
    out += [("chunks", {"chunks": c}) for c in ((32, 64) if size == "small" else (16, 32, 64))]
    if cols >= 4096:
        launches = [{"num_warps": 4}, {"num_warps": 16}]
        if size == "wide":
            launches += [{"block_n": cols // 2, "num_warps": 8}, {"rows": 2, "num_warps": 16}]
    else:
        launches = [{"rows": 2, "num_warps": 4}, {"rows": 4, "num_warps": 8}]
        if size == "wide":
            launches += [{"num_warps": 2}, {"rows": 8, "num_warps": 8}]
    out += [("launch", v) for v in launches]
    return out


def _upstream_entmax() -> tuple[Callable | None, str]:
    """The upstream package's public Triton entmax, or (None, reason)."""
    try:
        import adasplash  # noqa: F401
    except Exception as exc:  # not installed, or broken: skip it
        return None, f"adasplash not importable ({type(exc).__name__}: {exc})"
    for name in ("triton_entmax", "triton_entmax_v2", "triton_entmax_v1"):
        fn = getattr(adasplash, name, None)
        if callable(fn):
            return fn, f"adasplash.{name} (package defaults)"
    return None, "adasplash has no triton_entmax"


def _ms_key(row: dict[str, Any]) -> float:
    return float("inf") if row.get("ms") is None else row["ms"]


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- one case


def bench_case(rows: int, cols: int, alpha: float, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    from adasplash_tune.kernels.entmax import entmax_backward, entmax_forward, forward_sweeps
    from adasplash_tune.kernels.reference import entmax_reference, relative_error, tolerance
    from adasplash_tune.kernels.registry import get_spec

    dtype = getattr(torch, args.dtype)
    spec = get_spec("entmax", "triton")
    timer = _timer(device, args.cpu_smoke)
    gen = torch.Generator().manual_seed(args.seed + rows * 7 + cols)
    x = (args.scale * torch.randn(rows, cols, generator=gen)).to(device=device, dtype=dtype)
    ref_rows = min(rows, args.ref_rows)
    ref = entmax_reference(x[:ref_rows], alpha)
    tol = tolerance(dtype)
    nbytes = 2 * x.numel() * x.element_size()  # one read of x, one write of y

    def measure(knob: str, values: dict[str, Any], count: bool) -> dict[str, Any]:
        cfg = spec.validate(values)
        row: dict[str, Any] = {"knob": knob, "changed": values, "config": cfg.as_dict()}
        try:
            out = entmax_forward(x, alpha, cfg)[:ref_rows]
            row["err"] = relative_error(out, ref)
            row["worst_row_err"] = max(relative_error(o, r) for o, r in zip(out, ref))
            row["ms"] = timer(lambda: entmax_forward(x, alpha, cfg))
            row["gbps"] = _gbps(nbytes, row["ms"])
            row["ok"] = row["err"] <= tol
            if count:
                sweeps = forward_sweeps(x, alpha, cfg)[1].float()
                row["sweeps_mean"], row["sweeps_max"] = float(sweeps.mean()), int(sweeps.max())
        except Exception as exc:  # out of resources, compile failure: record, go on
            row.update(ms=None, err=None, ok=False, failed=f"{type(exc).__name__}: {exc}"[:300])
        return row

    result: dict[str, Any] = {"rows": rows, "cols": cols, "alpha": alpha, "dtype": args.dtype, "tolerance": tol}
    y = torch.empty_like(x)
    floor_ms = timer(lambda: y.copy_(x))
    result["floor"] = {"what": "y.copy_(x)", "bytes": nbytes, "ms": floor_ms, "gbps": _gbps(nbytes, floor_ms)}
    soft_ms = timer(lambda: torch.softmax(x, dim=-1))
    result["softmax"] = {"ms": soft_ms, "gbps": _gbps(nbytes, soft_ms)}

    result["default"] = measure("default", {}, True)
    full = any(abs(alpha - _alpha(a)) < 1e-9 for a in args.full_alpha.split(","))
    # rows per program share their early exit; other launch shapes leave the sweeps as they are
    result["sweep"] = [measure(knob, values, knob != "launch" or "rows" in values)
                       for knob, values in _variants(rows, cols, full, args.sweep, args.cpu_smoke)]
    passing = [r for r in [result["default"]] + result["sweep"] if r.get("ok")]
    result["best_gated"] = min(passing, key=_ms_key) if passing else None

    if args.backward:
        grad = torch.randn_like(x)
        cfg = spec.default()
        result["backward"] = {"fwd_bwd_ms": timer(lambda: entmax_backward(entmax_forward(x, alpha, cfg), grad, alpha, cfg))}

    upstream, how = (None, "skipped in --cpu-smoke") if args.cpu_smoke else _upstream_entmax()
    if upstream is None:
        result["upstream"] = {"skipped": how}
    else:
        try:
            out = upstream(x, alpha=alpha)
            ms = timer(lambda: upstream(x, alpha=alpha))
            result["upstream"] = {"call": how, "ms": ms, "err": relative_error(out[:ref_rows], ref),
                                  "gbps": _gbps(nbytes, ms)}
        except Exception as exc:
            result["upstream"] = {"call": how, "failed": f"{type(exc).__name__}: {exc}"[:300]}
    return result


def bench_host(device: str, dtype_name: str, shape: tuple[int, int], calls: int) -> dict[str, Any]:
    """Host microseconds per call on a tiny input (the GPU is idle most of the time, so the loop
    is bound by the host): our launcher, the public API (no autograd) and torch.softmax. (Under
    the interpreter the numbers time the interpreter, not a launch.)"""
    import torch

    import adasplash_tune
    from adasplash_tune.kernels.entmax import entmax_forward
    from adasplash_tune.kernels.registry import get_spec

    x = torch.randn(*shape, device=device).to(getattr(torch, dtype_name))
    cfg = get_spec("entmax", "triton").default()

    def per_call_us(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6

    with torch.no_grad():
        return {
            "shape": list(shape), "calls": calls,
            "launcher_us": per_call_us(lambda: entmax_forward(x, 1.5, cfg)),
            "api_us": per_call_us(lambda: adasplash_tune.entmax(x, 1.5, backend="triton")),
            "softmax_us": per_call_us(lambda: torch.softmax(x, dim=-1)),
        }


# --------------------------------------------------------------------------- report


def _fmt(row: dict[str, Any] | None, label: bool = False) -> str:
    if not row or row.get("ms") is None:
        return "-"
    text = f"{row['ms']:.4f}"
    if row.get("err") is not None:
        text += f" ({row['err']:.0e}"
        text += f", {row['sweeps_mean']:.2f} sw)" if "sweeps_mean" in row else ")"
    if label and row.get("changed"):
        text += " " + ",".join(f"{k}={v}" for k, v in row["changed"].items())
    return text


def format_table(results: list[dict[str, Any]]) -> str:
    head = ("case", "alpha", "floor ms", "softmax ms", "default ms (err, sweeps)", "best gated ms", "upstream ms")
    lines = [" | ".join(head)]
    for r in results:
        lines.append(" | ".join((
            f"{r['rows']}x{r['cols']}", f"{r['alpha']:.4g}", f"{r['floor']['ms']:.4f}",
            f"{r['softmax']['ms']:.4f}", _fmt(r["default"]), _fmt(r["best_gated"], label=True) if r["best_gated"] else "none passes",
            _fmt(r["upstream"]) if "ms" in r["upstream"] else "skipped",
        )))
    return "\n".join(lines)


def _environment(device: str) -> dict[str, Any]:
    import torch
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": device, "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu-smoke for a CPU run", file=sys.stderr)
        return 1
    cases = SMOKE_CASES if args.cpu_smoke else GPU_CASES
    if args.cases:
        cases = tuple(tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(","))
    alphas = tuple(_alpha(a) for a in args.alpha.split(",")) if args.alpha else ALPHAS

    started = time.perf_counter()
    results = []
    for rows, cols in cases:
        for alpha in alphas:
            results.append(bench_case(rows, cols, alpha, args, device))
            print(f"done {rows}x{cols} alpha={alpha:.4g} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    host = bench_host(device, args.dtype, *((SMOKE_HOST_SHAPE, 3) if args.cpu_smoke else (HOST_SHAPE, 2000)))
    report = {"environment": _environment(device), "args": vars(args), "host": host, "results": results,
              "wall_s": time.perf_counter() - started}
    print(format_table(results))
    print(f"host us/call at {tuple(host['shape'])}: launcher {host['launcher_us']:.1f}, api {host['api_us']:.1f}, "
          f"softmax {host['softmax_us']:.1f}")
    if args.out:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
