"""Where does sparse AdaSplash attention beat dense SDPA? Time against block density.

For each input family and logit scale ``s`` (inputs made sparser as ``s`` grows: larger logits
shrink the alpha-entmax support), one point:

* the block density of our own mask (``forward_stages`` + ``block_density``: the share of active
  mask tiles among tiles holding any valid pair, at the selected config's mask tile);
* forward and forward+backward medians (``tuner.timing.measure``: CUDA events, L2 flushed before
  every rep) of ``adasplash_tune.adasplash(..., backend="triton")`` with the config the loader
  selects, and of ``torch.nn.functional.scaled_dot_product_attention`` on the same q, k, v;
* our output (and gradient) error against the fp64 oracle on batch 0, head 0.

Then, per causal mode and family (and pooled over families), the crossover: the density,
interpolated linearly between neighbouring points, at which our fwd+bwd time equals SDPA's.

Input families (v and the output gradient are randn in both):

* ``local`` -- sink + locality, the pattern of "attention sink + sliding window" models. Per head,
  white noise smoothed along the sequence by a Gaussian window (std ``--corr-len`` tokens, default
  N/64) gives unit directions w_i orthogonal to a fixed axis e. Keys: k_0 = e (the sink),
  k_j = w_j; queries q_i = s (e + w_i); both times D^(1/4), so the score of query i is s on the
  sink and on itself, and s cos(w_i, w_j) on key j: large scores cluster on the diagonal band and
  the sink column. The sink also matters for our mask: with the default ``mask_source="max"`` a
  key tile is active when a score is within 1/(alpha-1) of the *running* row max, so a row whose
  max arrives late (on the diagonal) keeps many early tiles; the sink puts the max in tile 0.
* ``randn`` -- q = s randn, k = randn: scores ~ N(0, s^2). Unstructured: each row's few largest
  scores land in random key tiles, so the block density stays high at any s (reported as the
  contrast).
* ``captured:FILE`` -- trained attention: q, k, v of one layer saved by ``examples/train_lm.py
  --capture`` (or a sample recorded with ``ADASPLASH_TUNE_RECORD_SAMPLES``), tiled over batch and
  heads, q times s (s > 1 sharpens the trained pattern; default scales 1, 2, 4). ``--seq-len`` and
  ``--head-dim`` must be the capture's.

    python benchmarks/bench_sparsity.py                         # H200: (1,16,16384,64) bf16, ~2 min
    python benchmarks/bench_sparsity.py --non-causal --families local --scales 2,3,8
    python benchmarks/bench_sparsity.py --cpu-smoke --out /tmp/sp.json   # CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("bench_sparsity")

FAMILIES = ("local", "randn")
DEFAULT_SCALES = {"local": (1.0, 2.0, 2.25, 2.5, 3.0, 4.0, 8.0, 32.0), "randn": (1.0, 8.0, 64.0),
                  "captured": (1.0, 2.0, 4.0)}
SMOKE_SCALES = {"local": (1.0, 16.0), "randn": (1.0,), "captured": (1.0,)}
DEFAULT_OUT = "benchmarks/results/h200-sparsity.json"
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


# --------------------------------------------------------------------------- arguments


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default 1 (smoke 1)")
    p.add_argument("--heads", type=int, default=None, help="default 16 (smoke 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 16384 (smoke 128)")
    p.add_argument("--head-dim", type=int, default=None, help="default 64 (smoke 16)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--causal", dest="causal", action="store_const", const="causal",
                      help="causal only (default: both modes)")
    mode.add_argument("--non-causal", dest="causal", action="store_const", const="non-causal",
                      help="non-causal only (default: both modes)")
    p.add_argument("--dtype", default=None, help="bf16 (default) | fp16 | fp32 (smoke: fp32)")
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--scales", default=None,
                   help="comma list of logit scales s for every family (default: per family, "
                        + "; ".join(f"{f}: {','.join(map(str, s))}" for f, s in DEFAULT_SCALES.items()) + ")")
    p.add_argument("--corr-len", type=float, default=None, help="local family: correlation length in tokens "
                   "(std of the Gaussian smoothing window; default N/64)")
    p.add_argument("--grad-err", choices=("all", "none"), default="all",
                   help="also check gradients against the fp64 oracle (one head)")
    p.add_argument("--density-16", action="store_true",
                   help="also report the density at 16x16 mask tiles (always on with --cpu-smoke)")
    p.add_argument("--time-budget", type=float, default=100.0,
                   help="seconds: past this, the remaining points skip the fp64 oracle checks")
    p.add_argument("--warmup-ms", type=float, default=None, help="timing warm-up (default 25; smoke 0)")
    p.add_argument("--rep-ms", type=float, default=None, help="timing repetition time (default 100; smoke 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"JSON file (default {DEFAULT_OUT}; smoke: none)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes (1,2,128,16) in float32 on CPU under the Triton interpreter")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.batch = args.batch or 1
    args.heads = args.heads or (2 if smoke else 16)
    args.seq_len = args.seq_len or (128 if smoke else 16384)
    args.head_dim = args.head_dim or (16 if smoke else 64)
    dtype = args.dtype or ("fp32" if smoke else "bf16")
    if dtype not in _DTYPES:
        p.error(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    args.dtype = _DTYPES[dtype]
    args.causal_modes = {"causal": (True,), "non-causal": (False,)}.get(args.causal, (False, True))
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in args.family_list if f not in FAMILIES and not f.startswith("captured:")]
    if bad or not args.family_list:
        p.error(f"--families: unknown {bad}; choose from {', '.join(FAMILIES)} or captured:FILE")
    missing = [f for f in args.family_list if f.startswith("captured:") and not Path(f[9:]).is_file()]
    if missing:
        p.error(f"--families: no such capture file: {', '.join(f[9:] for f in missing)}")
    if args.scales:
        try:
            scales = tuple(float(s) for s in args.scales.split(","))
        except ValueError:
            p.error(f"--scales must be a comma list of numbers, got {args.scales!r}")
        if any(s <= 0 for s in scales):
            p.error("--scales must be positive")
        args.scale_map = {f: scales for f in args.family_list}
    else:
        table = SMOKE_SCALES if smoke else DEFAULT_SCALES
        args.scale_map = {f: table["captured" if f.startswith("captured:") else f] for f in args.family_list}
    args.density_16 = args.density_16 or smoke
    args.corr_len = args.corr_len or max(1.0, args.seq_len / 64)
    args.warmup_ms = (0.0 if smoke else 25.0) if args.warmup_ms is None else args.warmup_ms
    args.rep_ms = (0.0 if smoke else 100.0) if args.rep_ms is None else args.rep_ms
    args.out = args.out if args.out is not None else (None if smoke else DEFAULT_OUT)
    return args


# --------------------------------------------------------------------------- inputs


def make_inputs(family: str, scale: float, shape: Sequence[int], dtype, device: str, seed: int,
                corr_len: float) -> tuple[Any, Any, Any, Any]:
    """(q, k, v, grad_out) of ``shape`` (B, H, N, D) for one input family (module docstring; the
    families are the tuner's, ``adasplash_tune.tuner.inputs``)."""
    import torch

    from adasplash_tune.tuner.inputs import recorded_inputs, synthetic_inputs

    b, h, n, d = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    if family.startswith("captured:"):
        q, k, v, _ = recorded_inputs(family[9:], shape, h)
        q, k, v = (t.to(device=device, dtype=torch.float32) for t in (scale * q.float(), k, v))
    elif family in FAMILIES:
        q, k = synthetic_inputs(family, scale, shape, h, gen, device, corr_len)
        v = torch.randn(b, h, n, d, generator=gen, device=device)
    else:
        raise ValueError(f"unknown input family {family!r}; choose from {', '.join(FAMILIES)} or captured:FILE")
    grad = torch.randn(b, h, n, d, generator=gen, device=device)
    return tuple(t.to(dtype).contiguous() for t in (q, k, v, grad))  # type: ignore[return-value]


# --------------------------------------------------------------------------- crossover


def crossover(points: Sequence[tuple[float, float, float]]) -> dict[str, Any]:
    """Density at which ours becomes faster than SDPA, from (density, ours_ms, sdpa_ms) points.

    Walking from the densest point to the sparsest, the first change from "ours slower" to "ours
    faster or equal" is interpolated linearly in density on the difference ours - sdpa. Returns
    ``{"density": float | None, "note": str}``; None when ours never becomes faster in the measured
    range, or is already faster at the densest point (the note says which)."""
    pts = sorted(((float(d), float(a) - float(b)) for d, a, b in points
                  if all(isinstance(x, (int, float)) and math.isfinite(x) for x in (d, a, b))),
                 key=lambda p: -p[0])
    if not pts:
        return {"density": None, "note": "no timed points"}
    if pts[0][1] <= 0:
        return {"density": None, "note": f"ours already faster at the densest point ({pts[0][0]:.3f})"}
    for (d1, g1), (d2, g2) in zip(pts, pts[1:]):
        if g1 > 0 >= g2:
            at = d1 if d1 == d2 else d1 + (d2 - d1) * g1 / (g1 - g2)
            return {"density": round(at, 4), "note": f"interpolated between densities {d1:.4f} and {d2:.4f}"}
    return {"density": None, "note": f"ours never faster down to density {pts[-1][0]:.4f}"}


def _crossovers(rows: list[dict[str, Any]], families: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for causal in sorted({r["causal"] for r in rows}):
        mine = [r for r in rows if r["causal"] == causal and "error" not in r]
        entry: dict[str, Any] = {}
        for name, subset in [("pooled", mine)] + [(f, [r for r in mine if r["family"] == f]) for f in families]:
            entry[name] = {
                "fwdbwd": crossover([(r["density"], r["ours_fwdbwd_ms"], r["sdpa_fwdbwd_ms"]) for r in subset]),
                "fwd": crossover([(r["density"], r["ours_fwd_ms"], r["sdpa_fwd_ms"]) for r in subset]),
            }
        out["causal" if causal else "non-causal"] = entry
    return out


# --------------------------------------------------------------------------- one point


class _Ctx:
    """What every point shares: device, dtype, timing options, the clock and the selections."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        import torch

        from adasplash_tune.tuner.timing import TimingOptions

        self.args, self.device = args, device
        self.dtype = getattr(torch, args.dtype)
        self.shape = (args.batch, args.heads, args.seq_len, args.head_dim)
        self.scale = 1.0 / math.sqrt(args.head_dim)
        smoke = args.cpu_smoke
        self.timing = TimingOptions(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                                    min_reps=1 if smoke else 5, max_reps=1 if smoke else 500)
        self.start = time.perf_counter()
        self.selections: dict[str, dict[str, Any]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_ms(self, fn: Callable[[], Any]) -> float:
        from adasplash_tune.tuner.timing import measure

        return round(measure(fn, self.device, self.timing).median_ms, 4)


def _density(q, k, v, alpha: float, causal: bool, scale: float, cfg, fine: bool) -> dict[str, float]:
    from adasplash_tune.kernels.attention.op import block_density, forward_stages

    n = q.shape[2]
    st = forward_stages(q, k, v, alpha, causal, None, scale, cfg)
    res = {"density": round(block_density(st["mask"], n, (cfg["mask_m"], cfg["mask_n"]), causal), 5)}
    del st
    if fine:
        st = forward_stages(q, k, v, alpha, causal, None, scale, cfg.replace(mask_m=16, mask_n=16))
        res["density_16"] = round(block_density(st["mask"], n, (16, 16), causal), 5)
    return res


def _oracle_errors(out, grads, q, k, v, g, alpha: float, causal: bool, with_grad: bool) -> dict[str, float]:
    """Relative errors of batch 0 / head 0 of our full-problem output and gradients (fp64 oracle)."""
    import torch

    from adasplash_tune.kernels.reference import attention_reference, relative_error

    qs, ks, vs = (t[:1, :1].detach().to(torch.float64).requires_grad_(with_grad) for t in (q, k, v))
    ref = attention_reference(qs, ks, vs, alpha, causal)
    res = {"fwd_err": float(f"{relative_error(out[:1, :1], ref):.3e}")}
    if with_grad:
        want = torch.autograd.grad(ref, (qs, ks, vs), g[:1, :1].to(torch.float64))
        res["grad_err"] = float(f"{max(relative_error(a[:1, :1], b) for a, b in zip(grads, want)):.3e}")
    return res


def _point(ctx: _Ctx, family: str, s: float, causal: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import adasplash_tune
    from adasplash_tune.kernels.attention.op import checked_config
    from adasplash_tune.kernels.reference import tolerance

    args = ctx.args
    row: dict[str, Any] = {"family": family, "s": s, "causal": causal}
    q, k, v, g = make_inputs(family, s, ctx.shape, ctx.dtype, ctx.device, args.seed, args.corr_len)
    sel = adasplash_tune.select("adasplash", q, k, v, args.alpha, causal, backend="triton")
    mode = "causal" if causal else "non-causal"
    ctx.selections.setdefault(mode, {"source": sel.source, "config": sel.config, "key": sel.key})
    row["config_source"] = sel.source
    cfg = checked_config(sel.config, q)
    with torch.no_grad():
        row.update(_density(q, k, v, args.alpha, causal, ctx.scale, cfg, args.density_16))

    def ours(a, b, c):
        return adasplash_tune.adasplash(a, b, c, args.alpha, causal, backend="triton")

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd_bwd(fn):
        out = fn(qg, kg, vg)
        return out, torch.autograd.grad(out, (qg, kg, vg), g)

    for name, fn in (("ours", ours), ("sdpa", sdpa)):
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = ctx.time_ms(lambda fn=fn: fn(q, k, v))
        row[f"{name}_fwdbwd_ms"] = ctx.time_ms(lambda fn=fn: fwd_bwd(fn))
    row["ratio_fwd"] = round(row["ours_fwd_ms"] / row["sdpa_fwd_ms"], 3)
    row["ratio_fwdbwd"] = round(row["ours_fwdbwd_ms"] / row["sdpa_fwdbwd_ms"], 3)

    if ctx.elapsed() > args.time_budget:
        row["err_skipped"] = f"time budget ({args.time_budget:.0f} s) spent"
    else:
        with_grad = args.grad_err == "all"
        out, grads = fwd_bwd(ours)
        row.update(_oracle_errors(out.detach(), grads, q, k, v, g, args.alpha, causal, with_grad))
        row["err_ok"] = row["fwd_err"] <= tolerance(ctx.dtype) and (
            not with_grad or row["grad_err"] <= tolerance(ctx.dtype, grad=True))
    return row


# --------------------------------------------------------------------------- report


def _fmt(val: Any, spec: str) -> str:
    return format(val, spec) if isinstance(val, (int, float)) and not isinstance(val, bool) else "-"


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    head = (f"{'family':>6} {'mode':>6} {'s':>6} {'density':>7} {'d16':>6} {'ours fwd':>9} {'sdpa fwd':>9} "
            f"{'ours f+b':>9} {'sdpa f+b':>9} {'ratio':>7} {'fwd err':>8} {'grad err':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mode = "causal" if r["causal"] else "full"
        if "error" in r:
            lines.append(f"{r['family']:>6} {mode:>6} {r['s']:>6g}  error: {r['error']}")
            continue
        lines.append(
            f"{r['family']:>6} {mode:>6} {r['s']:>6g} {_fmt(r.get('density'), '7.4f')} "
            f"{_fmt(r.get('density_16'), '6.3f')} {_fmt(r.get('ours_fwd_ms'), '9.3f')} "
            f"{_fmt(r.get('sdpa_fwd_ms'), '9.3f')} {_fmt(r.get('ours_fwdbwd_ms'), '9.3f')} "
            f"{_fmt(r.get('sdpa_fwdbwd_ms'), '9.3f')} {_fmt(r.get('ratio_fwdbwd'), '7.2f')} "
            f"{_fmt(r.get('fwd_err'), '8.1e')} {_fmt(r.get('grad_err'), '8.1e')}")
    return "\n".join(lines)


def _crossover_lines(cross: dict[str, Any]) -> list[str]:
    lines = ["crossover density (ours fwd+bwd == sdpa fwd+bwd; forward only in brackets):"]
    for mode, entry in cross.items():
        for name, c in entry.items():
            d, f = c["fwdbwd"]["density"], c["fwd"]["density"]
            lines.append(f"  {mode:>10} {name:>6}: {_fmt(d, '.4f') if d is not None else 'None':>7} "
                         f"({c['fwdbwd']['note']}) [fwd: {_fmt(f, '.4f') if f is not None else 'None'}]")
    return lines


def _meta(ctx: _Ctx) -> dict[str, Any]:
    import torch
    import triton

    args = ctx.args
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "device": ctx.device,
        "device_name": torch.cuda.get_device_name() if ctx.device == "cuda" else platform.processor() or "cpu",
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "shape": list(ctx.shape), "dtype": args.dtype, "alpha": args.alpha, "seed": args.seed,
        "families": args.family_list, "scales": {f: list(s) for f, s in args.scale_map.items()},
        "corr_len": args.corr_len,
        "method": ("tuner.timing.measure median (CUDA events, L2 flushed before each rep; warmup "
                   f"{args.warmup_ms} ms, rep {args.rep_ms} ms); ours = adasplash_tune.adasplash("
                   "backend='triton') with the selected config; sdpa = torch scaled_dot_product_attention; "
                   "fwd+bwd = forward + autograd.grad w.r.t. q, k, v; errors vs the fp64 oracle on "
                   "batch 0 head 0"),
        "density": ("share of active mask tiles among tiles holding any valid (query, key) pair, "
                    "from our own block mask at the selected config's mask tile"),
        "families_doc": {
            "local": "k_0 = e (sink), k_j = w_j, q_i = s (e + w_i), times D^(1/4); w: Gaussian-smoothed "
                     "noise along the sequence (std corr_len tokens), unit rows orthogonal to e",
            "randn": "q = s * randn, k = randn",
        },
        "selection": ctx.selections,
    }
    return meta


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.cpu_smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            log.error("--cpu-smoke needs TRITON_INTERPRET=1 before triton is imported: run it in a fresh process")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device: use --cpu-smoke")
        return 2
    ctx = _Ctx(args, device)
    rows: list[dict[str, Any]] = []
    for causal in args.causal_modes:
        for family in args.family_list:
            for s in args.scale_map[family]:
                try:
                    row = _point(ctx, family, s, causal)
                except Exception as exc:  # noqa: BLE001 - one failing point must not end the run
                    log.exception("point %s s=%g causal=%s failed", family, s, causal)
                    row = {"family": family, "s": s, "causal": causal,
                           "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                rows.append(row)
                log.info("[%5.1f s] %s", ctx.elapsed(), table([row]).splitlines()[-1].strip())
                if device == "cuda":
                    torch.cuda.empty_cache()
    cross = _crossovers(rows, args.family_list)
    result = {"meta": _meta(ctx), "rows": rows, "crossover": cross, "wall_s": round(ctx.elapsed(), 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        log.info("wrote %s", args.out)
    print(table(rows))
    print("\n".join(_crossover_lines(cross)))
    failed = [r for r in rows if "error" in r or r.get("err_ok") is False]
    if failed:
        log.error("%d point(s) failed or exceeded the error tolerance", len(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
