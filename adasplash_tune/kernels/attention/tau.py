"""Stage 1: the per-row threshold tau and the block mask, in one dense pass plus sparse sweeps.

One program owns ``tau_block_m`` query rows of one head.

1. **The dense pass** sweeps every key tile once (``tau_block_n`` keys a step) for the row max. On
   the way it keeps, per (``mask_m``-row group, tile), an upper bound of the tile's largest
   ``z - max z`` (the running max is a lower bound of the final one), stored as an int8 code for
   each ``mask_n``-key chunk of the tile in the mask buffer itself, and per row the eight
   (``"subset"``) or sixteen (``"subset16"``) largest tile maxima (a subset of the row's scores),
   kept sorted in registers by a compare-exchange chain. Per score it costs a max: everything else
   is per row and tile, yet not free (H200, (1,16,16384,64) causal, benchmarks/bench_dense_pass.py:
   QK^T + max alone 0.52-0.56 ms; the codes add ~0.15-0.2 ms, eight maxima ~0.06-0.1, sixteen
   ~0.2, against SDPA's whole forward at 1.22 ms).
2. **The start.** With ``tau_init="subset"`` / ``"subset16"`` Halley starts at the threshold of
   those scores (kernels/threshold.py): a lower bound of the row's tau, within a small fraction of
   the support width when the support is a few dozen keys (sixteen values: ~1% of the width on
   randn at N = 16384 against ~7% for eight, benchmarks/study_tau_start.py). ``"mid"`` / ``"lo"``
   start at the middle or the lower end of the bracket ``[max - 1, max - n^(1-alpha)]``.
3. **Sparse sweeps.** Each Halley sweep evaluates ``f, f', f''`` at the rows' current tau over the
   key tiles (``tau_sweep_block_n`` keys) that hold a chunk which may have a score above tau for
   some row of its group: a chunk whose scores are all at most tau adds nothing to those sums, so
   the skip is exact. A sweep first lists its tiles (vectorised over the chunk codes), then walks
   the list with pipelined loads. The first sweep re-bases every chunk code on that sweep's tau
   (``tau_ref``) and, with ``mask_source="sweeps"``, replaces the code of every chunk it visits by
   the exact ``max over the chunk of z - tau_ref`` (per row group): bounds relative to tau rather
   than to the row max stay tight across rows whose supports differ in width. The loop stops on
   the device once every row's step is at most ``tau_tol`` of its support width ``max z - tau``
   (``niter`` is a cap): no host synchronisation, CUDA-graph safe.
   ``tau_dense_passes=2`` drops the chunk codes from the dense pass (no per-tile cross-warp
   reduction there) and makes the first sweep dense instead: it visits every tile and writes
   every chunk's exact code.
   With ``fwd_mode="fused"`` the program then runs the sparse forward of its own rows (the
   forward kernel's loop, ``forward.forward_rows``) over the key tiles whose chunks clear the
   final tau: tau, mask and output in one launch, no tile-list stage, no second read of q.
4. **The mask.** Finally every chunk of the program's row groups is written as 0/1: active when its
   bound plus ``max over the group of (tau_ref - tau)`` is positive (a superset of the chunks
   holding some ``z > tau``, so the sparse products computed from it are exact). Every entry of
   the mask is written, so the buffer needs no zero-filling.

Units: ``z = c * q.k`` with ``c = (alpha - 1) * scale``; tau is in z units.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..declarations.attention import TAU_TOL_AUTO
from ..launch import Launch
from ..powers import tau_terms
from ..problem import integer_b
from ..spec import Config
from ..threshold import halley_step, subset_tau
from .common import BIG, Geometry, alloc, dot_precision
from .forward import forward_rows

__all__ = ["solve_tau", "solve_tau_forward", "resolve_tol", "mask_shape", "tau_scratch_size", "STATS_SLOTS"]

#: Entries of the optional statistics buffer: [0] programs, [1 + k] tiles visited by sweep k,
#: [1 + MAX_SWEEPS + k] programs that ran sweep k.
_MAX_SWEEPS = 32
STATS_SLOTS = 1 + 2 * _MAX_SWEEPS
_MAX_SWEEPS_C = tl.constexpr(_MAX_SWEEPS)
#: Tiles a sweep's list step examines at once.
_LIST_CHUNK = tl.constexpr(128)


# --------------------------------------------------------------------------- small helpers


@triton.jit
def _load_k(K, kv_base, cols, offs_d, seq_len, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
            EVEN_N: tl.constexpr):
    """A key tile, zeros past ``seq_len`` (only the last tile can reach it; EVEN_N: none does)
    and past HEAD_DIM."""
    ptrs = K + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
    if EVEN_N:
        if EVEN_D:
            k = tl.load(ptrs)
        else:
            k = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(ptrs, mask=(cols[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return k


@triton.jit
def _valid(cols, offs_m, length, IS_CAUSAL: tl.constexpr):
    valid = cols[None, :] < length
    if IS_CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _encode(h):
    """int8 code of a bound h (z units, |h| <= 4 where it matters; -inf allowed) that never
    decodes below h: sign(h) * sqrt(|h|) * 63.5, rounded away from -inf."""
    e = tl.sqrt(tl.minimum(tl.abs(h), 4.0)) * 63.5
    return tl.where(h > 0, tl.ceil(e), -tl.floor(e)).to(tl.int8)


@triton.jit
def _decode(code):
    e = code.to(tl.float32) * (1.0 / 63.5)
    return tl.where(code > 0, e * e, -(e * e))


@triton.jit
def _group_max(x, BM: tl.constexpr, MM: tl.constexpr):
    """[BM] -> [BM // MM]: the max over each group of MM rows."""
    return tl.max(tl.reshape(x, (BM // MM, MM)), axis=1)


@triton.jit
def _insert8(t0, t1, t2, t3, t4, t5, t6, t7, x):
    """Insert x into the per-row descending lists t0 >= t1 >= ... >= t7; returns the list and the
    value that dropped out (the smaller of t7 and x), so two lists chain into a top sixteen."""
    t0, x = tl.maximum(t0, x), tl.minimum(t0, x)
    t1, x = tl.maximum(t1, x), tl.minimum(t1, x)
    t2, x = tl.maximum(t2, x), tl.minimum(t2, x)
    t3, x = tl.maximum(t3, x), tl.minimum(t3, x)
    t4, x = tl.maximum(t4, x), tl.minimum(t4, x)
    t5, x = tl.maximum(t5, x), tl.minimum(t5, x)
    t6, x = tl.maximum(t6, x), tl.minimum(t6, x)
    t7, x = tl.maximum(t7, x), tl.minimum(t7, x)
    return t0, t1, t2, t3, t4, t5, t6, t7, x


@triton.jit
def _join8(t0, t1, t2, t3, t4, t5, t6, t7, R: tl.constexpr):
    """[R] x 8 -> [R, 8]."""
    top = tl.join(tl.join(tl.join(t0, t1), tl.join(t2, t3)), tl.join(tl.join(t4, t5), tl.join(t6, t7)))
    return tl.reshape(top, (R, 8))


# --------------------------------------------------------------------------- 1. the dense pass


@triton.jit
def _dense_pass(m, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, q, K, kv_base, j_full, j_stop,
                offs_m, offs_n, offs_d, seq_len, length, c, row_ok, MASK, mask_base, grows, TM, TN,
                IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                TOPK: tl.constexpr, CODES: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, MM: tl.constexpr, MN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Row max over key tiles [0, j_stop), those from ``j_full`` on masked (causal / length); with
    TOPK (0, 8 or 16) the TOPK largest tile maxima (a0..a7, then b0..b7: a value leaving a enters
    b), with CODES the chunk codes. One loop for both kinds of tile (a uniform branch masks the
    scores): each copy of a loop body costs Triton's compile time far more than its size."""
    NCM: tl.constexpr = BN // MN
    sub = tl.arange(0, NCM)
    for j in range(0, j_stop):
        cols = j * BN + offs_n
        k = _load_k(K, kv_base, cols, offs_d, seq_len, HEAD_DIM, EVEN_D, EVEN_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if j >= j_full:
            s = tl.where(_valid(cols, offs_m, length, IS_CAUSAL), s, float("-inf"))
        tm = tl.max(s, axis=1)
        m = tl.maximum(m, tm)
        if TOPK >= 8:
            a0, a1, a2, a3, a4, a5, a6, a7, x = _insert8(a0, a1, a2, a3, a4, a5, a6, a7, tm)
            if TOPK >= 16:
                b0, b1, b2, b3, b4, b5, b6, b7, x = _insert8(b0, b1, b2, b3, b4, b5, b6, b7, x)
        if CODES:
            g = tl.where(row_ok, (tm - m) * c, float("-inf"))
            code = _encode(_group_max(g, BM, MM))
            mcols = j * NCM + sub
            tl.store(MASK + mask_base + grows[:, None] * TN + mcols[None, :],
                     tl.broadcast_to(code[:, None], (BM // MM, NCM)),
                     mask=(grows[:, None] < TM) & (mcols[None, :] < TN))
    return m, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7


@triton.jit
def _dense_stage(q, K, kv_base, kv_full, kv_stop, offs_m, offs_d, seq_len, length, c, row_ok, MASK, mask_base,
                 grows, TM, TN, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, TOPK: tl.constexpr, CODES: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, MM: tl.constexpr, MN: tl.constexpr, DOT_PREC: tl.constexpr):
    """The whole dense pass of one program: the key tiles up to ``kv_stop``, those from ``kv_full``
    on masked. Returns the row max and the 16 top-maxima registers (-inf if unused)."""
    offs_n = tl.arange(0, BN)
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    a0 = m
    a1 = m
    a2 = m
    a3 = m
    a4 = m
    a5 = m
    a6 = m
    a7 = m
    b0 = m
    b1 = m
    b2 = m
    b3 = m
    b4 = m
    b5 = m
    b6 = m
    b7 = m
    j_full = kv_full // BN
    j_stop = tl.cdiv(kv_stop, BN)
    m, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7 = _dense_pass(
        m, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, q, K, kv_base, j_full, j_stop, offs_m,
        offs_n, offs_d, seq_len, length, c, row_ok, MASK, mask_base, grows, TM, TN, IS_CAUSAL, EVEN_D, EVEN_N,
        HEAD_DIM, TOPK, CODES, BM, BN, MM, MN, DOT_PREC)
    return m, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7


# --------------------------------------------------------------------------- 3. sparse sweeps


@triton.jit
def _list_tiles(LST, MASK, mask_base, grows, TM, TN, n_tiles, n_coded, shift, rebase, store_rebased,
                BM: tl.constexpr, MM: tl.constexpr, NCM: tl.constexpr):
    """Write the tiles of [0, n_tiles) that hold a chunk with decode(code) + rebase[group] +
    shift[group] > 0 to LST (ascending); with ``store_rebased`` (uniform), first replace every code
    by its decode plus ``rebase[group]``.
    Chunk columns from ``n_coded`` on hold no code yet (sweep tiles wider than the dense pass's
    reach past its last tile; those chunks hold no valid key): they read as the lowest code, not
    as whatever the buffer held. Returns the number of tiles listed."""
    G: tl.constexpr = BM // MM
    CH: tl.constexpr = _LIST_CHUNK * NCM
    total = n_tiles * 0
    cc0 = tl.arange(0, CH)
    t_idx0 = tl.arange(0, _LIST_CHUNK)
    for c0 in range(0, n_tiles * NCM, CH):
        ccols = c0 + cc0
        ptrs = MASK + mask_base + grows[:, None] * TN + ccols[None, :]
        inb = (grows[:, None] < TM) & (ccols[None, :] < n_tiles * NCM) & (ccols[None, :] < TN)
        bound = _decode(tl.load(ptrs, mask=inb & (ccols[None, :] < n_coded), other=-127)) + rebase[:, None]
        if store_rebased:
            tl.store(ptrs, _encode(bound), mask=inb)
        hit = tl.max(((bound + shift[:, None] > 0) & inb).to(tl.int32), axis=0)
        hit = tl.max(tl.reshape(hit, (_LIST_CHUNK, NCM)), axis=1)
        tiles = c0 // NCM + t_idx0
        pos = total + tl.cumsum(hit, axis=0) - 1
        tl.store(LST + pos, tiles, mask=hit > 0)
        total += tl.sum(hit, axis=0)
    return total


@triton.jit
def _sweep(s0, s1, s2, q, K, kv_base, LST, n_lead, n_list, tau, c, b_exp, row_ok,
           offs_m, offs_n, offs_d, seq_len, length, MASK, mask_base, grows, TM, TN, tighten,
           B_INT: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr,
           HEAD_DIM: tl.constexpr, BM: tl.constexpr, BNS: tl.constexpr,
           MM: tl.constexpr, MN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate f, f', f'' terms at ``tau`` over the listed key tiles LST[0:n_list], those from
    ``n_lead`` on masked (causal / length). With ``tighten`` (uniform), store every visited
    chunk's exact code: max over the chunk of z - tau (= u)."""
    NCM: tl.constexpr = BNS // MN
    sub = tl.arange(0, NCM)
    for i in range(0, n_list):
        j = tl.load(LST + i)
        cols = j * BNS + offs_n
        k = _load_k(K, kv_base, cols, offs_d, seq_len, HEAD_DIM, EVEN_D, EVEN_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        u = s * c - tau[:, None]
        if i >= n_lead:
            u = tl.where(_valid(cols, offs_m, length, IS_CAUSAL), u, float("-inf"))
        if tighten:
            if NCM == 1:
                h = tl.max(u, axis=1)[:, None]
            else:
                h = tl.max(tl.reshape(u, (BM, NCM, MN)), axis=2)
            h = tl.where(row_ok[:, None], h, float("-inf"))
            h = tl.max(tl.reshape(h, (BM // MM, MM, NCM)), axis=1)
            mcols = j * NCM + sub
            tl.store(MASK + mask_base + grows[:, None] * TN + mcols[None, :], _encode(h),
                     mask=(grows[:, None] < TM) & (mcols[None, :] < TN))
        u = tl.maximum(u, 0.0)
        t0, t1, t2 = tau_terms(u, b_exp, B_INT)
        s0 += tl.sum(t0, axis=1)
        s1 += tl.sum(t1, axis=1)
        if B_INT != 1:
            s2 += tl.sum(t2, axis=1)
    return s0, s1, s2


@triton.jit
def _list_all(LST, n_tiles):
    """LST[0:n_tiles] = 0, 1, ..., n_tiles - 1; returns n_tiles."""
    offs = tl.arange(0, _LIST_CHUNK)
    for c0 in range(0, n_tiles, _LIST_CHUNK):
        idx = c0 + offs
        tl.store(LST + idx, idx, mask=idx < n_tiles)
    return n_tiles


@triton.jit
def _count_below(LST, n, limit):
    """How many of the ascending LST[0:n] are below ``limit`` (the tiles needing no masking)."""
    lead = n * 0
    offs = tl.arange(0, _LIST_CHUNK)
    for c0 in range(0, n, _LIST_CHUNK):
        idx = c0 + offs
        vals = tl.load(LST + idx, mask=idx < n, other=limit)
        lead += tl.sum((vals < limit).to(tl.int32), axis=0)
    return lead


@triton.jit
def _halley(tau, lo, hi, s0, s1, s2, zmax, empty, b_exp, B_INT: tl.constexpr):
    """One safeguarded Halley step (kept inside the bracket, else bisection); returns the new tau,
    the bracket and the step relative to the row's support width."""
    new, lo, hi = halley_step(tau, lo, hi, s0, s1, s2, b_exp, B_INT)
    new = tl.where(empty, BIG, new)
    # relative to the support width max z - tau: a flat row (thousands of keys in its support,
    # width down to n^(1-alpha)) needs a proportionally smaller absolute step
    width = tl.maximum(zmax - new, 1e-6)
    step = tl.where(empty, 0.0, tl.abs(new - tau) / width)
    return new, lo, hi, step


# --------------------------------------------------------------------------- the kernel


@triton.jit
def _tau_kernel(
    Q, K, V, TAU, O, INVL, O2, MASK, LIST, LENS, STATS,
    seq_len, H, GROUP, TM, TN, n_mblocks, n_stiles,
    c, b_exp, hi_exp, tol, niter,
    B_INT: tl.constexpr, INIT: tl.constexpr, TOPK: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, TIGHTEN: tl.constexpr,
    CODES: tl.constexpr,
    WITH_STATS: tl.constexpr, FORWARD: tl.constexpr, NEED_INVL: tl.constexpr, NEED_O2: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BNS: tl.constexpr, BD: tl.constexpr, MM: tl.constexpr,
    MN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = n_mblocks - 1 - tl.program_id(0)  # heaviest (causal) row blocks first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = pid_bh.to(tl.int64) * seq_len * HEAD_DIM
    kv_base = (b * (H // GROUP) + h // GROUP).to(tl.int64) * seq_len * HEAD_DIM
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    if HAS_VARLEN:
        length = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), seq_len)
    else:
        length = seq_len
    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # valid keys per row; the keys to sweep; the leading keys that need no masking
    row0 = pid_m * BM
    if IS_CAUSAL:
        n_valid = tl.minimum(offs_m + 1, length)
        kv_stop = tl.minimum(row0 + BM, length)
        kv_full = tl.minimum(length, row0 + 1)
    else:
        n_valid = tl.zeros([BM], dtype=tl.int32) + length
        kv_stop = length
        kv_full = length
    row_ok = offs_m < length
    n_valid = tl.where(row_ok, n_valid, 0)
    kv_stop = tl.where(row0 < length, kv_stop, 0)
    kv_full = tl.minimum(kv_full, kv_stop)
    empty = n_valid == 0

    mask_base = pid_bh.to(tl.int64) * TM * TN
    grows = pid_m * (BM // MM) + tl.arange(0, BM // MM)
    lst = LIST + (pid_bh.to(tl.int64) * n_mblocks + pid_m) * n_stiles

    # 1. the dense pass
    j_stop = tl.cdiv(kv_stop, BN)
    m, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7 = _dense_stage(
        q, K, kv_base, kv_full, kv_stop, offs_m, offs_d, seq_len, length, c, row_ok, MASK, mask_base, grows, TM, TN,
        IS_CAUSAL, EVEN_D, EVEN_N, HEAD_DIM, TOPK, CODES, BM, BN, MM, MN, DOT_PREC)
    zmax = tl.where(empty, 0.0, m * c)

    # 2. the bracket and the start
    nf = tl.maximum(n_valid, 1).to(tl.float32)
    if B_INT == 1:
        hi = zmax - 1.0 / nf
    elif B_INT == 2:
        hi = zmax - tl.math.rsqrt(nf)
    else:
        hi = zmax - tl.math.exp2(hi_exp * tl.math.log2(nf))
    lo = zmax - 1.0
    if INIT == 2:
        top = _join8(a0, a1, a2, a3, a4, a5, a6, a7, BM)
        if TOPK == 16:
            top = tl.reshape(tl.join(top, _join8(b0, b1, b2, b3, b4, b5, b6, b7, BM)), (BM, 16))
        tau = subset_tau(top * c, zmax, b_exp, B_INT, 8)
        tau = tl.minimum(tl.maximum(tau, lo), hi)
    elif INIT == 1:
        tau = 0.5 * (lo + hi)
    else:
        tau = lo
    tau = tl.where(empty, BIG, tau)
    lo = tl.where(empty, BIG, lo)
    hi = tl.where(empty, BIG, hi)

    # 3. sparse Halley sweeps; the first re-bases the chunk codes on its tau (tau_ref)
    offs_ns = tl.arange(0, BNS)
    js_full = kv_full // BNS
    js_stop = tl.cdiv(kv_stop, BNS)
    if WITH_STATS:
        tl.atomic_add(STATS, 1)
    tau_ref = tau
    rebase = _group_max(tl.where(row_ok, zmax - tau, float("-inf")), BM, MM)
    zero_g = tl.zeros_like(rebase)
    # one loop body for every sweep (each copy of a sweep costs Triton's compile time far more
    # than its size); the first sweep (it == 0) differs only in uniform branches: it re-bases
    # the codes on tau_ref while listing (without codes: lists every tile) and tightens them
    TIGHT_FIRST: tl.constexpr = TIGHTEN or not CODES
    it = pid_bh * 0
    go = it < 1
    while go:
        first = it == 0
        if first:
            shift = zero_g
            rebase_now = rebase
            n_coded = j_stop * (BN // MN)
        else:
            shift = _group_max(tl.where(row_ok, tau_ref - tau, float("-inf")), BM, MM)
            rebase_now = zero_g
            n_coded = js_stop * (BNS // MN)
        if CODES:
            n_list = _list_tiles(lst, MASK, mask_base, grows, TM, TN, js_stop, n_coded, shift, rebase_now, first,
                                 BM, MM, BNS // MN)
        else:  # a second dense pass first: every tile, each chunk's code made exact
            if first:
                n_list = _list_all(lst, js_stop)
            else:
                n_list = _list_tiles(lst, MASK, mask_base, grows, TM, TN, js_stop, n_coded, shift, rebase_now,
                                     first, BM, MM, BNS // MN)
        n_lead = _count_below(lst, n_list, js_full)
        s0 = tl.zeros([BM], dtype=tl.float32)
        s1 = tl.zeros([BM], dtype=tl.float32)
        s2 = tl.zeros([BM], dtype=tl.float32)
        s0, s1, s2 = _sweep(s0, s1, s2, q, K, kv_base, lst, n_lead, n_list, tau, c, b_exp, row_ok, offs_m, offs_ns,
                            offs_d, seq_len, length, MASK, mask_base, grows, TM, TN, first & TIGHT_FIRST,
                            B_INT, IS_CAUSAL, EVEN_D, EVEN_N, HEAD_DIM, BM, BNS, MM, MN, DOT_PREC)
        if WITH_STATS:
            slot = tl.minimum(it, _MAX_SWEEPS_C - 1)
            tl.atomic_add(STATS + 1 + slot, n_list)
            tl.atomic_add(STATS + 1 + _MAX_SWEEPS_C + slot, 1)
        tau, lo, hi, step = _halley(tau, lo, hi, s0, s1, s2, zmax, empty, b_exp, B_INT)
        it += 1
        go = (it < niter) & (tl.max(step, axis=0) > tol)
    tl.store(TAU + pid_bh.to(tl.int64) * seq_len + offs_m, tau, mask=offs_m < seq_len)
    shift = _group_max(tl.where(row_ok, tau_ref - tau, float("-inf")), BM, MM)

    # 3b. (fwd_mode="fused") the sparse forward of these rows: the key tiles holding a chunk
    # whose bound clears the final tau, the same tiles the staged forward's lists hold
    if FORWARD:
        n_list = _list_tiles(lst, MASK, mask_base, grows, TM, TN, js_stop, js_stop * (BNS // MN), shift, zero_g,
                             False, BM, MM, BNS // MN)
        n_lead = _count_below(lst, n_list, js_full)
        row_in = offs_m < seq_len
        forward_rows(O, INVL, O2, q, tau, K, V, kv_base, lst, n_lead, n_list, offs_m, offs_ns, offs_d,
                     q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                     row_in[:, None] & (offs_d[None, :] < HEAD_DIM), pid_bh.to(tl.int64) * seq_len + offs_m, row_in,
                     seq_len, length, c, b_exp, B_INT, IS_CAUSAL, NEED_INVL, NEED_O2, HEAD_DIM, EVEN_D, EVEN_N,
                     BM, BNS, BD, DOT_PREC)

    # 4. the block mask as 0/1 for every chunk of this program's row groups
    chunk_stop = js_stop * (BNS // MN)
    ccols0 = tl.arange(0, 64)
    for c0 in range(0, TN, 64):
        ccols = c0 + ccols0
        cptrs = MASK + mask_base + grows[:, None] * TN + ccols[None, :]
        inb = (grows[:, None] < TM) & (ccols[None, :] < TN)
        live = inb & (ccols[None, :] < chunk_stop)
        bound = _decode(tl.load(cptrs, mask=live, other=-127))
        tl.store(cptrs, (live & (bound + shift[:, None] > 0)).to(tl.int8), mask=inb)


# --------------------------------------------------------------------------- launcher


def mask_shape(geo: Geometry, config: Config) -> tuple[int, int]:
    """(rows, cols) of one head's block mask at the config's mask tile."""
    return triton.cdiv(geo.seq_len, config["mask_m"]), triton.cdiv(geo.seq_len, config["mask_n"])


def tau_scratch_size(geo: Geometry, config: Config) -> int:
    """int32 entries of the sweep lists' scratch (one list of key tiles per program)."""
    return geo.rows * triton.cdiv(geo.seq_len, config["tau_block_m"]) * triton.cdiv(
        geo.seq_len, config["tau_sweep_block_n"])


def resolve_tol(config: Config, dtype: torch.dtype, alpha: float) -> float:
    """The early-exit Halley step of ``config`` (``"auto"`` picks one per dtype and alpha)."""
    tol = config["tau_tol"]
    if tol != "auto":
        return float(tol)
    if dtype == torch.float32:
        return TAU_TOL_AUTO[("float32", "any")]
    return TAU_TOL_AUTO[("16bit", "1.5" if alpha == 1.5 else "other")]


#: tau_init -> (INIT, TOPK): the start, and how many tile maxima the dense pass keeps for it.
_INIT = {"lo": (0, 0), "mid": (1, 0), "subset": (2, 8), "subset16": (2, 16)}


@functools.lru_cache(maxsize=512)
def tau_launch(geo: Geometry, config: Config, alpha: float, scale: float, is_causal: bool, has_varlen: bool,
               dtype: torch.dtype, with_stats: bool, forward: bool = False, need_invl: bool = False,
               need_o2: bool = False) -> Launch:
    """The tau kernel's launch for one problem and config (grid, scalars, constexprs, options):
    planned once, so a warm call only allocates and launches. ``forward``: the fused kernel that
    also runs the sparse forward of its rows (``fwd_mode="fused"``)."""
    bm, bn, bns = config["tau_block_m"], config["tau_block_n"], config["tau_sweep_block_n"]
    tm, tn = mask_shape(geo, config)
    n_mblocks = triton.cdiv(geo.seq_len, bm)
    init, topk = _INIT[config["tau_init"]]
    scalars = (geo.seq_len, geo.q_heads, geo.group, tm, tn, n_mblocks, triton.cdiv(geo.seq_len, bns),
               (alpha - 1.0) * scale, 1.0 / (alpha - 1.0), 1.0 - alpha, resolve_tol(config, dtype, alpha),
               int(config["niter"]))
    meta = dict(
        B_INT=integer_b(alpha), INIT=init, TOPK=topk, IS_CAUSAL=is_causal,
        HAS_VARLEN=has_varlen, HEAD_DIM=geo.head_dim, EVEN_D=geo.even_d, EVEN_N=geo.even_n(bn, bns),
        TIGHTEN=config["mask_source"] == "sweeps", CODES=config["tau_dense_passes"] == 1,
        WITH_STATS=with_stats, FORWARD=forward, NEED_INVL=forward and need_invl, NEED_O2=forward and need_o2,
        BM=bm, BN=bn, BNS=bns, BD=geo.block_d, MM=config["mask_m"], MN=config["mask_n"],
        DOT_PREC=dot_precision(dtype),
        num_warps=config["tau_warps"], num_stages=config["tau_stages"],
    )
    return Launch(_tau_kernel, (n_mblocks, geo.rows), scalars, meta)


def solve_tau(
    q: torch.Tensor,
    k: torch.Tensor,
    varlen: torch.Tensor | None,
    alpha: float,
    scale: float,
    is_causal: bool,
    config: Config,
    mask: torch.Tensor,
    scratch: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    geo: Geometry | None = None,
) -> torch.Tensor:
    """tau (B*Hq, N) float32 in z units; writes every entry of ``mask`` (B*Hq, TM, TN) int8 as the
    0/1 block mask. q, k contiguous. ``scratch``: int32 with at least :func:`tau_scratch_size`
    entries (allocated when None). ``stats`` (optional, int32 of STATS_SLOTS zeros) receives the
    sweep counters (programs, tiles visited per sweep, programs per sweep). ``out``: where to write
    tau (contiguous float32 (B*Hq, N)), allocated when None. ``geo``: ``Geometry.of(q, k)`` when
    the caller has it."""
    geo = Geometry.of(q, k) if geo is None else geo
    run = tau_launch(geo, config, alpha, scale, is_causal, varlen is not None, q.dtype, stats is not None)
    if scratch is None:
        scratch = torch.empty(tau_scratch_size(geo, config), dtype=torch.int32, device=q.device)
    return _launch(run, geo, q, k, k, varlen, mask, scratch, out, stats=stats)


def _launch(run: Launch, geo: Geometry, q, k, v, varlen, mask, scratch, tau_out, *, stats=None, out=None,
            inv_l=None, o2=None) -> torch.Tensor:
    """Launch the tau kernel (with or without the fused forward): allocates tau when ``tau_out``
    is None and passes tau as the dummy pointer of every buffer the launch does not use."""
    tau = torch.empty((geo.rows, geo.seq_len), dtype=torch.float32, device=q.device) if tau_out is None else tau_out
    dummy = tau
    run(q, k, v, tau, out if out is not None else dummy, inv_l if inv_l is not None else dummy,
        o2 if o2 is not None else (out if out is not None else dummy), mask, scratch,
        varlen if varlen is not None else dummy, stats if stats is not None else dummy)
    return tau


def solve_tau_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    varlen: torch.Tensor | None,
    alpha: float,
    scale: float,
    is_causal: bool,
    config: Config,
    mask: torch.Tensor,
    scratch: torch.Tensor,
    *,
    need_o2: bool = False,
    tau_out: torch.Tensor | None = None,
    inv_l_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    o2_out: torch.Tensor | None = None,
    geo: Geometry | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``fwd_mode="fused"``: tau, the block mask and the sparse forward in one launch, each
    program running the forward of its own rows over the key tiles (``tau_block_m`` x
    ``tau_sweep_block_n``) that hold support. Returns (out in q's shape and dtype, tau, O2 or
    None); writes ``inv_l_out`` (1 / sum p) when given. Buffers as in :func:`solve_tau` and
    ``sparse_forward`` (None: allocated)."""
    geo = Geometry.of(q, k) if geo is None else geo
    run = tau_launch(geo, config, alpha, scale, is_causal, varlen is not None, q.dtype, False, True,
                     inv_l_out is not None, need_o2)
    out = alloc(q.shape, q.dtype, q.device) if out is None else out
    o2 = (alloc(q.shape, q.dtype, q.device) if o2_out is None else o2_out) if need_o2 else None
    tau = _launch(run, geo, q, k, v, varlen, mask, scratch, tau_out, out=out, inv_l=inv_l_out, o2=o2)
    return out, tau, o2
