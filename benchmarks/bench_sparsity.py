"""Where does sparse AdaSplash attention beat dense SDPA? Time against block density.

For each input family and logit scale ``s`` (inputs made sparser as ``s`` grows: larger logits
shrink the alpha-entmax support), one point:

* the block density of our own mask at 16x16 and at 64x64 tiles (``forward_stages`` +
  ``block_density``: the share of active mask tiles among tiles holding any valid pair; the
  selected config with its mask tile replaced, or the default config where the selected one's
  compute tiles are not multiples of that tile);
* forward and forward+backward medians (``tuner.timing.measure``: CUDA events, L2 flushed before
  every rep) of each method on the same q, k, v: ``ours-selected`` (``adasplash_tune.adasplash(...,
  backend="triton")`` with the config the loader selects), ``ours-default`` (the declared default
  config), ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``) and, at the points named
  by ``--v2``, ``upstream-v2`` (``adasplash.adasplash_v2`` of the upstream package: causal, alpha =
  1.5 only; it autotunes for 40-107 s on its first call per shape, which is run once, untimed,
  on the first v2 point's inputs; where it cannot run, the point records why);
* each method's output (and gradient) error against the fp64 oracle on batch 0, head 0.

Then, per causal mode, family (and pooled over families) and method, the crossover: the density,
interpolated linearly between neighbouring points, at which its time equals SDPA's.

Input families (v and the output gradient are randn in all):

* ``local`` -- sink + locality, the pattern of "attention sink + sliding window" models. Per head,
  white noise smoothed along the sequence by a Gaussian window (std ``--corr-len`` tokens, default
  N/64) gives unit directions w_i orthogonal to a fixed axis e. Keys: k_0 = e (the sink),
  k_j = w_j; queries q_i = s (e + w_i); both times D^(1/4), so the score of query i is s on the
  sink and on itself, and s cos(w_i, w_j) on key j: large scores cluster on the diagonal band and
  the sink column. The sink also matters for our mask: with ``mask_source="max"`` a key tile is
  active when a score is within 1/(alpha-1) of the *running* row max, so a row whose max arrives
  late (on the diagonal) keeps many early tiles; the sink puts the max in tile 0.
* ``randn`` -- q = s randn, k = randn: scores ~ N(0, s^2). Unstructured: each row's few largest
  scores land in random key tiles, so the block density stays high at any s (the contrast).
* ``captured:FILE`` -- trained attention: q, k, v of one layer saved by ``examples/train_lm.py
  --capture`` (or a sample recorded with ``ADASPLASH_TUNE_RECORD_SAMPLES``), tiled over batch and
  heads, q times s (s > 1 sharpens the trained pattern; default scales 1, 2, 4). ``--seq-len`` and
  ``--head-dim`` must be the capture's.

The JSON: ``rows``, one per (point, method, pass) -- family, s, shape, causal, density_16,
density_64, method, pass ("fwd" | "fwd+bwd"), time_ms, ratio_sdpa (time_ms over SDPA's of the same
pass at the same point) and err (fp64-oracle error: of the output for "fwd", of the gradients for
"fwd+bwd"); ``points`` (per point: densities, config source, error gate, notes such as a skipped
v2); ``skipped`` (the points not run once ``--budget`` was spent) and ``crossover``.
``benchmarks/plot_sparsity.py`` plots ratio_sdpa against density.

    python benchmarks/bench_sparsity.py                         # H200: (1,16,16384,64) bf16, both modes
    python benchmarks/bench_sparsity.py --causal --families randn,local --v2 randn:1,local:3 \\
        --budget 240 --err-budget 240 --out benchmarks/results/h200-sparsity-crossover.json
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
DEFAULT_SCALES = {"local": (1.0, 2.0, 2.25, 2.5, 3.0, 4.0, 8.0, 32.0), "randn": (1.0, 4.0, 8.0, 16.0, 32.0),
                  "captured": (1.0, 2.0, 4.0)}
SMOKE_SCALES = {"local": (1.0, 16.0), "randn": (1.0,), "captured": (1.0,)}
METHODS = ("ours-selected", "ours-default", "upstream-v2", "sdpa")
PASSES = ("fwd", "fwd+bwd")
TILES = (16, 64)
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
    p.add_argument("--v2", default="", metavar="POINTS",
                   help="also time upstream adasplash v2 (causal, alpha 1.5; its first call autotunes for "
                        "40-107 s per shape) at these points: comma list of FAMILY (all its scales), "
                        "FAMILY:S, or 'all' (default: none)")
    p.add_argument("--grad-err", choices=("all", "none"), default="all",
                   help="also check gradients against the fp64 oracle (one head)")
    p.add_argument("--budget", type=float, default=None,
                   help="total seconds: no point (and no v2 first call) starts past this; the JSON keeps "
                        "the points that finished and lists the others as skipped (default: no limit)")
    p.add_argument("--err-budget", "--time-budget", dest="err_budget", type=float, default=100.0,
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
    try:
        args.v2_points = v2_points(args.v2, args.scale_map)
    except ValueError as exc:
        p.error(f"--v2: {exc}")
    if args.budget is not None and args.budget < 0:
        p.error("--budget must be >= 0")
    args.corr_len = args.corr_len or max(1.0, args.seq_len / 64)
    args.warmup_ms = (0.0 if smoke else 25.0) if args.warmup_ms is None else args.warmup_ms
    args.rep_ms = (0.0 if smoke else 100.0) if args.rep_ms is None else args.rep_ms
    args.out = args.out if args.out is not None else (None if smoke else DEFAULT_OUT)
    return args


def v2_points(spec: str, scale_map: dict[str, Sequence[float]]) -> set[tuple[str, float]]:
    """The (family, s) points of ``--v2``: a comma list of FAMILY, FAMILY:S or 'all'. ValueError
    for a family not in the run or a scale not among its scales."""
    out: set[tuple[str, float]] = set()
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item == "all":
            out |= {(f, s) for f, scales in scale_map.items() for s in scales}
            continue
        family, scale = item, None
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                family, scale = head, float(tail)
            except ValueError:  # captured:FILE without a scale
                family, scale = item, None
        if family not in scale_map:
            raise ValueError(f"{item!r}: family {family!r} is not in --families ({', '.join(scale_map)})")
        if scale is not None and scale not in scale_map[family]:
            raise ValueError(f"{item!r}: s = {scale:g} is not among {family}'s scales "
                             f"({', '.join(f'{s:g}' for s in scale_map[family])})")
        out |= {(family, s) for s in scale_map[family] if scale is None or s == scale}
    return out


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


def upstream_v2(alpha: float, causal: bool, device: str) -> tuple[Callable[..., Any] | None, str]:
    """(``adasplash.adasplash_v2``, how it is called) or (None, why it cannot run here)."""
    if not causal:
        return None, "upstream v2 is causal only"
    if alpha != 1.5:
        return None, f"upstream v2 runs alpha = 1.5 only (alpha = {alpha:g})"
    try:
        import adasplash
    except Exception as exc:  # noqa: BLE001 - absent or broken: the run goes on without it
        return None, f"upstream adasplash not importable ({type(exc).__name__}: {str(exc)[:200]})"
    version = getattr(adasplash, "__version__", "?")
    fn = getattr(adasplash, "adasplash_v2", None)
    if fn is None:
        return None, f"upstream adasplash {version} has no adasplash_v2"
    if device != "cuda":
        return None, "upstream v2 needs CUDA"
    return fn, f"adasplash {version}: adasplash_v2(q, k, v)"


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
    """{mode: {"pooled" | family: {method: {"PASS@TILE": crossover}}}} against SDPA's time."""
    sdpa = {(r["family"], r["s"], r["causal"], r["pass"]): r["time_ms"] for r in rows if r["method"] == "sdpa"}
    out: dict[str, Any] = {}
    for causal in sorted({r["causal"] for r in rows}):
        entry: dict[str, Any] = {}
        for group in ("pooled", *families):
            subset = [r for r in rows if r["causal"] == causal and r["method"] != "sdpa"
                      and group in ("pooled", r["family"])]
            entry[group] = {
                method: {f"{pas}@{t}": crossover([
                    (r.get(f"density_{t}"), r["time_ms"], sdpa.get((r["family"], r["s"], causal, pas)))
                    for r in subset if r["method"] == method and r["pass"] == pas]) for pas in PASSES for t in TILES}
                for method in METHODS if any(r["method"] == method for r in subset)}
        out["causal" if causal else "non-causal"] = entry
    return out


# --------------------------------------------------------------------------- one point


class _Ctx:
    """What every point shares: device, dtype, timing options, the clock, the selections, v2."""

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
        self.v2_calls: dict[bool, tuple[Callable[..., Any] | None, str]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def budget_spent(self) -> bool:
        return self.args.budget is not None and self.elapsed() >= self.args.budget

    def v2(self, causal: bool) -> tuple[Callable[..., Any] | None, str]:
        if causal not in self.v2_calls:
            self.v2_calls[causal] = upstream_v2(self.args.alpha, causal, self.device)
        return self.v2_calls[causal]

    def time_ms(self, fn: Callable[[], Any]) -> float:
        from adasplash_tune.tuner.timing import measure

        return round(measure(fn, self.device, self.timing).median_ms, 4)

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


def _densities(q, k, v, alpha: float, causal: bool, scale: float, selected, default) -> dict[str, Any]:
    """Block density of our mask at each of TILES (the selected config with that mask tile, else
    the default config with it) and which config gave it, where not the selected one."""
    from adasplash_tune.kernels.attention.op import block_density, checked_config, forward_stages
    from adasplash_tune.kernels.spec import ConfigError

    n = q.shape[2]
    res: dict[str, Any] = {}
    for t in TILES:
        try:
            cfg = checked_config(selected.replace(mask_m=t, mask_n=t), q)
        except ConfigError:
            cfg = checked_config(default.replace(mask_m=t, mask_n=t), q)
            res[f"density_{t}_config"] = "default"
        st = forward_stages(q, k, v, alpha, causal, None, scale, cfg)
        res[f"density_{t}"] = round(block_density(st["mask"], n, (t, t), causal), 5)
        del st
    return res


def _oracle_errors(outputs: dict[str, tuple[Any, Any]], q, k, v, g, alpha: float, causal: bool,
                   with_grad: bool) -> dict[str, dict[str, float]]:
    """{method: {"fwd": output error, "fwd+bwd": gradient error}}: relative errors of batch 0 /
    head 0 of each method's full-problem output and gradients (max over q, k, v) vs the fp64 oracle."""
    import torch

    from adasplash_tune.kernels.reference import attention_reference, relative_error

    qs, ks, vs = (t[:1, :1].detach().to(torch.float64).requires_grad_(with_grad) for t in (q, k, v))
    ref = attention_reference(qs, ks, vs, alpha, causal)
    want = torch.autograd.grad(ref, (qs, ks, vs), g[:1, :1].to(torch.float64)) if with_grad else None
    res: dict[str, dict[str, float]] = {}
    for name, (out, grads) in outputs.items():
        res[name] = {"fwd": float(f"{relative_error(out[:1, :1], ref.detach()):.3e}")}
        if want is not None:
            res[name]["fwd+bwd"] = float(f"{max(relative_error(a[:1, :1], b) for a, b in zip(grads, want)):.3e}")
    return res


def _point(ctx: _Ctx, family: str, s: float, causal: bool,
           with_v2: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the point's record, its rows: one per method and pass)."""
    import torch
    import torch.nn.functional as F

    import adasplash_tune
    from adasplash_tune.kernels.attention.op import checked_config
    from adasplash_tune.kernels.declarations.attention import TRITON
    from adasplash_tune.kernels.reference import tolerance

    args = ctx.args
    point: dict[str, Any] = {"family": family, "s": s, "shape": list(ctx.shape), "causal": causal}
    notes: list[str] = []
    q, k, v, g = make_inputs(family, s, ctx.shape, ctx.dtype, ctx.device, args.seed, args.corr_len)
    sel = adasplash_tune.select("adasplash", q, k, v, args.alpha, causal, backend="triton")
    mode = "causal" if causal else "non-causal"
    ctx.selections.setdefault(mode, {"source": sel.source, "config": sel.config, "key": sel.key})
    point["config_source"] = sel.source
    default = checked_config(TRITON.default(), q)
    with torch.no_grad():
        point.update(_densities(q, k, v, args.alpha, causal, ctx.scale, checked_config(sel.config, q), default))

    fns: dict[str, Callable[..., Any]] = {
        "ours-selected": lambda a, b, c: adasplash_tune.adasplash(a, b, c, args.alpha, causal, backend="triton"),
        "ours-default": lambda a, b, c: adasplash_tune.adasplash(a, b, c, args.alpha, causal, backend="triton",
                                                                 config=default),
    }
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd_bwd(fn: Callable[..., Any]) -> tuple[Any, Any]:
        out = fn(qg, kg, vg)
        return out, torch.autograd.grad(out, (qg, kg, vg), g)

    times: dict[tuple[str, str], float] = {}

    def time_method(name: str, fn: Callable[..., Any]) -> None:
        with torch.no_grad():
            times[(name, "fwd")] = ctx.time_ms(lambda: fn(q, k, v))
        times[(name, "fwd+bwd")] = ctx.time_ms(lambda: fwd_bwd(fn))

    for name, fn in fns.items():
        time_method(name, fn)
    if with_v2:
        fn, how = ctx.v2(causal)
        if fn is None:
            notes.append(f"upstream-v2 skipped: {how}")
        elif ctx.budget_spent():
            notes.append(f"upstream-v2 skipped: time budget ({args.budget:g} s) spent")
        else:
            try:
                t0 = time.perf_counter()
                fwd_bwd(fn)  # the first call autotunes (forward and backward): not timed
                ctx.sync()
                point["v2_first_call_s"] = round(time.perf_counter() - t0, 2)
                time_method("upstream-v2", fn)
                fns["upstream-v2"] = fn
            except Exception as exc:  # noqa: BLE001 - upstream failing must not end the point
                log.exception("upstream v2 failed at %s s=%g", family, s)
                notes.append(f"upstream-v2 failed: {type(exc).__name__}: {str(exc)[:300]}")
                times.pop(("upstream-v2", "fwd"), None)
    time_method("sdpa", lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal))

    errors: dict[str, dict[str, float]] = {}
    if ctx.elapsed() > args.err_budget:
        point["err_skipped"] = f"error budget ({args.err_budget:g} s) spent"
    else:
        with_grad = args.grad_err == "all"
        outputs = {}
        for name, fn in fns.items():
            out, grads = fwd_bwd(fn)
            outputs[name] = (out.detach(), grads)
        errors = _oracle_errors(outputs, q, k, v, g, args.alpha, causal, with_grad)
        point["err_ok"] = all(
            e["fwd"] <= tolerance(ctx.dtype) and (not with_grad or e["fwd+bwd"] <= tolerance(ctx.dtype, grad=True))
            for name, e in errors.items() if name.startswith("ours"))  # upstream's errors: reported only
    if notes:
        point["notes"] = notes

    rows = []
    for name in (m for m in METHODS if (m, "fwd+bwd") in times):
        for pas in PASSES:
            row = {"family": family, "s": s, "shape": list(ctx.shape), "causal": causal,
                   "density_16": point["density_16"], "density_64": point["density_64"],
                   "method": name, "pass": pas, "time_ms": times[(name, pas)],
                   "ratio_sdpa": round(times[(name, pas)] / times[("sdpa", pas)], 3)}
            if pas in errors.get(name, {}):
                row["err"] = errors[name][pas]
            rows.append(row)
    return point, rows


# --------------------------------------------------------------------------- report


def _fmt(val: Any, spec: str) -> str:
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return format(val, spec)
    return "-".rjust(int(spec.split(".")[0] or 0))


def _family_label(family: str) -> str:
    return f"captured:{Path(family[9:]).name}" if family.startswith("captured:") else family


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table: one line per (point, method), both passes."""
    lines_by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = (tuple(r.get("shape") or ()), r["causal"], r["family"], r["s"], r["method"])
        lines_by.setdefault(key, {})[r["pass"]] = r
    with_shape = len({k[0] for k in lines_by}) > 1
    fam_w = max([6] + [len(_family_label(k[2])) for k in lines_by])
    head = (("shape".rjust(16) + " " if with_shape else "")
            + f"{'family':>{fam_w}} {'mode':>6} {'s':>6} {'d16':>6} {'d64':>6} {'method':>13} {'fwd ms':>8} "
              f"{'f+b ms':>8} {'fwd/sdpa':>8} {'f+b/sdpa':>8} {'fwd err':>8} {'grad err':>8}")
    lines = [head, "-" * len(head)]
    for (shape, causal, family, s, method), by in lines_by.items():
        f, fb = by.get("fwd", {}), by.get("fwd+bwd", {})
        any_row = f or fb
        lines.append(
            (",".join(map(str, shape)).rjust(16) + " " if with_shape else "")
            + f"{_family_label(family):>{fam_w}} {'causal' if causal else 'full':>6} {s:>6g} "
              f"{_fmt(any_row.get('density_16'), '6.3f')} {_fmt(any_row.get('density_64'), '6.3f')} {method:>13} "
              f"{_fmt(f.get('time_ms'), '8.3f')} {_fmt(fb.get('time_ms'), '8.3f')} "
              f"{_fmt(f.get('ratio_sdpa'), '8.2f')} {_fmt(fb.get('ratio_sdpa'), '8.2f')} "
              f"{_fmt(f.get('err'), '8.1e')} {_fmt(fb.get('err'), '8.1e')}")
    return "\n".join(lines)


def _crossover_lines(cross: dict[str, Any]) -> list[str]:
    def d(c: dict[str, Any]) -> str:
        return _fmt(c["density"], ".4f") if c["density"] is not None else "None"

    lines = ["crossover density vs SDPA, fwd+bwd at 64x64 tiles (16x16; forward only at 64x64 in brackets):"]
    for mode, entry in cross.items():
        for group, methods in entry.items():
            for method, c in methods.items():
                lines.append(f"  {mode:>10} {_family_label(group):>6} {method:>13}: {d(c['fwd+bwd@64']):>7} "
                             f"({d(c['fwd+bwd@16'])}; {c['fwd+bwd@64']['note']}) [fwd: {d(c['fwd@64'])}]")
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
        "corr_len": args.corr_len, "budget_s": args.budget, "err_budget_s": args.err_budget,
        "v2_points": sorted([f, s] for f, s in args.v2_points),
        "v2_call": {("causal" if c else "non-causal"): how for c, (_, how) in ctx.v2_calls.items()},
        "method": ("tuner.timing.measure median (CUDA events, L2 flushed before each rep; warmup "
                   f"{args.warmup_ms} ms, rep {args.rep_ms} ms); ours-selected = adasplash_tune.adasplash("
                   "backend='triton') with the selected config; ours-default = the same with the declared "
                   "default config; upstream-v2 = adasplash.adasplash_v2(q, k, v), its first (autotuning) "
                   "call untimed, on the first v2 point's inputs; sdpa = torch scaled_dot_product_attention; "
                   "fwd+bwd = forward + autograd.grad w.r.t. q, k, v; errors vs the fp64 oracle on "
                   "batch 0 head 0; ratio_sdpa = time_ms / SDPA's time_ms of the same pass and point"),
        "density": ("share of active mask tiles among tiles holding any valid (query, key) pair, from "
                    "our own block mask at 16x16 and 64x64 tiles (selected config with that mask tile; "
                    "the default config where density_T_config says so)"),
        "families_doc": {
            "local": "k_0 = e (sink), k_j = w_j, q_i = s (e + w_i), times D^(1/4); w: Gaussian-smoothed "
                     "noise along the sequence (std corr_len tokens), unit rows orthogonal to e",
            "randn": "q = s * randn, k = randn",
            "captured": "q, k, v of a trained layer (train_lm --capture), tiled over batch and heads, q * s",
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
    plan = [(causal, family, s) for causal in args.causal_modes for family in args.family_list
            for s in args.scale_map[family]]
    points: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    stopped: str | None = None
    for causal, family, s in plan:
        if stopped is None and ctx.budget_spent():
            stopped = f"time budget ({args.budget:g} s) spent after {ctx.elapsed():.1f} s"
            log.warning("%s: skipping the remaining points", stopped)
        if stopped is not None:
            skipped.append({"family": family, "s": s, "causal": causal})
            continue
        try:
            point, point_rows = _point(ctx, family, s, causal, (family, s) in args.v2_points)
        except KeyboardInterrupt:
            stopped = f"interrupted after {ctx.elapsed():.1f} s"
            log.warning("%s: writing what finished", stopped)
            skipped.append({"family": family, "s": s, "causal": causal})
            continue
        except Exception as exc:  # noqa: BLE001 - one failing point must not end the run
            log.exception("point %s s=%g causal=%s failed", family, s, causal)
            point, point_rows = {"family": family, "s": s, "shape": list(ctx.shape), "causal": causal,
                                 "error": f"{type(exc).__name__}: {str(exc)[:300]}"}, []
        points.append(point)
        rows.extend(point_rows)
        for line in table(point_rows).splitlines()[2:] or [f"{family} s={s:g}: {point.get('error')}"]:
            log.info("[%5.1f s] %s", ctx.elapsed(), line.strip())
        for note in point.get("notes", []):
            log.info("[%5.1f s] %s s=%g: %s", ctx.elapsed(), family, s, note)
        if device == "cuda":
            torch.cuda.empty_cache()
    cross = _crossovers(rows, args.family_list)
    result = {"meta": _meta(ctx), "rows": rows, "points": points, "skipped": skipped, "stopped": stopped,
              "crossover": cross, "wall_s": round(ctx.elapsed(), 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        log.info("wrote %s", args.out)
    print(table(rows))
    print("\n".join(_crossover_lines(cross)))
    if skipped:
        log.warning("%d of %d point(s) not run (%s)", len(skipped), len(plan), stopped)
    failed = [p for p in points if "error" in p or p.get("err_ok") is False]
    if failed:
        log.error("%d point(s) failed or exceeded the error tolerance", len(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
