"""Stage by stage: where one AdaSplash call spends its time, against SDPA in the same run.

For each problem (shape, causal, input family and logit scale) and each config variant:

* the tau stage alone (one dense pass + sparse Halley sweeps), with the kernel's own counters:
  the Halley sweeps actually run per program and, per sweep, the share of the key tiles visited
  (``tau_visited``: tiles visited / tiles a dense sweep visits);
* the tile lists, the sparse forward, the dQ and the dK/dV kernels alone;
* the whole forward and forward+backward through ``adasplash_tune.adasplash``;
* the block density of the variant's mask (share of active mask tiles among tiles holding any
  valid pair) and our output / gradient errors against the fp64 oracle (batch 0, head 0);

and SDPA's forward and forward+backward on the same tensors. Input families are those of
bench_sparsity.py (``randn`` with q scaled by s, ``local`` = sink + locality); ``captured:FILE``
reads q/k/v saved by examples/train_lm.py --capture.

    python benchmarks/bench_stages.py --out benchmarks/results/h200-stages.json          # H200
    python benchmarks/bench_stages.py --problems 1,16,16384,64,causal --families randn:1,randn:16
    python benchmarks/bench_stages.py --variants '{"fine": {"mask_m": 16, "mask_n": 16}}'
    python benchmarks/bench_stages.py --cpu-smoke                                         # CPU
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

log = logging.getLogger("bench_stages")

DEFAULT_PROBLEMS = ("1,16,16384,64,causal", "4,16,4096,64,full", "4,16,4096,64,causal")
DEFAULT_FAMILIES = ("randn:1", "randn:16", "local:2")
SMOKE_PROBLEMS = ("1,2,96,16,causal", "1,2,80,16,full")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default=None,
                   help="';'-separated B,H,N,D,causal|full (default: " + "; ".join(DEFAULT_PROBLEMS) + ")")
    p.add_argument("--families", default=None,
                   help="comma list of family:scale (randn:s, local:s) or captured:FILE (default: "
                        + ",".join(DEFAULT_FAMILIES) + ")")
    p.add_argument("--variants", default=None,
                   help="JSON object name -> config overrides of the default (the default is always run)")
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="bf16 (default; smoke fp32)")
    p.add_argument("--no-bwd", action="store_true", help="forward stages only")
    p.add_argument("--no-errors", action="store_true", help="skip the fp64 oracle checks")
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds; the remaining points are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prewarm", type=int, default=0, metavar="WORKERS",
                   help="compile every kernel first in this many processes (batch 1, same shapes: the "
                        "same Triton cache keys), so the timed run loads them from the disk cache")
    p.add_argument("--out", default=None, help="JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.problem_list = []
    for text in (args.problems.split(";") if args.problems else (SMOKE_PROBLEMS if smoke else DEFAULT_PROBLEMS)):
        parts = [t.strip() for t in text.split(",")]
        if len(parts) != 5 or parts[4] not in ("causal", "full"):
            p.error(f"--problems: expected B,H,N,D,causal|full, got {text!r}")
        try:
            shape = tuple(int(t) for t in parts[:4])
        except ValueError:
            p.error(f"--problems: B,H,N,D must be integers, got {text!r}")
        args.problem_list.append((shape, parts[4] == "causal"))
    args.family_list = []
    for text in (args.families.split(",") if args.families else
                 (("randn:1", "randn:16", "local:2") if smoke else DEFAULT_FAMILIES)):
        name, _, value = text.partition(":")
        if name == "captured":
            args.family_list.append((name, value))
        elif name in ("randn", "local"):
            try:
                args.family_list.append((name, float(value or 1.0)))
            except ValueError:
                p.error(f"--families: bad scale in {text!r}")
        else:
            p.error(f"--families: unknown family {name!r} (randn, local, captured)")
    try:
        args.variant_map = json.loads(args.variants) if args.variants else {}
    except json.JSONDecodeError as exc:
        p.error(f"--variants is not JSON: {exc}")
    args.dtype = _DTYPES[args.dtype or ("fp32" if smoke else "bf16")]
    args.warmup_ms = (0.0 if smoke else 10.0) if args.warmup_ms is None else args.warmup_ms
    args.rep_ms = (0.0 if smoke else 50.0) if args.rep_ms is None else args.rep_ms
    return args


# --------------------------------------------------------------------------- inputs


def _inputs(family: str, value: Any, shape, dtype, device: str, seed: int):
    import torch

    if family == "captured":
        from safetensors.torch import load_file

        data = load_file(str(value))
        q, k, v = (data[n].to(device=device, dtype=dtype).contiguous() for n in ("q", "k", "v"))
        gen = torch.Generator(device=device).manual_seed(seed)
        grad = torch.randn(q.shape, generator=gen, device=device).to(dtype)
        return q, k, v, grad
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sparsity import make_inputs

    return make_inputs(family, float(value), shape, dtype, device, seed, max(1.0, shape[2] / 64))


# --------------------------------------------------------------------------- stages


def _dense_tiles(n: int, bm: int, bns: int, causal: bool, rows: int) -> int:
    """Key tiles one dense Halley sweep visits over all programs (for the visited share)."""
    total = 0
    for pid in range(math.ceil(n / bm)):
        stop = min(pid * bm + bm, n) if causal else n
        total += math.ceil(stop / bns)
    return total * rows


def stage_calls(q, k, v, grad, alpha: float, causal: bool, cfg) -> dict[str, Callable[[], Any]]:
    """The stages of one config as zero-argument calls on warm inputs, each fed by the stages
    before it (run once here): ``tau`` (with the mask and the tile lists it leaves), ``lists_fwd``,
    ``fwd``, then ``lists_bwd`` and ``bwd_kv`` with ``bwd_q`` (split mode) or ``bwd_kv`` alone (the
    fused kernel: dK, dV and dQ by atomics); also ``tau_fwd_fused`` and ``fwd_train`` where the
    config's modes have them. The kernel counters and the mask are in ``calls["_state"]``."""
    import torch

    from adasplash_tune.kernels.attention import backward as bw
    from adasplash_tune.kernels.attention import op
    from adasplash_tune.kernels.attention.common import Geometry
    from adasplash_tune.kernels.attention.forward import sparse_forward
    from adasplash_tune.kernels.attention.mask import tile_lists
    from adasplash_tune.kernels.attention.tau import solve_tau, solve_tau_forward, tau_scratch_size

    scale = 1.0 / math.sqrt(q.shape[-1])
    geo = Geometry.of(q, k)
    mask = op._new_mask(geo, cfg, q.device)
    scratch = torch.empty(tau_scratch_size(geo, cfg), dtype=torch.int32, device=q.device)
    calls: dict[str, Any] = {"tau": lambda: solve_tau(q, k, None, alpha, scale, causal, cfg, mask, scratch)}
    tau = calls["tau"]()
    calls["_state"] = {"geo": geo, "mask": mask, "scratch": scratch, "scale": scale}
    if cfg["fwd_mode"] == "fused":  # tau + mask + forward in one launch; the staged stages below for comparison
        calls["tau_fwd_fused"] = lambda: solve_tau_forward(q, k, v, None, alpha, scale, causal, cfg, mask, scratch)
    tile = (cfg["mask_m"], cfg["mask_n"])
    fwd_tile = (cfg["fwd_block_m"], cfg["fwd_block_n"])
    calls["lists_fwd"] = lambda: tile_lists(mask, geo, None, causal, tile, fwd_tile, transposed=False)
    lists = calls["lists_fwd"]()
    calls["fwd"] = lambda: sparse_forward(q, k, v, tau, lists, None, alpha, scale, causal, cfg, need_stats=False)
    fused = cfg["bwd_mode"] == "fused"
    if fused:  # the training forward keeps O2 too
        calls["fwd_train"] = lambda: sparse_forward(q, k, v, tau, lists, None, alpha, scale, causal, cfg,
                                                    need_stats=True, need_o2=True)
    _, inv_l, o2 = sparse_forward(q, k, v, tau, lists, None, alpha, scale, causal, cfg, need_stats=True,
                                  need_o2=fused)
    kv_tile = (cfg["bwd_block_m"], cfg["bwd_block_n"])
    lkv = tile_lists(mask, geo, None, causal, tile, kv_tile, transposed=True)
    if fused:
        calls["lists_bwd"] = lambda: tile_lists(mask, geo, None, causal, tile, kv_tile, transposed=True)
        calls["bwd_kv"] = lambda: bw.sparse_backward_fused(q, k, v, grad, o2, tau, inv_l, lkv, None, alpha, scale,
                                                           causal, cfg)
        return calls
    q_tile = (cfg["bwd_q_block_m"], cfg["bwd_q_block_n"])
    calls["lists_bwd"] = lambda: (tile_lists(mask, geo, None, causal, tile, kv_tile, transposed=True),
                                  tile_lists(mask, geo, None, causal, tile, q_tile, transposed=False))
    lq = tile_lists(mask, geo, None, causal, tile, q_tile, transposed=False)
    calls["bwd_q"] = lambda: bw.sparse_backward_q(q, k, v, grad, tau, inv_l, lq, None, alpha, scale, causal, cfg)
    _, rows = calls["bwd_q"]()
    calls["bwd_kv"] = lambda: bw.sparse_backward_kv(q, k, v, grad, rows, lkv, None, alpha, scale,
                                                    causal, cfg)
    return calls


def stage_times(q, k, v, grad, alpha: float, causal: bool, cfg, ms: Callable, with_bwd: bool) -> dict[str, Any]:
    """Each stage of ours alone (:func:`stage_calls`), the tau counters and the mask density, for one config."""
    import torch

    from adasplash_tune.kernels.attention import op
    from adasplash_tune.kernels.attention.tau import STATS_SLOTS, solve_tau

    calls = stage_calls(q, k, v, grad, alpha, causal, cfg)
    state = calls.pop("_state")
    geo, mask = state["geo"], state["mask"]
    res: dict[str, Any] = {"tau_ms": ms(calls["tau"])}
    stats = torch.zeros(STATS_SLOTS, dtype=torch.int32, device=q.device)
    solve_tau(q, k, None, alpha, state["scale"], causal, cfg, mask, state["scratch"], stats)
    st = stats.tolist()
    programs = max(st[0], 1)
    half = (STATS_SLOTS - 1) // 2
    dense = _dense_tiles(geo.seq_len, cfg["tau_block_m"], cfg["tau_sweep_block_n"], causal, geo.rows)
    res["tau_sweeps_mean"] = round(sum(st[1 + half:]) / programs, 3)
    res["tau_visited"] = [round(t / dense, 4) for t in st[1:1 + half] if t]
    res["density"] = round(op.block_density(mask, geo.seq_len, (cfg["mask_m"], cfg["mask_n"]), causal), 4)
    if "tau_fwd_fused" in calls:
        res["tau_fwd_fused_ms"] = ms(calls["tau_fwd_fused"])
    res["lists_fwd_ms"] = ms(calls["lists_fwd"])
    res["fwd_ms"] = ms(calls["fwd"])
    if "fwd_train" in calls and with_bwd:
        res["fwd_train_ms"] = ms(calls["fwd_train"])
    if not with_bwd:
        return res
    res["lists_bwd_ms"] = ms(calls["lists_bwd"])
    res["bwd_q_ms"] = ms(calls["bwd_q"]) if "bwd_q" in calls else 0.0  # fused: dQ is in bwd_kv_ms
    res["bwd_kv_ms"] = ms(calls["bwd_kv"])
    return res


def _errors(q, k, v, grad, alpha: float, causal: bool, cfg, with_bwd: bool) -> dict[str, float]:
    import torch

    import adasplash_tune
    from adasplash_tune.kernels.reference import attention_reference, relative_error

    qs, ks, vs = (t[:1, :1].detach().requires_grad_(with_bwd) for t in (q, k, v))
    out = adasplash_tune.adasplash(qs, ks, vs, alpha, causal, backend="triton", config=cfg)
    q64, k64, v64 = (t.detach().double().requires_grad_(with_bwd) for t in (qs, ks, vs))
    ref = attention_reference(q64, k64, v64, alpha, causal)
    res = {"fwd_err": float(f"{relative_error(out, ref):.3e}")}
    if with_bwd:
        g = grad[:1, :1]
        got = torch.autograd.grad(out, (qs, ks, vs), g)
        want = torch.autograd.grad(ref, (q64, k64, v64), g.double())
        res["grad_err"] = float(f"{max(relative_error(a, b) for a, b in zip(got, want)):.3e}")
    return res


# --------------------------------------------------------------------------- driver


def _warm_one(task: tuple) -> str:
    """Compile (by running once) every kernel of one (problem, variant) at batch 1."""
    import torch

    from adasplash_tune.kernels.attention.op import checked_config
    from adasplash_tune.kernels.declarations.attention import TRITON

    args, shape, causal, over = task
    shape = (1, *shape[1:])
    dtype = getattr(torch, args.dtype)
    try:
        q, k, v, grad = _inputs("randn", 1.0, shape, dtype, "cuda", 0)
        cfg = checked_config(TRITON.validate(over), q)
        stage_times(q, k, v, grad, args.alpha, causal, cfg, lambda fn: fn(), not args.no_bwd)
        _errors(q, k, v, grad, args.alpha, causal, cfg, not args.no_bwd)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported, the timed run will show it again
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def _prewarm(args) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    tasks = [(args, shape, causal, over) for shape, causal in args.problem_list
             for over in [{}, *args.variant_map.values()]]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.prewarm, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_warm_one, tasks))
    bad = [r for r in results if r != "ok"]
    log.info("prewarm: %d compile tasks in %.0f s (%d failed%s)", len(tasks), time.perf_counter() - start,
             len(bad), f": {bad[0]}" if bad else "")


def _point(args, shape, causal, family, value, device, ms) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import adasplash_tune
    from adasplash_tune.kernels.attention.op import checked_config
    from adasplash_tune.kernels.declarations.attention import TRITON

    dtype = getattr(torch, args.dtype)
    q, k, v, grad = _inputs(family, value, shape, dtype, device, args.seed)
    shape = tuple(q.shape)
    row: dict[str, Any] = {"shape": list(shape), "causal": causal, "family": family,
                           "scale": value if family != "captured" else None,
                           "source": str(value) if family == "captured" else None}
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    with torch.no_grad():
        row["sdpa_fwd_ms"] = ms(lambda: sdpa(q, k, v))
    if not args.no_bwd:
        row["sdpa_fwdbwd_ms"] = ms(lambda: torch.autograd.grad(sdpa(qg, kg, vg), (qg, kg, vg), grad))
    variants = {"default": {}, **args.variant_map}
    row["variants"] = {}
    for name, over in variants.items():
        res: dict[str, Any] = {}
        try:
            cfg = checked_config(TRITON.validate(over), q)
            res.update(stage_times(q, k, v, grad, args.alpha, causal, cfg, ms, not args.no_bwd))

            def call(a, b, c, cfg=cfg):
                return adasplash_tune.adasplash(a, b, c, args.alpha, causal, backend="triton", config=cfg)

            with torch.no_grad():
                res["ours_fwd_ms"] = ms(lambda: call(q, k, v))
            res["ratio_fwd"] = round(res["ours_fwd_ms"] / row["sdpa_fwd_ms"], 3)
            res["ratio_tau_to_sdpa_fwd"] = round(res["tau_ms"] / row["sdpa_fwd_ms"], 3)
            if not args.no_bwd:
                res["ours_fwdbwd_ms"] = ms(lambda: torch.autograd.grad(call(qg, kg, vg), (qg, kg, vg), grad))
                res["ratio_fwdbwd"] = round(res["ours_fwdbwd_ms"] / row["sdpa_fwdbwd_ms"], 3)
            if not args.no_errors:
                res.update(_errors(q, k, v, grad, args.alpha, causal, cfg, not args.no_bwd))
        except Exception as exc:  # noqa: BLE001 - one failing variant must not end the run
            log.exception("variant %s failed", name)
            res["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["variants"][name] = res
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'problem':>26} {'family':>10} {'variant':>12} {'tau':>7} {'sweeps':>6} {'visit1':>6} {'dens':>6} "
            f"{'fwd':>7} {'dq':>7} {'dkv':>7} {'ours f':>7} {'sdpa f':>7} {'ours fb':>8} {'sdpa fb':>8} "
            f"{'r f':>5} {'r fb':>5} {'err':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        prob = "x".join(map(str, r["shape"])) + (" c" if r["causal"] else " f")
        fam = f"{r['family']}:{r['scale']:g}" if r.get("scale") is not None else r["family"]
        for name, v in r.get("variants", {}).items():
            if "error" in v:
                lines.append(f"{prob:>26} {fam:>10} {name:>12} error: {v['error'][:80]}")
                continue
            visit = v.get("tau_visited") or []
            err = max(v.get("fwd_err", 0.0), v.get("grad_err", 0.0)) if "fwd_err" in v else None
            lines.append(
                f"{prob:>26} {fam:>10} {name:>12} {_fmt(v.get('tau_ms'), '7.3f')} "
                f"{_fmt(v.get('tau_sweeps_mean'), '6.2f')} {_fmt(visit[0] if visit else None, '6.3f')} "
                f"{_fmt(v.get('density'), '6.3f')} {_fmt(v.get('fwd_ms'), '7.3f')} {_fmt(v.get('bwd_q_ms'), '7.3f')} "
                f"{_fmt(v.get('bwd_kv_ms'), '7.3f')} {_fmt(v.get('ours_fwd_ms'), '7.3f')} "
                f"{_fmt(r.get('sdpa_fwd_ms'), '7.3f')} {_fmt(v.get('ours_fwdbwd_ms'), '8.3f')} "
                f"{_fmt(r.get('sdpa_fwdbwd_ms'), '8.3f')} {_fmt(v.get('ratio_fwd'), '5.2f')} "
                f"{_fmt(v.get('ratio_fwdbwd'), '5.2f')} {_fmt(err, '8.1e')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from adasplash_tune.kernels.declarations.attention import TRITON
    from adasplash_tune.tuner.timing import TimingOptions, measure

    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log.error("no CUDA device: use --cpu-smoke")
        return 2
    opts = TimingOptions(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                         min_reps=1 if args.cpu_smoke else 5, max_reps=1 if args.cpu_smoke else 200)

    def ms(fn: Callable[[], Any]) -> float:
        return round(measure(fn, device, opts).median_ms, 4)

    if args.prewarm and device == "cuda":
        _prewarm(args)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for shape, causal in args.problem_list:
        for family, value in args.family_list:
            if time.perf_counter() - start > args.time_budget:
                log.warning("time budget spent: skipping %s %s %s", shape, family, value)
                continue
            try:
                row = _point(args, shape, causal, family, value, device, ms)
            except Exception as exc:  # noqa: BLE001
                log.exception("point failed")
                row = {"shape": list(shape), "causal": causal, "family": family, "scale": None,
                       "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(row)
            log.info("[%5.0f s]\n%s", time.perf_counter() - start, table([row]))
    import triton

    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "dtype": args.dtype, "alpha": args.alpha,
        "default_config": TRITON.default().as_dict(), "variants": args.variant_map,
        "method": "tuner.timing.measure medians (CUDA events, L2 flushed before each rep); stages timed alone; "
                  "tau_visited[k] = key tiles visited by Halley sweep k / tiles of a dense sweep; density = "
                  "active mask tiles / tiles holding a valid pair, at the variant's mask tile; errors vs the "
                  "fp64 oracle on batch 0, head 0",
    }
    result = {"meta": meta, "rows": rows, "wall_s": round(time.perf_counter() - start, 1)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    bad = [r for r in rows if "error" in r or any("error" in v for v in r.get("variants", {}).values())]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
