"""Benchmark the Triton alpha-entmax against torch.softmax and the upstream `adasplash` entmax.

For each (rows x cols) case and alpha it times (median of triton.testing.do_bench):
  * our kernel with the declared default config,
  * a small sweep of launch configs (block_n, rows, num_warps) at the default accuracy knobs
    (best reported),
  * on the best launch config: the niter cap, the early-exit step tau_tol and the start tau_init
    one at a time, and the fastest config that passes the dtype's forward tolerance against the
    fp64 oracle,
  * a copy y.copy_(x) (the bandwidth floor) and torch.softmax,
  * upstream `adasplash.triton_entmax` with its defaults, when importable.
Every timed output's relative error against entmax_reference is measured on a row slice.

    python benchmarks/bench_entmax.py --out results/entmax_h200.json        # on a GPU
    python benchmarks/bench_entmax.py --cases 4096x8192 --alpha 1.5,2,1.3 --sweep-alpha 1.5 \
        --out /tmp/e.json                                                  # ~1 min, mostly compiling
    python benchmarks/bench_entmax.py --cpu-smoke --out /tmp/smoke.json    # CPU, interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

GPU_CASES = ((4096, 8192), (8192, 1024))
SMOKE_CASES = ((3, 200), (4, 64))
ALPHAS = (1.5, 2.0, 1.3)
#: Accuracy knobs swept one at a time on the best launch config (the others at their defaults).
KNOB_SWEEPS = {
    "niter": (1, 2, 3, 4, 6, 10),
    "tau_tol": (0.3, 0.1, 0.03, 0.01, 0.003, 0.0),
    "tau_init": ("lo",),
}
SMOKE_KNOB_SWEEPS = {"niter": (2, 10), "tau_tol": (0.1, 0.0), "tau_init": ("lo",)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on CPU tensors under TRITON_INTERPRET=1 (checks the script runs)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--alpha", default=None, help="comma list of alphas (default 1.5,2.0,1.3)")
    parser.add_argument("--cases", default=None, help="comma list of ROWSxCOLS (default 4096x8192,8192x1024)")
    parser.add_argument("--scale", type=float, default=1.0, help="inputs are scale * randn")
    parser.add_argument("--sweep", default="small", choices=("none", "small", "medium", "wide"),
                        help="launch-config sweep size (accuracy knobs at their defaults); small: "
                             "block_n tile and tile/2, rows 1/2, num_warps 4/8/16; medium: block_n down "
                             "to tile/8, rows up to 4")
    parser.add_argument("--sweep-alpha", default=None,
                        help="comma list: only these alphas get the launch-config sweep (default: all); "
                             "the others time the default config and the accuracy knobs")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--ref-rows", type=int, default=256, help="rows compared with the fp64 oracle")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- helpers


def _timer(device: str, smoke: bool) -> Callable[..., float]:
    """fn -> median milliseconds: do_bench on a GPU, a short perf_counter loop on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        def gpu_time(fn: Callable[[], Any], grad_to_none=None) -> float:
            return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))

        return gpu_time

    reps = 1 if smoke else 5

    def cpu_time(fn: Callable[[], Any], grad_to_none=None) -> float:
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return cpu_time


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _sweep_configs(spec, rows: int, cols: int, size: str) -> list[dict[str, Any]]:
    """Launch configs around the default (accuracy knobs left at their defaults)."""
    if size == "none":
        return []
    tile = min(_pow2(cols), 16384)
    blocks = [b for b in (tile, tile // 2, tile // 4, tile // 8) if b >= 64][: {"small": 2, "medium": 4}.get(size, 3)]
    rows_choices = {"small": (1, 2), "medium": (1, 2, 4)}.get(size, (1, 2, 4, 8))
    warps = (4, 8, 16) if size in ("small", "medium") else (2, 4, 8, 16, 32)
    stages = (1,) if size in ("small", "medium") else (1, 2)
    context = {"rows": rows, "cols": cols}
    out = []
    for block_n in blocks:
        for r in rows_choices:
            if r * block_n > 16384:
                continue
            for w in warps:
                for s in stages:
                    values = {"block_n": block_n, "rows": r, "num_warps": w, "num_stages": s}
                    if spec.is_valid({**spec.default().as_dict(), **values}, context):
                        out.append(values)
    return out


def _smoke_configs(spec, rows: int, cols: int, size: str) -> list[dict[str, Any]]:
    if size == "none":
        return []
    return [{"block_n": 64, "rows": 2, "num_warps": 2}, {"block_n": 256, "rows": 1, "num_warps": 4}]


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


def _gbps(rows: int, cols: int, elem_bytes: int, ms: float, passes: int = 2) -> float:
    """Effective bandwidth for ``passes`` full-tensor transfers (read x + write y by default)."""
    return passes * rows * cols * elem_bytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- one case


def bench_case(rows: int, cols: int, alpha: float, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    from adasplash_tune.kernels.entmax import entmax_backward, entmax_forward
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
    elem = x.element_size()

    def err(out) -> float:
        return relative_error(out[:ref_rows], ref)

    def measure(values: dict[str, Any]) -> dict[str, Any]:
        cfg = spec.validate(values)
        row: dict[str, Any] = {"config": cfg.as_dict()}
        try:
            row["err"] = err(entmax_forward(x, alpha, cfg))
            row["ms"] = timer(lambda: entmax_forward(x, alpha, cfg))
            row["gbps"] = _gbps(rows, cols, elem, row["ms"])
            row["ok"] = row["err"] <= tol
        except Exception as exc:  # out of resources, compile failure: record, go on
            row.update(ms=None, err=None, ok=False, failed=f"{type(exc).__name__}: {exc}"[:300])
        return row

    result: dict[str, Any] = {"rows": rows, "cols": cols, "alpha": alpha, "dtype": args.dtype, "tolerance": tol}

    y = torch.empty_like(x)
    result["floor"] = {"what": "y.copy_(x)", "ms": timer(lambda: y.copy_(x))}
    result["floor"]["gbps"] = _gbps(rows, cols, elem, result["floor"]["ms"])
    result["softmax"] = {"ms": timer(lambda: torch.softmax(x, dim=-1))}
    result["softmax"]["gbps"] = _gbps(rows, cols, elem, result["softmax"]["ms"])

    default = measure({})
    result["ours_default"] = default

    size = args.sweep
    if args.sweep_alpha and alpha not in [float(a) for a in args.sweep_alpha.split(",")]:
        size = "none"
    configs = (_smoke_configs if args.cpu_smoke else _sweep_configs)(spec, rows, cols, size)
    sweep = [measure(values) for values in configs]
    result["sweep"] = sweep
    best = min([default] + sweep, key=_ms_key)
    result["ours_best"] = best

    knobs = SMOKE_KNOB_SWEEPS if args.cpu_smoke else KNOB_SWEEPS
    defaults = spec.default().as_dict()
    base = {k: v for k, v in best["config"].items() if k not in knobs}
    result["knob_sweep"] = [{"knob": knob, "value": value, **measure({**base, knob: value})}
                            for knob, values in knobs.items() for value in values if value != defaults[knob]]
    passing = [r for r in result["knob_sweep"] + [best] if r.get("ok")]
    result["ours_best_gated"] = min(passing, key=_ms_key) if passing else None

    if args.backward:
        result["backward"] = _bench_backward(x, alpha, spec, [default["config"], best["config"]], timer,
                                             entmax_forward, entmax_backward)

    upstream, how = (None, "skipped in --cpu-smoke") if args.cpu_smoke else _upstream_entmax()
    if upstream is None:
        result["upstream"] = {"skipped": how}
    else:
        try:
            out = upstream(x, alpha=alpha)
            ms = timer(lambda: upstream(x, alpha=alpha))
            result["upstream"] = {"call": how, "ms": ms, "err": err(out), "gbps": _gbps(rows, cols, elem, ms)}
        except Exception as exc:
            result["upstream"] = {"call": how, "failed": f"{type(exc).__name__}: {exc}"[:300]}
    return result


def _bench_backward(x, alpha, spec, configs, timer, fwd, bwd) -> list[dict[str, Any]]:
    """Forward + backward time (kernel launchers, no autograd bookkeeping) per config."""
    import torch

    grad = torch.randn_like(x)
    rows = []
    for values in configs:
        cfg = spec.validate(values)
        try:
            ms = timer(lambda: bwd(fwd(x, alpha, cfg), grad, alpha, cfg))
            rows.append({"config": cfg.as_dict(), "fwd_bwd_ms": ms})
        except Exception as exc:
            rows.append({"config": cfg.as_dict(), "failed": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


# --------------------------------------------------------------------------- report


def _fmt_ms(row: dict[str, Any] | None) -> str:
    if not row or row.get("ms") is None:
        return "-"
    err = row.get("err")
    return f"{row['ms']:.4f}" + (f" ({err:.0e})" if err is not None else "")


_SHOWN = ("block_n", "rows", "num_warps", "num_stages", "niter", "tau_tol", "tau_init")


def _cfg_txt(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={config[k]}" for k in _SHOWN if k in config)


def format_table(results: list[dict[str, Any]]) -> str:
    """The summary (one line per case) and every measured config of each case."""
    head = ("case", "alpha", "copy ms", "softmax ms", "ours default ms (err)", "ours best ms (err)",
            "best gated ms (err)", "upstream ms (err)")
    lines = [" | ".join(head)]
    for r in results:
        gated = r.get("ours_best_gated")
        lines.append(" | ".join((
            f"{r['rows']}x{r['cols']}", f"{r['alpha']:g}", f"{r['floor']['ms']:.4f}", f"{r['softmax']['ms']:.4f}",
            _fmt_ms(r["ours_default"]), _fmt_ms(r["ours_best"]), _fmt_ms(gated) if gated else "none passes",
            _fmt_ms(r["upstream"]) if "ms" in r["upstream"] else "skipped",
        )))
    for r in results:
        lines.append(f"\n{r['rows']}x{r['cols']} alpha={r['alpha']:g} {r['dtype']} (tolerance {r['tolerance']:g}):")
        rows = [("default", r["ours_default"])] + [("sweep", row) for row in r["sweep"]]
        rows += [(f"{row['knob']}", row) for row in r.get("knob_sweep", [])]
        for tag, row in rows:
            flag = "" if row.get("ok") else "  FAILS" if row.get("err") is not None else "  " + row.get("failed", "")
            lines.append(f"  {tag:8s} {_fmt_ms(row):>18s}  {_cfg_txt(row['config'])}{flag}")
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
    alphas = tuple(float(a) for a in args.alpha.split(",")) if args.alpha else ALPHAS

    results = []
    for rows, cols in cases:
        for alpha in alphas:
            results.append(bench_case(rows, cols, alpha, args, device))
            print(f"done {rows}x{cols} alpha={alpha:g}", file=sys.stderr, flush=True)
    report = {"environment": _environment(device), "args": vars(args), "results": results}
    print(format_table(results))
    if args.out:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's package, uninstalled
    sys.exit(main())
