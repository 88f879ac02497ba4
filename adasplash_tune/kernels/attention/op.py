"""The Triton AdaSplash op: tau sweeps (+ block mask) -> tile lists -> sparse forward (or, with
``fwd_mode="fused"``, all three in the tau kernel's one launch), and the sparse backward, as a ``torch.autograd.Function`` and as a forward/backward pair for the custom op.

Nothing here synchronises with the host: buffers and grids depend on shapes only, loop counts are
read on the device, so a call can be captured in a CUDA graph.

Residuals kept for the backward: ``stats`` (2, B * Hq, N) float32 = (tau, 1 / sum p) and ``mask``
(B * Hq, ceil(N / mask_m), ceil(N / mask_n)) int8, the block mask at the config's mask tile.

The forward's int32 scratch (the tau sweeps' lists, then the forward's tile lists) grows as
rows * N^2; past ``_SCRATCH_BUDGET_BYTES`` the forward runs in row chunks (``forward_chunks``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, NamedTuple, Sequence

import torch
import triton

from ..declarations.attention import TRITON, fit_triton_config
from ..launch import parallel_compile
from ..spec import Config
from .backward import sparse_backward_fused, sparse_backward_kv, sparse_backward_q
from .common import Geometry, alloc, poison_outputs
from .forward import sparse_forward
from .mask import TileLists, list_size, tile_list_pair, tile_lists
from .tau import mask_shape, solve_tau, solve_tau_forward, tau_scratch_size
from .warm import fused_forward, plan_fused_forward, plan_split_backward, split_backward

__all__ = [
    "adasplash_triton", "adasplash_triton_forward", "adasplash_triton_backward",
    "adasplash_triton_alpha_backward", "adasplash_triton_residuals", "checked_config", "forward_stages",
    "block_density", "poison_outputs", "forward_chunks",
]

log = logging.getLogger("adasplash_tune")

_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_SHAPE_KNOBS = tuple(n for n in TRITON.names if not TRITON.param(n).accuracy)


def _context(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """The problem and device facts a config is checked against."""
    ctx = {"head_dim": int(head_dim), "dtype_bytes": _DTYPE_BYTES[dtype]}
    if device.type == "cuda":
        from ...device import fingerprint

        smem = fingerprint(device).shared_mem
        if smem:
            ctx["max_shared_mem"] = int(smem)
    return ctx


def checked_config(config: Config | Any, q: torch.Tensor) -> Config:
    """``config`` validated against this problem and device (shared-memory estimates included).

    The built-in default is shrunk to fit problems it does not fit (large head dims in float32);
    any other config that does not fit raises ConfigError before anything is compiled.
    Memoised per (config, head dim, dtype, device): a repeated call costs one dict lookup (no
    context dict is built on the hot path)."""
    cfg = config if isinstance(config, Config) else TRITON.validate(config)
    return _checked_for(cfg, q.shape[-1], q.dtype, q.device)


@functools.lru_cache(maxsize=1024)
def _checked_for(config: Config, head_dim: int, dtype: torch.dtype, device: torch.device) -> Config:
    return _checked(config, tuple(sorted(_context(head_dim, dtype, device).items())))


@functools.lru_cache(maxsize=1024)
def _checked(config: Config, context: tuple[tuple[str, int], ...]) -> Config:
    niter = config["niter"]
    if niter not in TRITON.param("niter").choices:  # a call's niter override (any count the API takes)
        return _checked(config.replace(niter=TRITON.default()["niter"]), context).replace(niter=niter)
    ctx = dict(context)
    cfg = TRITON.validate(config)
    if not TRITON.violations(cfg.as_dict(), ctx):
        return cfg
    default = TRITON.default()
    if all(cfg[n] == default[n] for n in _SHAPE_KNOBS):
        fitted = fit_triton_config(cfg, ctx)
        log.debug("default triton config shrunk to fit %s: %s", ctx, fitted.as_dict())
        return fitted
    return TRITON.validate(cfg, ctx)  # raises ConfigError naming the violated constraint


def _prepare(q, k, v, varlen):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if varlen is not None:
        varlen = varlen.to(device=q.device, dtype=torch.int32).contiguous()
    return q, k, v, varlen


#: Bytes of int32 scratch one forward pipeline (tau sweeps -> tile lists -> sparse forward) may
#: use. The scratch holds the tau sweeps' tile lists, then the forward's: both grow as rows * N^2
#: (B * Hq * (N / 64)^2 int32 at 64-wide tiles: 128 MiB at (1, 8, 131072, 64), as much as a bf16
#: output). A forward whose scratch would exceed this runs the pipeline once per row chunk, into
#: slices of the full output, stats and mask, with one scratch sized for the largest chunk
#: (``forward_chunks``). A single query head's scratch larger than the budget still runs, alone.
#: Below the budget nothing changes (one launch per stage).
_SCRATCH_BUDGET_BYTES = 16 << 20


@functools.lru_cache(maxsize=512)
def _forward_buffers(geo: Geometry, config: Config) -> tuple[tuple[int, int, int], int]:
    """(block-mask shape at the config's mask tile, int32 entries of the scratch that the tau
    sweeps and the forward's tile lists share)."""
    scratch = tau_scratch_size(geo, config)
    if config["fwd_mode"] != "fused":  # the fused kernel walks the sweeps' own lists
        scratch = max(scratch, list_size(geo, (config["fwd_block_m"], config["fwd_block_n"]), transposed=False))
    return (geo.rows, *mask_shape(geo, config)), scratch


class ForwardChunk(NamedTuple):
    """One row chunk of a forward: q[b0:b1, h0:h1] and k, v[b0:b1, kv0:kv1], rows [r0, r1) of the
    flattened (B * Hq) rows; ``geo`` is the chunk's Geometry."""

    b0: int
    b1: int
    h0: int
    h1: int
    kv0: int
    kv1: int
    r0: int
    r1: int
    geo: Geometry


def _spans(n: int, most: int) -> list[tuple[int, int]]:
    """[0, n) in the fewest spans of at most ``most`` (>= 1), balanced: all of one size but the last."""
    size = -(-n // -(-n // most))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@functools.lru_cache(maxsize=512)
def forward_chunks(geo: Geometry, config: Config, budget: int) -> tuple[ForwardChunk, ...] | None:
    """The row chunks of a forward whose int32 scratch would exceed ``budget`` bytes, or None when
    one launch per stage fits. A chunk is as many as fit of: whole batch elements when one fits
    the budget; else whole kv-head groups of one batch element when one fits; else query heads
    of one kv-head group (at least one). Every row lies in exactly one chunk, in order, and each
    chunk's q, k, v slices are contiguous views of contiguous inputs."""
    if 4 * _forward_buffers(geo, config)[1] <= budget:
        return None
    row_bytes = 4 * _forward_buffers(Geometry(1, 1, 1, geo.seq_len, geo.head_dim), config)[1]  # linear in rows
    hq, group = geo.q_heads, geo.group
    if hq * row_bytes <= budget:
        units = [(b0, b1, 0, hq) for b0, b1 in _spans(geo.batch, budget // (hq * row_bytes))]
    elif group * row_bytes <= budget:
        units = [(b, b + 1, g0 * group, g1 * group)
                 for b in range(geo.batch) for g0, g1 in _spans(geo.kv_heads, budget // (group * row_bytes))]
    else:  # a chunk within one group reads that group's kv head only
        units = [(b, b + 1, g * group + h0, g * group + h1) for b in range(geo.batch)
                 for g in range(geo.kv_heads) for h0, h1 in _spans(group, max(1, budget // row_bytes))]
    chunks = []
    for b0, b1, h0, h1 in units:
        kv0, kv1 = h0 // group, -(-h1 // group)
        chunks.append(ForwardChunk(b0, b1, h0, h1, kv0, kv1, b0 * hq + h0, (b1 - 1) * hq + h1,
                                   Geometry(b1 - b0, h1 - h0, kv1 - kv0, geo.seq_len, geo.head_dim)))
    return tuple(chunks)


@functools.lru_cache(maxsize=512)
def _forward_plan(geo: Geometry, config: Config, budget: int
                  ) -> tuple[tuple[int, int, int], int, tuple[ForwardChunk, ...] | None]:
    """(block-mask shape, int32 scratch entries, row chunks or None): the scratch is one launch's
    without chunks, else the largest chunk's."""
    shape, scratch = _forward_buffers(geo, config)
    chunks = forward_chunks(geo, config, budget)
    if chunks is not None:
        scratch = max(_forward_buffers(c.geo, config)[1] for c in chunks)
    return shape, scratch, chunks


def _new_mask(geo: Geometry, config: Config, device: torch.device) -> torch.Tensor:
    """The block-mask buffer at the config's mask tile (the tau kernel writes every entry)."""
    return torch.empty(_forward_buffers(geo, config)[0], dtype=torch.int8, device=device)


def _forward(q, k, v, alpha, is_causal, varlen, scale, config, need_stats):
    """(out, stats (2, B*Hq, N) = (tau, 1 / sum p) or None, mask, O2 or None). The tau sweeps'
    scratch and the forward's tile lists share one buffer; the tau kernel writes every entry of
    the block mask. Without ``need_stats`` only tau is kept (no 1 / sum p). Past the scratch
    budget, the stages run per row chunk (:func:`_forward_chunked`)."""
    geo = Geometry.of(q, k)
    shape, scratch_size, chunks = _forward_plan(geo, config, _SCRATCH_BUDGET_BYTES)
    mask = torch.empty(shape, dtype=torch.int8, device=q.device)
    scratch = torch.empty(scratch_size, dtype=torch.int32, device=q.device)
    stats = torch.empty((2, geo.rows, geo.seq_len), dtype=torch.float32, device=q.device) if need_stats else None
    need_o2 = need_stats and config["bwd_mode"] == "fused"
    if chunks is not None:
        out, o2 = _forward_chunked(q, k, v, alpha, is_causal, varlen, scale, config, need_o2, geo, mask, scratch,
                                   stats, chunks)
    else:  # without stats solve_tau allocates tau and the forward writes no 1 / sum p
        out, o2 = _stages(q, k, v, alpha, is_causal, varlen, scale, config, need_o2, geo, mask, scratch,
                          None if stats is None else stats[0], None if stats is None else stats[1])
    return out, stats, mask, o2


#: Threads that compile a new problem's forward kernels at once (``_compile_ahead``).
_COMPILE_THREADS = 4
_COMPILED_AHEAD: set[tuple] = set()
_AHEAD_OUTCOME = ["none"]  # how the last compile-ahead went (tests): parallel / unavailable / failed: ...


@functools.lru_cache(maxsize=1)
def _parallel_compile_requested() -> bool:
    """``ADASPLASH_TUNE_PARALLEL_COMPILE=1`` (read once per process): opt-in (on the H200 it saved
    nothing: the tau kernel's compile dominates). Off, a call does no compile-ahead work at all."""
    return os.environ.get("ADASPLASH_TUNE_PARALLEL_COMPILE", "0") == "1"


def _compile_ahead(key: tuple, run) -> None:
    """The first time ``key`` is seen: ``run()`` once with every launch compiling in parallel and
    none running (``kernels.launch.parallel_compile``), so that a cold first call waits for its
    slowest kernel's compile, not the sum of them. Never under the interpreter; any failure
    leaves the launches to compile one by one (where a real error is raised as before)."""
    if key in _COMPILED_AHEAD:
        return
    if len(_COMPILED_AHEAD) > 4096:
        _COMPILED_AHEAD.clear()
    _COMPILED_AHEAD.add(key)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return
    try:
        with parallel_compile(_COMPILE_THREADS) as active:
            if active:
                run()
        _AHEAD_OUTCOME[0] = "parallel" if active else "unavailable"
    except Exception as exc:  # noqa: BLE001 - the real launches compile (and report) on their own
        _AHEAD_OUTCOME[0] = f"failed: {type(exc).__name__}"
        log.debug("compiling ahead in parallel failed (%s: %s); launches compile one by one",
                  type(exc).__name__, exc)


def _stages(q, k, v, alpha, is_causal, varlen, scale, config, need_o2, geo, mask, scratch, tau_out, inv_l_out,
            out=None, o2_out=None):
    """tau -> tile lists -> sparse forward over the rows of q (whole, or one chunk of them), into
    the given buffers (None: allocated; ``inv_l_out`` None: no 1 / sum p). Returns (out, O2).
    A new problem's kernels are compiled in parallel first (``_compile_ahead``)."""
    if _parallel_compile_requested():
        key = (geo, config, q.dtype, q.device, float(alpha), bool(is_causal), varlen is not None,
               tau_out is not None, inv_l_out is not None, bool(need_o2))
        if key not in _COMPILED_AHEAD:
            out = alloc(q.shape, q.dtype, q.device) if out is None else out
            o2_out = alloc(q.shape, q.dtype, q.device) if need_o2 and o2_out is None else o2_out
            _compile_ahead(key, lambda: _run_stages(q, k, v, alpha, is_causal, varlen, scale, config, need_o2,
                                                    geo, mask, scratch, tau_out, inv_l_out, out, o2_out))
    return _run_stages(q, k, v, alpha, is_causal, varlen, scale, config, need_o2, geo, mask, scratch, tau_out,
                       inv_l_out, out, o2_out)


def _run_stages(q, k, v, alpha, is_causal, varlen, scale, config, need_o2, geo, mask, scratch, tau_out, inv_l_out,
                out, o2_out):
    if config["fwd_mode"] == "fused":
        out, _, o2 = solve_tau_forward(q, k, v, varlen, alpha, scale, is_causal, config, mask, scratch,
                                       need_o2=need_o2, tau_out=tau_out, inv_l_out=inv_l_out, out=out,
                                       o2_out=o2_out, geo=geo)
        return out, o2
    tau = solve_tau(q, k, varlen, alpha, scale, is_causal, config, mask, scratch, out=tau_out, geo=geo)
    lists = tile_lists(mask, geo, varlen, is_causal, (config["mask_m"], config["mask_n"]),
                       (config["fwd_block_m"], config["fwd_block_n"]), transposed=False, buffer=scratch)
    out, _, o2 = sparse_forward(q, k, v, tau, lists, varlen, alpha, scale, is_causal, config,
                                need_stats=inv_l_out is not None, need_o2=need_o2, inv_l_out=inv_l_out, geo=geo,
                                out=out, o2_out=o2_out)
    return out, o2


def _forward_chunked(q, k, v, alpha, is_causal, varlen, scale, config, need_o2, geo, mask, scratch, stats, chunks):
    """:func:`_stages` one row chunk at a time (launches memoised per chunk Geometry), each writing
    slices of the full output, stats, mask and O2, so the results are those of one launch per
    stage; only the scratch is per chunk (one buffer, reused in stream order). Returns (out, O2)."""
    tau_all = stats[0] if stats is not None else torch.empty((geo.rows, geo.seq_len), dtype=torch.float32,
                                                             device=q.device)
    out = alloc(q.shape, q.dtype, q.device)
    o2 = alloc(q.shape, q.dtype, q.device) if need_o2 else None
    for c in chunks:
        qc, oc = q[c.b0:c.b1, c.h0:c.h1], out[c.b0:c.b1, c.h0:c.h1]
        kc, vc = k[c.b0:c.b1, c.kv0:c.kv1], v[c.b0:c.b1, c.kv0:c.kv1]
        assert qc.is_contiguous() and kc.is_contiguous() and vc.is_contiguous() and oc.is_contiguous()
        _stages(qc, kc, vc, alpha, is_causal, None if varlen is None else varlen[c.b0:c.b1], scale, config, need_o2,
                c.geo, mask[c.r0:c.r1], scratch, tau_all[c.r0:c.r1],
                None if stats is None else stats[1, c.r0:c.r1], out=oc,
                o2_out=o2[c.b0:c.b1, c.h0:c.h1] if need_o2 else None)
    return out, o2


def _backward(grad_out, q, k, v, stats, mask, o2, varlen, alpha, scale, is_causal, config,
              need_kv: bool = True, alpha_rows: torch.Tensor | None = None):
    """(dq, dk, dv); dK/dV only with ``need_kv`` (the split dQ kernel always runs: it computes
    delta). The fused mode needs the forward's O2. ``alpha_rows`` ((B*Hq, N) float32): the split
    dQ kernel also writes each row's alpha gradient there (the fused mode has no dQ pass: split
    then)."""
    geo = Geometry.of(q, k)
    grad_out = grad_out.contiguous()
    tau, inv_l = stats[0], stats[1]
    mask_tile = (config["mask_m"], config["mask_n"])
    kv_tile = (config["bwd_block_m"], config["bwd_block_n"])
    if config["bwd_mode"] == "fused" and need_kv and o2 is not None and alpha_rows is None:
        lists = tile_lists(mask, geo, varlen, is_causal, mask_tile, kv_tile, transposed=True)
        return sparse_backward_fused(q, k, v, grad_out, o2, tau, inv_l, lists, varlen, alpha, scale,
                                     is_causal, config)
    q_tile = (config["bwd_q_block_m"], config["bwd_q_block_n"])
    if need_kv:  # both tilings' lists from one launch into one buffer
        lists, kv_lists = tile_list_pair(mask, geo, varlen, is_causal, mask_tile, q_tile, kv_tile)
    else:
        lists = tile_lists(mask, geo, varlen, is_causal, mask_tile, q_tile, transposed=False)
    dq, rows = sparse_backward_q(q, k, v, grad_out, tau, inv_l, lists, varlen, alpha, scale, is_causal, config,
                                 alpha_rows)
    dk = dv = None
    if need_kv:
        dk, dv = sparse_backward_kv(q, k, v, grad_out, rows, kv_lists, varlen, alpha, scale, is_causal, config)
    return dq, dk, dv


class _AdaSplashTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, alpha, is_causal, varlen, scale, config):  # type: ignore[override]
        need = any(ctx.needs_input_grad[:3])
        qc, kc, vc, lens = _prepare(q, k, v, varlen)
        out, stats, mask, o2 = _forward(qc, kc, vc, alpha, is_causal, lens, scale, config, need)
        if need:
            ctx.save_for_backward(qc, kc, vc, stats, mask, o2, lens)
            ctx.args = (alpha, scale, is_causal, config)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, stats, mask, o2, lens = ctx.saved_tensors
        alpha, scale, is_causal, config = ctx.args
        need_kv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = _backward(grad_out, q, k, v, stats, mask, o2, lens, alpha, scale, is_causal,
                               config, need_kv)
        return (dq if ctx.needs_input_grad[0] else None), dk, dv, None, None, None, None, None


def adasplash_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    is_causal: bool,
    varlen: torch.Tensor | None,
    scale: float,
    config: Config,
) -> torch.Tensor:
    """alpha-entmax attention with the Triton pipeline (inputs validated by the public API).

    q (B, Hq, N, D), k/v (B, Hkv, N, D); returns q's shape and dtype; differentiable in q, k, v."""
    cfg = checked_config(config, q)
    if _interpreter_bf16(q):
        out = _AdaSplashTriton.apply(q.float(), k.float(), v.float(), float(alpha), bool(is_causal), varlen,
                                     float(scale), cfg)
        return out.to(q.dtype)
    return _AdaSplashTriton.apply(q, k, v, float(alpha), bool(is_causal), varlen, float(scale), cfg)


def _interpreter_bf16(q: torch.Tensor) -> bool:
    """Triton's CPU interpreter multiplies bfloat16 dot operands as their raw uint16 bits (seen in
    triton 3.9), so on CPU bfloat16 runs through the float32 kernels."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


# --------------------------------------------------------------------------- custom-op pair


_MIN_MASK_TILE = 16


def adasplash_triton_residuals(q, k, v, config=None) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the residuals :func:`adasplash_triton_forward` returns for ``config``:
    ``stats`` (2, B*Hq, N) float32, the block mask (B*Hq, TM, TN) int8 and, in the fused backward
    mode, O2 in q's shape. ``config=None``: the config-free layout of ``fixed_residuals`` (the mask
    flat at the finest mask tile's size, O2 always), valid whatever config runs."""
    batch, heads, n, d = q.shape
    rows, o2 = batch * heads, (tuple(q.shape), _compute_dtype(q, q, q)[0].dtype)
    if config is None:
        side = triton.cdiv(n, _MIN_MASK_TILE)
        return [((2, rows, n), torch.float32), ((rows * side * side,), torch.int8), o2]
    tm, tn = triton.cdiv(n, config["mask_m"]), triton.cdiv(n, config["mask_n"])
    return [((2, rows, n), torch.float32), ((rows, tm, tn), torch.int8)] + (
        [o2] if config["bwd_mode"] == "fused" else [])


def adasplash_triton_forward(q, k, v, alpha, is_causal, varlen, scale, config, *, need_residuals: bool = True,
                             fixed_residuals: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward of the pair: (out, [stats, mask] (+ [O2] in the fused backward mode)), or (out, [])
    without ``need_residuals``; with ``fixed_residuals`` in the config-free layout of
    ``adasplash_triton_residuals(q, k, v, None)``. A warm call of a planned one-launch forward
    takes the short path of kernels/attention/warm.py."""
    key = None
    if not fixed_residuals and type(config) is Config and _warm_lengths(varlen, q):
        key = ("fwd", config, q.shape, k.shape, q.dtype, q.device, alpha, scale, is_causal, varlen is not None,
               need_residuals)
        plan = _WARM.get(key)
        if plan is not None:
            done = fused_forward(plan, q, k, v, varlen)
            if done is not None:
                return done
            _WARM.pop(key, None)  # re-planned below: a launch memo may have replaced its launch
    cfg = checked_config(config, q)
    qc, kc, vc, lens = _prepare(*_compute_dtype(q, k, v), varlen)
    out, stats, mask, o2 = _forward(qc, kc, vc, float(alpha), bool(is_causal), lens, float(scale), cfg,
                                    need_residuals)
    out = _as(out, q.dtype)
    if key is not None and key not in _WARM:
        _remember_plan(key, _forward_warm_plan(qc, kc, float(alpha), float(scale), bool(is_causal), lens is not None,
                                               cfg, need_residuals))
    if not need_residuals:
        return out, []
    if fixed_residuals:
        _, ((size,), _), (o2_shape, o2_dtype) = adasplash_triton_residuals(q, k, v, None)
        flat = torch.empty(size, dtype=torch.int8, device=q.device)
        flat[: mask.numel()].copy_(mask.view(-1))
        if o2 is None:
            o2 = torch.empty(o2_shape, dtype=o2_dtype, device=q.device)
        return out, [stats, flat, o2]
    return out, [stats, mask] + ([o2] if o2 is not None else [])


#: A warm call's key -> its short path's plan (kernels/attention/warm.py); None: the general path.
_WARM: dict[tuple, Any] = {}


def _remember_plan(key: tuple, plan: Any) -> None:
    if len(_WARM) >= 2048:  # a process meeting ever new problems forgets and starts again
        _WARM.clear()
    _WARM[key] = plan


def _warm_lengths(varlen, q) -> bool:
    """Whether ``varlen`` is what the short paths take as is: None, or contiguous int32 lengths
    on q's device (what the general path would pass on unchanged)."""
    return varlen is None or (varlen.dtype == torch.int32 and varlen.device == q.device and varlen.is_contiguous())


def _forward_warm_plan(q, k, alpha: float, scale: float, is_causal: bool, has_varlen: bool, cfg: Config,
                       residuals: bool):
    """The short path's plan of a forward the general path just ran, or None where there is none
    (a CPU tensor, the staged mode, a forward in row chunks)."""
    if q.device.type != "cuda" or cfg["fwd_mode"] != "fused":
        return None
    geo = Geometry.of(q, k)
    shape, scratch, chunks = _forward_plan(geo, cfg, _SCRATCH_BUDGET_BYTES)
    if chunks is not None:
        return None
    return plan_fused_forward(geo, cfg, alpha, scale, is_causal, has_varlen, q.dtype, shape, scratch, residuals)


def adasplash_triton_backward(grad_out, q, k, v, out, residuals: Sequence[torch.Tensor], alpha, is_causal, varlen,
                              scale, config, *, needs: tuple[bool, bool, bool] = (True, True, True)
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward of the pair, from :func:`adasplash_triton_forward`'s residuals: (dq, dk, dv), with
    None for the gradients ``needs`` does not ask for."""
    return _pair_backward(grad_out, q, k, v, residuals, alpha, is_causal, varlen, scale, config, needs, False)[:3]


def adasplash_triton_alpha_backward(grad_out, q, k, v, out, residuals: Sequence[torch.Tensor], alpha, is_causal,
                                    varlen, scale, config, *, needs: tuple[bool, bool, bool] = (True, True, True)
                                    ) -> tuple[torch.Tensor | None, ...]:
    """:func:`adasplash_triton_backward` plus d(sum grad_out * out)/dalpha as a 0-d float32 tensor,
    from the same dQ pass (the closed form of ``torch_backend/alpha_grad.py``, per row in the
    kernel): (dq, dk, dv, dalpha)."""
    return _pair_backward(grad_out, q, k, v, residuals, alpha, is_causal, varlen, scale, config, needs, True)


def _pair_backward(grad_out, q, k, v, residuals, alpha, is_causal, varlen, scale, config, needs, need_alpha):
    key = None
    need_kv = needs[1] or needs[2]
    if (not need_alpha and type(config) is Config and len(residuals) == 2 and residuals[1].dim() == 3
            and _warm_lengths(varlen, q)):
        key = ("bwd", config, q.shape, k.shape, q.dtype, q.device, alpha, scale, is_causal, varlen is not None,
               need_kv)
        plan = _WARM.get(key)
        if plan is not None:
            done = split_backward(plan, grad_out, q, k, v, residuals[0], residuals[1], varlen)
            if done is not None:
                dq, dk, dv = done
                return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None)
            _WARM.pop(key, None)
    cfg = checked_config(config, q)
    qc, kc, vc, lens = _prepare(*_compute_dtype(q, k, v), varlen)
    stats, mask, *rest = residuals
    if mask.dim() == 1:  # the config-free layout: the block mask is the buffer's leading part
        geo = Geometry.of(qc, kc)
        shape = (geo.rows, *mask_shape(geo, cfg))
        mask = mask[: shape[0] * shape[1] * shape[2]].view(shape)
        rest = rest if cfg["bwd_mode"] == "fused" else []
    alpha_rows = torch.empty_like(stats[0]) if need_alpha else None
    dq, dk, dv = _backward(_as(grad_out, qc.dtype), qc, kc, vc, stats, mask, rest[0] if rest else None, lens,
                           float(alpha), float(scale), bool(is_causal), cfg, need_kv=need_kv,
                           alpha_rows=alpha_rows)
    if key is not None and key not in _WARM:
        _remember_plan(key, plan_split_backward(Geometry.of(qc, kc), cfg, float(alpha), float(scale), bool(is_causal),
                                                lens is not None, qc.dtype, need_kv)
                       if qc.device.type == "cuda" and cfg["bwd_mode"] == "split" else None)
    return (_as(dq, q.dtype) if needs[0] else None, _as(dk, k.dtype) if needs[1] else None,
            _as(dv, v.dtype) if needs[2] else None, alpha_rows.sum() if need_alpha else None)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no ``.to`` call, and its dispatch cost, when it already is)."""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(q, k, v):
    if _interpreter_bf16(q):
        return q.float(), k.float(), v.float()
    return q, k, v


# --------------------------------------------------------------------------- inspection (bench, tests)


def forward_stages(q, k, v, alpha: float, is_causal: bool, varlen, scale: float, config: Config) -> dict[str, Any]:
    """Run the forward stage by stage and return the intermediates: ``tau`` (B*Hq, N) in z units,
    ``mask`` (B*Hq, TM, TN) int8, ``lists`` (TileLists of the forward tiling: tau's tiles when
    fused) and ``out``."""
    cfg = checked_config(config, q)
    qc, kc, vc, lens = _prepare(*_compute_dtype(q, k, v), varlen)
    out, stats, mask, _ = _forward(qc, kc, vc, float(alpha), bool(is_causal), lens, float(scale), cfg, True)
    tau = stats[0]
    geo = Geometry.of(qc, kc)
    fused = cfg["fwd_mode"] == "fused"  # the fused kernel's forward runs on tau's tiles
    tile = (cfg["tau_block_m"], cfg["tau_sweep_block_n"]) if fused else (cfg["fwd_block_m"], cfg["fwd_block_n"])
    lists: TileLists = tile_lists(mask, geo, lens, is_causal, (cfg["mask_m"], cfg["mask_n"]), tile, transposed=False)
    return {"tau": tau, "mask": mask, "lists": lists, "out": out, "config": cfg}


def block_density(mask: torch.Tensor, seq_len: int, mask_tile: tuple[int, int], is_causal: bool) -> float:
    """Share of active mask tiles among the tiles holding any valid (query, key) pair (the lower
    triangle when causal). ``mask``: (B*Hq, TM, TN). Synchronises (host float): for reports only."""
    tm, tn = mask.shape[-2:]
    mm, mn = mask_tile
    if is_causal:
        rows = torch.arange(tm, device=mask.device).view(tm, 1)
        cols = torch.arange(tn, device=mask.device).view(1, tn)
        region = (cols * mn <= torch.clamp((rows + 1) * mm - 1, max=seq_len - 1))
    else:
        region = torch.ones(tm, tn, dtype=torch.bool, device=mask.device)
    total = region.sum().item() * mask.shape[0]
    return float((mask.bool() & region).sum().item() / max(total, 1))
