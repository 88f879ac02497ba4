"""Stage 1: the per-row threshold tau and the block mask, in one dense pass plus sparse sweeps.

One program owns ``tau_block_m`` query rows of one head.

1. **The dense pass** sweeps every key tile once (``tau_block_n`` keys a step) for the row max. On
   the way it keeps, per (``mask_m``-row group, ``mask_n``-key chunk), an upper bound of the
   chunk's largest ``z - max z`` (the running max is a lower bound of the final one), stored as an
   int8 code in the mask buffer itself; and per row the largest score of a few 16-key chunks (one
   slot per chunk column, each slot the max over every ``slots``-th tile: disjoint subsets, so each
   is a real score of the row).
2. **The start.** With ``tau_init="subset"`` Halley starts at the threshold of those candidate
   scores (kernels/threshold.py): a lower bound of the row's tau, within a small fraction of the
   support width when the support is a few dozen keys. ``"mid"`` / ``"lo"`` start at the middle or
   the lower end of the bracket ``[max - 1, max - n^(1-alpha)]``.
3. **Sparse sweeps.** Each Halley sweep evaluates ``f, f', f''`` at the rows' current tau and
   visits only the key tiles (``tau_sweep_block_n`` keys) holding a chunk whose bound exceeds
   ``tau - max z`` for some row of its group: a chunk whose every score is at most tau adds
   exactly nothing to those sums, so skipping it is exact. With ``mask_source="sweeps"`` a visited
   chunk's bound is replaced by its exact value (tighter masks and later sweeps). The loop stops on
   the device once every row's step is at most ``tau_tol`` of its support width ``max z - tau``
   (``niter`` is a cap): no host synchronisation, CUDA-graph safe.
4. **The mask.** Finally every chunk of the program's row groups is written as 0/1: active when its
   bound exceeds ``tau - max z`` for some row of the group (a superset of the chunks holding
   ``z > tau``, so the sparse products computed from it are exact). Every entry of the mask is
   written, so the buffer needs no zero-filling.

Units: ``z = c * q.k`` with ``c = (alpha - 1) * scale``; tau is in z units.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..declarations.attention import TAU_TOL_AUTO
from ..powers import tau_terms
from ..problem import integer_b
from ..spec import Config
from ..threshold import subset_tau
from .common import BIG, Geometry, dot_precision

__all__ = ["solve_tau", "resolve_tol", "mask_shape", "STATS_SLOTS", "CAND_CHUNK"]

#: Keys per candidate chunk of the subset start (the row max of each 16-key chunk of a tile).
CAND_CHUNK = 16
#: Candidate scores kept per row for the subset start.
_CANDIDATES = 16
#: Entries of the optional statistics buffer: [0] programs, [1 + k] tiles visited by sweep k,
#: [1 + MAX_SWEEPS + k] programs that ran sweep k.
_MAX_SWEEPS = 32
STATS_SLOTS = 1 + 2 * _MAX_SWEEPS
#: Mask codes: an upper bound g <= 0 of (chunk max - row max) in z units is stored as
#: -floor(sqrt(min(-g, 4)) * CODE_SCALE) in int8; decoding gives -(code / CODE_SCALE)^2 >= g.
_CODE_SCALE = 63.5


@triton.jit
def _load_k(K, kv_base, cols, offs_d, seq_len, LOAD_N_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
            EVEN_D: tl.constexpr):
    ptrs = K + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
    if LOAD_N_MASK:
        k = tl.load(ptrs, mask=(cols[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif EVEN_D:
        k = tl.load(ptrs)
    else:
        k = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return k


@triton.jit
def _valid(cols, offs_m, length, IS_CAUSAL: tl.constexpr):
    valid = cols[None, :] < length
    if IS_CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _encode(g):
    """int8 code of bounds g <= 0 (z units; -inf allowed): decoding never falls below g."""
    e = tl.sqrt(tl.minimum(tl.maximum(-g, 0.0), 4.0)) * 63.5
    return (-tl.floor(e)).to(tl.int8)


@triton.jit
def _decode(code):
    e = code.to(tl.float32) * (1.0 / 63.5)
    return -(e * e)


@triton.jit
def _group_max(x, BM: tl.constexpr, MM: tl.constexpr, NC: tl.constexpr):
    """[BM, NC] -> [BM // MM, NC]: the max over each group of MM rows."""
    return tl.max(tl.reshape(x, (BM // MM, MM, NC)), axis=1)


@triton.jit
def _chunk_max(x, BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
    """[BM, BN] -> [BM, BN // W]: the max over each chunk of W columns."""
    return tl.max(tl.reshape(x, (BM, BN // W, W)), axis=2)


@triton.jit
def _dense_pass(m, cand, q, K, kv_base, j_lo, j_hi, offs_m, offs_n, offs_d, seq_len, length, c, row_ok,
                MASK, mask_base, mrows, TM, TN,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, MM: tl.constexpr, MN: tl.constexpr, SLOTS: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Row max, chunk-bound codes and candidate scores over key tiles [j_lo, j_hi)."""
    NCC: tl.constexpr = BN // 16
    NCM: tl.constexpr = BN // MN
    slot_ids = tl.arange(0, SLOTS)
    mcols0 = tl.arange(0, NCM)
    for j in range(j_lo, j_hi):
        cols = j * BN + offs_n
        k = _load_k(K, kv_base, cols, offs_d, seq_len, MASKED, HEAD_DIM, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASKED:
            s = tl.where(_valid(cols, offs_m, length, IS_CAUSAL), s, float("-inf"))
        cm = _chunk_max(s, BM, BN, 16)  # [BM, NCC]
        m = tl.maximum(m, tl.max(cm, axis=1))
        # bound of (chunk max - row max) in z units, per mask chunk, against the running max
        g = (_chunk_max(cm, BM, NCC, MN // 16) - m[:, None]) * c
        g = tl.where(row_ok[:, None], g, float("-inf"))
        code = _encode(_group_max(g, BM, MM, NCM))
        mcols = j * NCM + mcols0
        tl.store(MASK + mask_base + mrows[:, None] * TN + mcols[None, :], code,
                 mask=(mrows[:, None] < TM) & (mcols[None, :] < TN))
        # candidate scores: slot (j % SLOTS) of every 16-key chunk column keeps its max
        hit = (slot_ids == j % SLOTS)[None, :, None]
        cand = tl.where(hit, tl.maximum(cand, cm[:, None, :]), cand)
    return m, cand


@triton.jit
def _sweep(s0, s1, s2, visited, q, K, kv_base, j_lo, j_hi, tau, thr, rel, c, b_exp, row_ok,
           offs_m, offs_n, offs_d, seq_len, length, MASK, mask_base, mrows, TM, TN,
           B_INT: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
           HEAD_DIM: tl.constexpr, TIGHTEN: tl.constexpr, BM: tl.constexpr, BNS: tl.constexpr,
           MM: tl.constexpr, MN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate f, f', f'' terms at ``tau`` over the key tiles of [j_lo, j_hi) that can hold a
    score above tau (``thr`` [BM // MM]: the least ``tau - max z`` of each row group)."""
    NCM: tl.constexpr = BNS // MN
    mcols0 = tl.arange(0, NCM)
    for j in range(j_lo, j_hi):
        mcols = j * NCM + mcols0
        cptrs = MASK + mask_base + mrows[:, None] * TN + mcols[None, :]
        cmask = (mrows[:, None] < TM) & (mcols[None, :] < TN)
        bound = _decode(tl.load(cptrs, mask=cmask, other=-127))
        if tl.max(tl.max((bound > thr[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            visited += 1
            cols = j * BNS + offs_n
            k = _load_k(K, kv_base, cols, offs_d, seq_len, MASKED, HEAD_DIM, EVEN_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            u = s * c - tau[:, None]
            if MASKED:
                u = tl.where(_valid(cols, offs_m, length, IS_CAUSAL), u, float("-inf"))
            if TIGHTEN:  # the exact bound: max over the chunk of z - max z = u + (tau - max z)
                g = tl.where(row_ok[:, None], _chunk_max(u, BM, BNS, MN) + rel[:, None], float("-inf"))
                tl.store(cptrs, _encode(_group_max(g, BM, MM, NCM)), mask=cmask)
            u = tl.maximum(u, 0.0)
            t0, t1, t2 = tau_terms(u, b_exp, B_INT)
            s0 += tl.sum(t0, axis=1)
            s1 += tl.sum(t1, axis=1)
            if B_INT != 1:
                s2 += tl.sum(t2, axis=1)
    return s0, s1, s2, visited


@triton.jit
def _tau_kernel(
    Q, K, TAU, MASK, LENS, STATS,
    seq_len, H, GROUP, TM, TN, n_mblocks,
    c, b_exp, hi_exp, tol, niter,
    B_INT: tl.constexpr, INIT: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, TIGHTEN: tl.constexpr, WITH_STATS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BNS: tl.constexpr, BD: tl.constexpr, MM: tl.constexpr,
    MN: tl.constexpr, SLOTS: tl.constexpr, DOT_PREC: tl.constexpr,
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
    mrows = pid_m * (BM // MM) + tl.arange(0, BM // MM)

    # 1. the dense pass: row max, chunk bounds (mask codes), candidate scores
    offs_n = tl.arange(0, BN)
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    cand = tl.full([BM, SLOTS, BN // 16], float("-inf"), dtype=tl.float32)
    j_full = kv_full // BN
    j_stop = tl.cdiv(kv_stop, BN)
    m, cand = _dense_pass(m, cand, q, K, kv_base, 0, j_full, offs_m, offs_n, offs_d, seq_len, length, c,
                          row_ok, MASK, mask_base, mrows, TM, TN,
                          False, IS_CAUSAL, EVEN_D, HEAD_DIM, BM, BN, MM, MN, SLOTS, DOT_PREC)
    m, cand = _dense_pass(m, cand, q, K, kv_base, j_full, j_stop, offs_m, offs_n, offs_d, seq_len, length, c,
                          row_ok, MASK, mask_base, mrows, TM, TN,
                          True, IS_CAUSAL, EVEN_D, HEAD_DIM, BM, BN, MM, MN, SLOTS, DOT_PREC)
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
        vals = tl.reshape(cand, (BM, SLOTS * (BN // 16))) * c
        tau = subset_tau(vals, zmax, b_exp, B_INT, 8)
        tau = tl.minimum(tl.maximum(tau, lo), hi)
    elif INIT == 1:
        tau = 0.5 * (lo + hi)
    else:
        tau = lo
    tau = tl.where(empty, BIG, tau)
    lo = tl.where(empty, BIG, lo)
    hi = tl.where(empty, BIG, hi)

    # 3. sparse Halley sweeps
    offs_ns = tl.arange(0, BNS)
    js_full = kv_full // BNS
    js_stop = tl.cdiv(kv_stop, BNS)
    if WITH_STATS:
        tl.atomic_add(STATS, 1)
    it = pid_bh * 0
    go = it < niter
    while go:
        rel = tau - zmax
        thr = tl.min(tl.reshape(rel, (BM // MM, MM)), axis=1)
        s0 = tl.zeros([BM], dtype=tl.float32)
        s1 = tl.zeros([BM], dtype=tl.float32)
        s2 = tl.zeros([BM], dtype=tl.float32)
        visited = pid_bh * 0
        s0, s1, s2, visited = _sweep(s0, s1, s2, visited, q, K, kv_base, 0, js_full, tau, thr, rel, c, b_exp,
                                     row_ok, offs_m, offs_ns, offs_d, seq_len, length, MASK, mask_base, mrows, TM, TN,
                                     B_INT, False, IS_CAUSAL, EVEN_D, HEAD_DIM, TIGHTEN, BM, BNS, MM, MN,
                                     DOT_PREC)
        s0, s1, s2, visited = _sweep(s0, s1, s2, visited, q, K, kv_base, js_full, js_stop, tau, thr, rel, c,
                                     b_exp, row_ok, offs_m, offs_ns, offs_d, seq_len, length, MASK, mask_base, mrows,
                                     TM, TN, B_INT, True, IS_CAUSAL, EVEN_D, HEAD_DIM, TIGHTEN, BM, BNS, MM, MN,
                                     DOT_PREC)
        if WITH_STATS:
            slot = tl.minimum(it, _MAX_SWEEPS_C - 1)
            tl.atomic_add(STATS + 1 + slot, visited)
            tl.atomic_add(STATS + 1 + _MAX_SWEEPS_C + slot, 1)
        # safeguarded Halley step: kept when inside the bracket (inclusive), else bisection
        f = s0 - 1.0
        df = -b_exp * s1
        if B_INT == 1:
            d2f = s2 * 0.0
        else:
            d2f = b_exp * (b_exp - 1.0) * s2
        above = f > 0
        lo = tl.where(above, tau, lo)
        hi = tl.where(above, hi, tau)
        den = 2.0 * df * df - f * d2f
        ok = den != 0
        cand_t = tau - tl.where(ok, 2.0 * f * df / tl.where(ok, den, 1.0), 0.0)
        inside = ok & (cand_t >= lo) & (cand_t <= hi)
        new = tl.where(inside, cand_t, 0.5 * (lo + hi))
        new = tl.where(f == 0, tau, new)
        new = tl.where(empty, BIG, new)
        # the step relative to the row's support width (max z - tau): a flat row (many keys in
        # its support, width down to n^(1-alpha)) needs a proportionally smaller absolute step
        width = tl.maximum(zmax - new, 1e-6)
        step = tl.where(empty, 0.0, tl.abs(new - tau) / width)
        tau = new
        it += 1
        go = (it < niter) & (tl.max(step, axis=0) > tol)
    tl.store(TAU + pid_bh.to(tl.int64) * seq_len + offs_m, tau, mask=offs_m < seq_len)

    # 4. the block mask as 0/1 for every chunk of this program's row groups
    thr = tl.min(tl.reshape(tau - zmax, (BM // MM, MM)), axis=1)
    chunk_stop = tl.cdiv(kv_stop, MN)
    ccols0 = tl.arange(0, 64)
    for c0 in range(0, TN, 64):
        ccols = c0 + ccols0
        cptrs = MASK + mask_base + mrows[:, None] * TN + ccols[None, :]
        inb = (mrows[:, None] < TM) & (ccols[None, :] < TN)
        live = inb & (ccols[None, :] < chunk_stop)
        bound = _decode(tl.load(cptrs, mask=live, other=-127))
        tl.store(cptrs, (live & (bound > thr[:, None])).to(tl.int8), mask=inb)


_MAX_SWEEPS_C = tl.constexpr(_MAX_SWEEPS)


def mask_shape(geo: Geometry, config: Config) -> tuple[int, int]:
    """(rows, cols) of one head's block mask at the config's mask tile."""
    return triton.cdiv(geo.seq_len, config["mask_m"]), triton.cdiv(geo.seq_len, config["mask_n"])


def resolve_tol(config: Config, dtype: torch.dtype, alpha: float) -> float:
    """The early-exit Halley step of ``config`` (``"auto"`` picks one per dtype and alpha)."""
    tol = config["tau_tol"]
    if tol != "auto":
        return float(tol)
    if dtype == torch.float32:
        return TAU_TOL_AUTO[("float32", "any")]
    return TAU_TOL_AUTO[("16bit", "1.5" if alpha == 1.5 else "other")]


_INIT = {"lo": 0, "mid": 1, "subset": 2}


def solve_tau(
    q: torch.Tensor,
    k: torch.Tensor,
    varlen: torch.Tensor | None,
    alpha: float,
    scale: float,
    is_causal: bool,
    config: Config,
    mask: torch.Tensor,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau (B*Hq, N) float32 in z units; writes every entry of ``mask`` (B*Hq, TM, TN) int8 as the
    0/1 block mask. q, k contiguous. ``stats`` (optional, int32 of STATS_SLOTS zeros) receives
    counters of the sweeps (programs, tiles visited per sweep, programs per sweep)."""
    geo = Geometry.of(q, k)
    bm, bn, bns = config["tau_block_m"], config["tau_block_n"], config["tau_sweep_block_n"]
    tm, tn = mask_shape(geo, config)
    tau = torch.empty((geo.rows, geo.seq_len), dtype=torch.float32, device=q.device)
    n_mblocks = triton.cdiv(geo.seq_len, bm)
    lens = varlen if varlen is not None else tau  # dummy pointer when there is no varlen
    _tau_kernel[(n_mblocks, geo.rows)](
        q, k, tau, mask, lens, stats if stats is not None else tau,
        geo.seq_len, geo.q_heads, geo.group, tm, tn, n_mblocks,
        (alpha - 1.0) * scale, 1.0 / (alpha - 1.0), 1.0 - alpha, resolve_tol(config, q.dtype, alpha),
        int(config["niter"]),
        B_INT=integer_b(alpha), INIT=_INIT[config["tau_init"]], IS_CAUSAL=is_causal,
        HAS_VARLEN=varlen is not None, HEAD_DIM=geo.head_dim, EVEN_D=geo.even_d,
        TIGHTEN=config["mask_source"] == "sweeps", WITH_STATS=stats is not None,
        BM=bm, BN=bn, BNS=bns, BD=geo.block_d, MM=config["mask_m"], MN=config["mask_n"],
        SLOTS=max(1, _CANDIDATES // (bn // CAND_CHUNK)), DOT_PREC=dot_precision(q.dtype),
        num_warps=config["tau_warps"], num_stages=config["tau_stages"],
    )
    return tau
