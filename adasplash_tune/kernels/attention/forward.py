"""Stage 3: the sparse forward. One program per (query tile, head) visits only the key tiles in its
list: ``O = sum_j u^b v_j / sum_j u^b`` (renormalised, so a slightly inexact tau still gives a
distribution). With ``need_stats`` it also stores ``1 / sum_j u^b`` per row for the backward, and
with ``need_o2`` the support-weighted mean ``O2 = sum_j u^(b-1) v_j / sum_j u^(b-1)`` that gives the
fused backward its ``delta = dO . O2`` (one more product per visited tile).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..launch import Launch
from ..powers import pow_b, pow_bm1
from ..problem import integer_b
from ..spec import Config
from .common import BIG, Geometry, alloc, dot_precision
from .mask import TileLists

__all__ = ["sparse_forward", "forward_tiles", "forward_rows"]


@triton.jit
def forward_tiles(acc, l_i, acc2, l2, q, tau, K, V, kv_base, LIST, n_plain, n_all,
                  offs_m, offs_n, offs_d, seq_len, length, c, b_exp,
                  B_INT: tl.constexpr, IS_CAUSAL: tl.constexpr, NEED_O2: tl.constexpr,
                  HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, BN: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """Accumulate the listed key tiles LIST[0:n_all] into (acc, l_i) (and (acc2, l2) with
    NEED_O2); tiles from ``n_plain`` on apply the causal / length mask. One loop for both kinds
    of tile (a uniform branch masks the scores): each copy of a loop body costs Triton's compile
    time far more than its size. EVEN_N: no tile reaches past ``seq_len``."""
    for i in range(0, n_all):
        j = tl.load(LIST + i)
        cols = j * BN + offs_n
        k_ptrs = K + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        v_ptrs = V + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        if EVEN_N:
            if EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            ld = (cols[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=ld, other=0.0)
            v = tl.load(v_ptrs, mask=ld, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        u = s * c - tau[:, None]
        if i >= n_plain:
            valid = cols[None, :] < length
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            u = tl.where(valid, u, 0.0)
        u = tl.maximum(u, 0.0)
        p = pow_b(u, b_exp, B_INT)
        l_i += tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        if NEED_O2:
            w = pow_bm1(u, b_exp, B_INT)
            l2 += tl.sum(w, axis=1)
            acc2 = tl.dot(w.to(v.dtype), v, acc2, input_precision=DOT_PREC)
    return acc, l_i, acc2, l2


@triton.jit
def forward_rows(O, INVL, O2, q, tau, K, V, kv_base, LIST, n_plain, n_all, offs_m, offs_n, offs_d, io_ptrs, io_mask,
                 stat, row_in, seq_len, length, c, b_exp,
                 B_INT: tl.constexpr, IS_CAUSAL: tl.constexpr, NEED_STATS: tl.constexpr, NEED_O2: tl.constexpr,
                 HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr, DOT_PREC: tl.constexpr):
    """The sparse forward of one tile of query rows over the key tiles LIST[0:n_all] (the first
    ``n_plain`` need no masking): accumulate, renormalise and store O at ``io_ptrs`` (with
    NEED_STATS 1 / sum p at ``stat``, with NEED_O2 the support-weighted mean O2). Shared by the
    forward kernel and the fused tau kernel."""
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if NEED_O2:
        acc2 = tl.zeros([BM, BD], dtype=tl.float32)
        l2 = tl.zeros([BM], dtype=tl.float32)
    else:  # unused placeholders (the loop returns them unchanged)
        acc2 = tl.zeros([1, 1], dtype=tl.float32)
        l2 = tl.zeros([1], dtype=tl.float32)
    acc, l_i, acc2, l2 = forward_tiles(acc, l_i, acc2, l2, q, tau, K, V, kv_base, LIST, n_plain, n_all,
                                       offs_m, offs_n, offs_d, seq_len, length, c, b_exp,
                                       B_INT, IS_CAUSAL, NEED_O2, HEAD_DIM, EVEN_D, EVEN_N, BN, DOT_PREC)
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    tl.store(O + io_ptrs, (acc * inv[:, None]).to(O.dtype.element_ty), mask=io_mask)
    if NEED_STATS:
        tl.store(INVL + stat, inv, mask=row_in)
    if NEED_O2:
        inv2 = tl.where(l2 > 0, 1.0 / tl.where(l2 > 0, l2, 1.0), 0.0)
        tl.store(O2 + io_ptrs, (acc2 * inv2[:, None]).to(O2.dtype.element_ty), mask=io_mask)


@triton.jit
def _fwd_kernel(
    Q, K, V, TAU, O, INVL, O2, LIST, COUNT, LENS,
    seq_len, H, GROUP, n_qt, n_kt, c, b_exp,
    B_INT: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr, NEED_STATS: tl.constexpr,
    NEED_O2: tl.constexpr,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = n_qt - 1 - tl.program_id(0)  # heaviest (causal) query tiles first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = pid_bh.to(tl.int64) * seq_len * HEAD_DIM
    kv_base = (b * (H // GROUP) + h // GROUP).to(tl.int64) * seq_len * HEAD_DIM
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    if HAS_VARLEN:
        length = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), seq_len)
    else:
        length = seq_len
    row_in = offs_m < seq_len
    io_mask = row_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    io_ptrs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + io_ptrs, mask=io_mask, other=0.0)
    stat = pid_bh.to(tl.int64) * seq_len + offs_m
    tau = tl.load(TAU + stat, mask=row_in, other=BIG)

    row = pid_bh.to(tl.int64) * n_qt + pid_m
    count = tl.load(COUNT + row * 2)
    plain = tl.load(COUNT + row * 2 + 1)
    lst = LIST + row * n_kt

    forward_rows(O, INVL, O2, q, tau, K, V, kv_base, lst, plain, count, offs_m, offs_n, offs_d, io_ptrs, io_mask,
                 stat, row_in, seq_len, length, c, b_exp, B_INT, IS_CAUSAL, NEED_STATS, NEED_O2, HEAD_DIM, EVEN_D,
                 EVEN_N, BM, BN, BD, DOT_PREC)


@functools.lru_cache(maxsize=512)
def forward_launch(geo: Geometry, config: Config, alpha: float, scale: float, is_causal: bool, has_varlen: bool,
                   dtype: torch.dtype, need_stats: bool, need_o2: bool) -> Launch:
    """The forward kernel's launch for one problem and config (query-major lists of the config's
    forward tiles): planned once, so a warm call only allocates and launches."""
    bm, bn = config["fwd_block_m"], config["fwd_block_n"]
    n_q, n_k = triton.cdiv(geo.seq_len, bm), triton.cdiv(geo.seq_len, bn)
    scalars = (geo.seq_len, geo.q_heads, geo.group, n_q, n_k, (alpha - 1.0) * scale, 1.0 / (alpha - 1.0))
    meta = dict(
        B_INT=integer_b(alpha), IS_CAUSAL=is_causal, HAS_VARLEN=has_varlen, NEED_STATS=need_stats,
        NEED_O2=need_o2, HEAD_DIM=geo.head_dim, EVEN_D=geo.even_d, EVEN_N=geo.even_n(bn), BM=bm, BN=bn,
        BD=geo.block_d, DOT_PREC=dot_precision(dtype), num_warps=config["fwd_warps"], num_stages=config["fwd_stages"],
    )
    return Launch(_fwd_kernel, (n_q, geo.rows), scalars, meta)


def sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: torch.Tensor,
    lists: TileLists,
    varlen: torch.Tensor | None,
    alpha: float,
    scale: float,
    is_causal: bool,
    config: Config,
    *,
    need_stats: bool,
    need_o2: bool = False,
    inv_l_out: torch.Tensor | None = None,
    geo: Geometry | None = None,
    out: torch.Tensor | None = None,
    o2_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(out (B, Hq, N, D) in q's dtype, 1 / sum p (B*Hq, N) float32 or None, O2 in q's shape and
    dtype or None).

    q, k, v contiguous; ``lists`` built for (fwd_block_m, fwd_block_n) query-major tiles;
    ``inv_l_out``: where to write 1 / sum p (contiguous float32 (B*Hq, N)), allocated when None.
    ``out`` / ``o2_out``: where to write the output / O2 (contiguous, q's shape and dtype),
    allocated when None (a row-chunked caller passes slices of its full buffers).
    ``geo``: ``Geometry.of(q, k)`` when the caller has it."""
    geo = Geometry.of(q, k) if geo is None else geo
    run = forward_launch(geo, config, alpha, scale, is_causal, varlen is not None, q.dtype, need_stats, need_o2)
    if (lists.n_own, lists.n_cand) != run.scalars[3:5]:
        raise ValueError(f"lists of {lists.n_own} x {lists.n_cand} tiles do not match the forward tiles "
                         f"{config['fwd_block_m']} x {config['fwd_block_n']} of the config")
    if out is None:
        out = alloc(q.shape, q.dtype, q.device)
    inv_l = None
    if need_stats:
        inv_l = alloc((geo.rows, geo.seq_len), torch.float32, q.device) if inv_l_out is None else inv_l_out
    o2 = None
    if need_o2:
        o2 = alloc(q.shape, q.dtype, q.device) if o2_out is None else o2_out
    lens = varlen if varlen is not None else tau
    run(q, k, v, tau, out, inv_l if need_stats else tau, o2 if need_o2 else out, lists.index, lists.count, lens)
    return out, inv_l, o2
