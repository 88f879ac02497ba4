"""Stage 1: the per-row threshold tau by safeguarded Halley sweeps, writing the block mask.

One program owns ``tau_block_m`` query rows of one head and sweeps their keys in ``tau_block_n``
tiles: first for the row max (which gives the bracket ``[m - 1, m - n^(1-alpha)]``), then up to
``niter`` times for ``f, f', f''`` at the current tau. It stops early once every row's Halley step
is at most ``tau_tol`` times the row's support width ``max z - tau`` (relative, so flat rows with
thousands of keys in their support converge as far as peaked ones; the loop count is decided on
the device: no host synchronisation).

The block mask, at (``mask_m`` x ``mask_n``) granularity, is written on the way: a tile is active
when any of its scores exceeds a lower bound of the final tau, so the mask is a superset of the
output's support and the sparse output computed from it is exact. ``mask_source="max"`` (default)
writes it in the max sweep against ``running max - 1`` (free in the Halley sweeps, looser);
``"sweeps"`` rewrites it in every Halley sweep against the bracket's lower bound (the last sweep to
run writes the tightest mask; costs every sweep a max-reduction per score).

Keys wholly visible to every row of the program (left of the causal diagonal and inside the valid
length) are swept without any masking; only the remaining edge tiles pay for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..declarations.attention import TAU_TOL_AUTO
from ..spec import Config
from .common import BIG, Geometry, alpha_mode, dot_precision, tau_terms

__all__ = ["solve_tau", "resolve_tol", "mask_shape"]


@triton.jit
def _scores(q, K, k_base, stride_kn, start_n, offs_n, offs_d, seq_len, head_dim,
            LOAD_N_MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """q (BM, BD) . K[start_n : start_n + BN]^T in float32."""
    cols = start_n + offs_n
    ptrs = K + k_base + cols[:, None] * stride_kn + offs_d[None, :]
    if LOAD_N_MASK:
        k = tl.load(ptrs, mask=(cols[:, None] < seq_len) & (offs_d[None, :] < head_dim), other=0.0)
    elif EVEN_D:
        k = tl.load(ptrs)
    else:
        k = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PREC)


@triton.jit
def _max_sweep(m, q, K, k_base, stride_kn, j_lo, j_hi, offs_m, offs_n, offs_d, seq_len, length,
               head_dim, inv_c, MASK, mask_base, mask_row0, TM, TN,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               WRITE_MASK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MM: tl.constexpr,
               MN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Row max over key tiles [j_lo, j_hi). With WRITE_MASK, also the block mask against the
    running max: a tile is active when some score exceeds (running max - 1/c), i.e. z > m_run - 1.
    The running max never exceeds the final one, so this is a superset of the z > m - 1 mask."""
    mrows = mask_row0 + tl.arange(0, BM // MM)
    row_ok = offs_m < length
    for j in range(j_lo, j_hi):
        s = _scores(q, K, k_base, stride_kn, j * BN, offs_n, offs_d, seq_len, head_dim,
                    MASKED, EVEN_D, DOT_PREC)
        if MASKED:
            cols = j * BN + offs_n
            valid = cols[None, :] < length
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m = tl.maximum(m, tl.max(s, axis=1))
        if WRITE_MASK:
            g = tl.max(tl.reshape(s, (BM, BN // MN, MN)), axis=2)
            hit = ((g - m[:, None] + inv_c) > 0) & row_ok[:, None]  # NaN (empty row) -> False
            hit = tl.max(tl.reshape(hit.to(tl.int32), (BM // MM, MM, BN // MN)), axis=1)
            mcols = j * (BN // MN) + tl.arange(0, BN // MN)
            tl.store(MASK + mask_base + mrows[:, None] * TN + mcols[None, :], hit.to(tl.int8),
                     mask=(mrows[:, None] < TM) & (mcols[None, :] < TN))
    return m


@triton.jit
def _stat_sweep(s0, s1, s2, q, K, k_base, stride_kn, j_lo, j_hi, tau, gap, c, b_exp,
                offs_m, offs_n, offs_d, seq_len, length, head_dim,
                MASK, mask_base, mask_row0, TM, TN,
                MODE: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, WRITE_MASK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                MM: tl.constexpr, MN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate f, f', f'' terms at ``tau`` over key tiles [j_lo, j_hi). With WRITE_MASK, also
    write their mask bits: a mask tile is active when some ``z - tau > gap`` (gap = lo - tau <= 0
    per row, so: some z above the bracket's lower bound)."""
    mrows = mask_row0 + tl.arange(0, BM // MM)
    for j in range(j_lo, j_hi):
        s = _scores(q, K, k_base, stride_kn, j * BN, offs_n, offs_d, seq_len, head_dim,
                    MASKED, EVEN_D, DOT_PREC)
        u = s * c - tau[:, None]
        if MASKED:
            cols = j * BN + offs_n
            valid = cols[None, :] < length
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            u = tl.where(valid, u, float("-inf"))
        if WRITE_MASK:  # per row, max over each mask tile's columns, against the lower bound
            g = tl.max(tl.reshape(u, (BM, BN // MN, MN)), axis=2) - gap[:, None]
            g = tl.max(tl.reshape(g, (BM // MM, MM, BN // MN)), axis=1)
            mcols = j * (BN // MN) + tl.arange(0, BN // MN)
            tl.store(MASK + mask_base + mrows[:, None] * TN + mcols[None, :], (g > 0).to(tl.int8),
                     mask=(mrows[:, None] < TM) & (mcols[None, :] < TN))
        u = tl.maximum(u, 0.0)
        t0, t1, t2 = tau_terms(u, b_exp, MODE)
        s0 += tl.sum(t0, axis=1)
        s1 += tl.sum(t1, axis=1)
        if MODE != 2:
            s2 += tl.sum(t2, axis=1)
    return s0, s1, s2


@triton.jit
def _tau_kernel(
    Q, K, TAU, MASK, LENS,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    seq_len, H, GROUP, head_dim, TM, TN, n_mblocks,
    c, b_exp, hi_exp, tol, niter,
    MODE: tl.constexpr, INIT_MID: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr,
    EVEN_D: tl.constexpr, MASK_IN_SWEEPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    MM: tl.constexpr, MN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = n_mblocks - 1 - tl.program_id(0)  # heaviest (causal) row blocks first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    if HAS_VARLEN:
        length = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), seq_len)
    else:
        length = seq_len
    q = tl.load(Q + q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=(offs_m[:, None] < seq_len) & (offs_d[None, :] < head_dim), other=0.0)

    # valid keys per row, the key tiles to sweep and the leading ones that need no masking
    row0 = pid_m * BM
    if IS_CAUSAL:
        n_valid = tl.minimum(offs_m + 1, length)
        kv_stop = tl.minimum(row0 + BM, length)
        j_full = tl.minimum(length // BN, (row0 + 1) // BN)
    else:
        n_valid = tl.zeros([BM], dtype=tl.int32) + length
        kv_stop = length
        j_full = length // BN
    n_valid = tl.where(offs_m < length, n_valid, 0)
    kv_stop = tl.where(row0 < length, kv_stop, 0)
    j_stop = tl.cdiv(kv_stop, BN)
    j_full = tl.minimum(j_full, j_stop)
    empty = n_valid == 0

    mask_base = pid_bh.to(tl.int64) * TM * TN
    mask_row0 = pid_m * (BM // MM)
    inv_c = 1.0 / c
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    m = _max_sweep(m, q, K, k_base, stride_kn, 0, j_full, offs_m, offs_n, offs_d, seq_len, length,
                   head_dim, inv_c, MASK, mask_base, mask_row0, TM, TN,
                   False, IS_CAUSAL, EVEN_D, not MASK_IN_SWEEPS, BM, BN, MM, MN, DOT_PREC)
    m = _max_sweep(m, q, K, k_base, stride_kn, j_full, j_stop, offs_m, offs_n, offs_d, seq_len, length,
                   head_dim, inv_c, MASK, mask_base, mask_row0, TM, TN,
                   True, IS_CAUSAL, EVEN_D, not MASK_IN_SWEEPS, BM, BN, MM, MN, DOT_PREC)
    zmax = tl.where(empty, 0.0, m * c)
    nf = tl.maximum(n_valid, 1).to(tl.float32)
    if MODE == 1:
        hi = zmax - tl.math.rsqrt(nf)
    elif MODE == 2:
        hi = zmax - 1.0 / nf
    else:
        hi = zmax - tl.math.exp2(hi_exp * tl.math.log2(nf))
    lo = zmax - 1.0
    if INIT_MID:
        tau = 0.5 * (lo + hi)
    else:
        tau = lo
    tau = tl.where(empty, BIG, tau)
    lo = tl.where(empty, BIG, lo)
    hi = tl.where(empty, BIG, hi)

    it = tl.program_id(1) * 0
    go = it < niter
    while go:
        s0 = tl.zeros([BM], dtype=tl.float32)
        s1 = tl.zeros([BM], dtype=tl.float32)
        s2 = tl.zeros([BM], dtype=tl.float32)
        gap = lo - tau
        s0, s1, s2 = _stat_sweep(s0, s1, s2, q, K, k_base, stride_kn, 0, j_full, tau, gap, c, b_exp,
                                 offs_m, offs_n, offs_d, seq_len, length, head_dim,
                                 MASK, mask_base, mask_row0, TM, TN,
                                 MODE, False, IS_CAUSAL, EVEN_D, MASK_IN_SWEEPS, BM, BN, MM, MN, DOT_PREC)
        s0, s1, s2 = _stat_sweep(s0, s1, s2, q, K, k_base, stride_kn, j_full, j_stop, tau, gap, c, b_exp,
                                 offs_m, offs_n, offs_d, seq_len, length, head_dim,
                                 MASK, mask_base, mask_row0, TM, TN,
                                 MODE, True, IS_CAUSAL, EVEN_D, MASK_IN_SWEEPS, BM, BN, MM, MN, DOT_PREC)
        # safeguarded Halley step: keep it when inside the bracket (inclusive), else bisect
        f = s0 - 1.0
        df = -b_exp * s1
        if MODE == 2:
            d2f = s2 * 0.0
        else:
            d2f = b_exp * (b_exp - 1.0) * s2
        above = f > 0
        lo = tl.where(above, tau, lo)
        hi = tl.where(above, hi, tau)
        den = 2.0 * df * df - f * d2f
        ok = den != 0
        cand = tau - tl.where(ok, 2.0 * f * df / tl.where(ok, den, 1.0), 0.0)
        inside = ok & (cand >= lo) & (cand <= hi)
        new = tl.where(inside, cand, 0.5 * (lo + hi))
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


def solve_tau(
    q: torch.Tensor,
    k: torch.Tensor,
    varlen: torch.Tensor | None,
    alpha: float,
    scale: float,
    is_causal: bool,
    config: Config,
    mask: torch.Tensor,
) -> torch.Tensor:
    """tau (B*Hq, N) float32 in z units; fills ``mask`` (B*Hq, TM*TN) int8 (must be zeroed: tiles
    no program visits, above the causal diagonal, stay inactive). q, k contiguous."""
    geo = Geometry.of(q, k)
    bm, bn = config["tau_block_m"], config["tau_block_n"]
    tm, tn = mask_shape(geo, config)
    tau = torch.empty((geo.rows, geo.seq_len), dtype=torch.float32, device=q.device)
    n_mblocks = triton.cdiv(geo.seq_len, bm)
    lens = varlen if varlen is not None else tau  # dummy pointer when there is no varlen
    _tau_kernel[(n_mblocks, geo.rows)](
        q, k, tau, mask, lens,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        geo.seq_len, geo.q_heads, geo.group, geo.head_dim, tm, tn, n_mblocks,
        (alpha - 1.0) * scale, 1.0 / (alpha - 1.0), 1.0 - alpha, resolve_tol(config, q.dtype, alpha),
        int(config["niter"]),
        MODE=alpha_mode(alpha), INIT_MID=config["tau_init"] == "mid", IS_CAUSAL=is_causal,
        HAS_VARLEN=varlen is not None, EVEN_D=geo.even_d, MASK_IN_SWEEPS=config["mask_source"] == "sweeps",
        BM=bm, BN=bn, BD=geo.block_d,
        MM=config["mask_m"], MN=config["mask_n"], DOT_PREC=dot_precision(q.dtype),
        num_warps=config["tau_warps"], num_stages=config["tau_stages"],
    )
    return tau
