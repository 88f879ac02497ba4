"""Stage 4: the sparse backward; P is recomputed from tau, never stored.

With ``p = u^b / l`` (l = sum u^b), ``s = p^(2-alpha) = u^(b-1) * l^(alpha-2)``,
``dP = dO V^T`` and ``delta_i = sum_j s_ij dP_ij / sum_j s_ij``, the score gradient is
``dx = s * (dP - delta)``; then ``dq = scale * dx K``, ``dk = scale * dx^T Q``, ``dv = P^T dO``.

* dQ runs first: one program per (query tile, head) walks the key tiles listed for it and
  accumulates ``A = sum_j s_ij dP_ij k_j``, ``B = sum_j s_ij k_j`` and the two row sums of delta in
  the same pass, so ``dq = scale * (A - delta * B)`` needs no delta beforehand; it stores delta.
  (The forward therefore needs no second output accumulator.)
* dK/dV: one program per (key tile, kv head) walks, for each query head of its GQA group, the
  query tiles listed for that key tile; it owns its dk/dv rows, so no atomics. It reads one
  16-byte record per query row that the dQ kernel wrote, ``[c r, tau r, delta, 0]`` with
  ``r = inv_l^(alpha-1)``: then ``a = r (z - tau) = max(s * (c r) - tau r, 0)``, ``p = a^b`` and
  ``s_ij = a^(b-1)`` with no power of inv_l per tile and two products per score fewer
  (H200, bf16, 16k causal: dK/dV 2.85 -> 2.38 ms at alpha 1.5, 0.70 -> 0.36 ms at 4/3 with 4096
  keys, ``benchmarks/results/h200-bwd-records-ab.json``).

``bwd_mode="fused"`` instead runs one kernel per (key tile, kv head) that also adds each visited
tile's share of dQ into a float32 buffer with atomic adds: five products per visited tile instead
of eight. It needs delta before it starts: ``delta_i = dO_i . O2_i`` with the support-weighted mean
``O2 = sum_j s_ij v_j / sum_j s_ij`` that the forward then keeps (kernels/attention/forward.py).
Atomic adds make dQ's summation order vary between runs (not bitwise deterministic).
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

__all__ = ["sparse_backward_kv", "sparse_backward_q", "sparse_backward_fused"]


@triton.jit
def _row_weight_scale(inv_l, sfac_exp, B_INT: tl.constexpr):
    """l^(alpha-2) = inv_l^(2-alpha) per row (0 for rows without support; once per row)."""
    if B_INT == 2:
        r = tl.sqrt(inv_l)
    elif B_INT == 1:
        r = tl.where(inv_l > 0, 1.0, 0.0)
    else:
        pos = inv_l > 0
        r = tl.where(pos, tl.math.exp2(sfac_exp * tl.math.log2(tl.where(pos, inv_l, 1.0))), 0.0)
    return r


@triton.jit
def _row_prob_scale(inv_l, b_exp, B_INT: tl.constexpr):
    """r = inv_l^(alpha - 1) = inv_l^(1/b) per row (0 without support): with a = r * u,
    p = a^b and the weight p^(2-alpha) = a^(b-1), no per-score normalisation left."""
    if B_INT == 1:
        r = inv_l
    elif B_INT == 2:
        r = tl.sqrt(inv_l)
    elif B_INT == 4:
        r = tl.sqrt(tl.sqrt(inv_l))
    else:
        pos = inv_l > 0
        r = tl.where(pos, tl.math.exp2(tl.math.log2(tl.where(pos, inv_l, 1.0)) / b_exp), 0.0)
    return r


@triton.jit
def _load_records(ROWS, stat_base, offs_m, row_in):
    """The dQ kernel's per-row records [c * r, tau * r, delta, 0] of rows ``offs_m`` (zeros for rows
    out of range: a = 0 there) as three [BM] vectors, from one 16-byte load per row."""
    rec = tl.load(ROWS + (stat_base + offs_m)[:, None] * 4 + tl.arange(0, 4)[None, :], mask=row_in[:, None],
                  other=0.0)
    even, odd = tl.split(tl.reshape(rec, (offs_m.shape[0], 2, 2)))  # fields (0, 2) and (1, 3)
    cr, delta = tl.split(even)
    tr, _ = tl.split(odd)
    return cr, tr, delta


@triton.jit
def _kv_tiles(dk, dv, k, v, Q, DO, ROWS, q_base, stat_base, LIST, i_lo, i_hi,
              offs_n, offs_mb, offs_d, seq_len, length, b_exp,
              B_INT: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
              BM: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(i_lo, i_hi):
        qt = tl.load(LIST + i)
        offs_m = qt * BM + offs_mb
        row_in = offs_m < seq_len
        ld = row_in[:, None] & (offs_d[None, :] < HEAD_DIM)
        ptrs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + ptrs, mask=ld, other=0.0)
        do = tl.load(DO + ptrs, mask=ld, other=0.0)
        cr, tr, delta = _load_records(ROWS, stat_base, offs_m, row_in)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BN, BM)
        a = st * cr[None, :] - tr[None, :]  # r * (z - tau)
        if MASKED:
            valid = offs_n[:, None] < length
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            a = tl.where(valid, a, 0.0)
        a = tl.maximum(a, 0.0)
        p = pow_b(a, b_exp, B_INT)
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM)
        dst = pow_bm1(a, b_exp, B_INT) * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, ROWS, DK, DV, LIST, COUNT, LENS,
    seq_len, H, HKV, GROUP, n_kt, n_qt, c, b_exp, sfac_exp, scale,
    B_INT: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = pid_bkv // HKV
    kvh = pid_bkv % HKV
    kv_base = pid_bkv.to(tl.int64) * seq_len * HEAD_DIM
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_mb = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    if HAS_VARLEN:
        length = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), seq_len)
    else:
        length = seq_len
    io_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    io_ptrs = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + io_ptrs, mask=io_mask, other=0.0)
    v = tl.load(V + io_ptrs, mask=io_mask, other=0.0)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    for g in range(0, GROUP):
        bh = b * H + kvh * GROUP + g
        q_base = bh.to(tl.int64) * seq_len * HEAD_DIM
        stat_base = bh.to(tl.int64) * seq_len
        row = bh.to(tl.int64) * n_kt + pid_n
        count = tl.load(COUNT + row * 2)
        masked = tl.load(COUNT + row * 2 + 1)
        lst = LIST + row * n_qt
        dk, dv = _kv_tiles(dk, dv, k, v, Q, DO, ROWS, q_base, stat_base, lst, 0, masked,
                           offs_n, offs_mb, offs_d, seq_len, length, b_exp,
                           B_INT, True, IS_CAUSAL, HEAD_DIM, BM, DOT_PREC)
        dk, dv = _kv_tiles(dk, dv, k, v, Q, DO, ROWS, q_base, stat_base, lst, masked, count,
                           offs_n, offs_mb, offs_d, seq_len, length, b_exp,
                           B_INT, False, IS_CAUSAL, HEAD_DIM, BM, DOT_PREC)
    tl.store(DK + io_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + io_ptrs, dv.to(DV.dtype.element_ty), mask=io_mask)


@triton.jit
def _fused_tiles(dk, dv, k, v, Q, DO, O2, DQ, TAU, INVL, q_base, stat_base, LIST, i_lo, i_hi,
                 offs_n, offs_mb, offs_d, seq_len, length, c, b_exp, sfac_exp, scale,
                 B_INT: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BM: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(i_lo, i_hi):
        qt = tl.load(LIST + i)
        offs_m = qt * BM + offs_mb
        row_in = offs_m < seq_len
        ld = row_in[:, None] & (offs_d[None, :] < HEAD_DIM)
        ptrs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(Q + ptrs, mask=ld, other=0.0)
        do = tl.load(DO + ptrs, mask=ld, other=0.0)
        o2 = tl.load(O2 + ptrs, mask=ld, other=0.0)
        tau = tl.load(TAU + stat_base + offs_m, mask=row_in, other=BIG)
        inv_l = tl.load(INVL + stat_base + offs_m, mask=row_in, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o2.to(tl.float32), axis=1)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BN, BM)
        u = st * c - tau[None, :]
        if MASKED:
            valid = offs_n[:, None] < length
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            u = tl.where(valid, u, 0.0)
        u = tl.maximum(u, 0.0)
        p = pow_b(u, b_exp, B_INT) * inv_l[None, :]
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM)
        w = pow_bm1(u, b_exp, B_INT) * _row_weight_scale(inv_l, sfac_exp, B_INT)[None, :]
        dst = (w * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=DOT_PREC)
        dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC) * scale  # (BM, BD)
        tl.atomic_add(DQ + ptrs, dq, mask=ld, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, DO, O2, TAU, INVL, DK, DV, DQ, LIST, COUNT, LENS,
    seq_len, H, HKV, GROUP, n_kt, n_qt, c, b_exp, sfac_exp, scale,
    B_INT: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = pid_bkv // HKV
    kvh = pid_bkv % HKV
    kv_base = pid_bkv.to(tl.int64) * seq_len * HEAD_DIM
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_mb = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    if HAS_VARLEN:
        length = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), seq_len)
    else:
        length = seq_len
    io_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    io_ptrs = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + io_ptrs, mask=io_mask, other=0.0)
    v = tl.load(V + io_ptrs, mask=io_mask, other=0.0)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    for g in range(0, GROUP):
        bh = b * H + kvh * GROUP + g
        q_base = bh.to(tl.int64) * seq_len * HEAD_DIM
        stat_base = bh.to(tl.int64) * seq_len
        row = bh.to(tl.int64) * n_kt + pid_n
        count = tl.load(COUNT + row * 2)
        masked = tl.load(COUNT + row * 2 + 1)
        lst = LIST + row * n_qt
        dk, dv = _fused_tiles(dk, dv, k, v, Q, DO, O2, DQ, TAU, INVL, q_base, stat_base, lst, 0, masked,
                              offs_n, offs_mb, offs_d, seq_len, length, c, b_exp, sfac_exp, scale,
                              B_INT, True, IS_CAUSAL, HEAD_DIM, BM, DOT_PREC)
        dk, dv = _fused_tiles(dk, dv, k, v, Q, DO, O2, DQ, TAU, INVL, q_base, stat_base, lst, masked, count,
                              offs_n, offs_mb, offs_d, seq_len, length, c, b_exp, sfac_exp, scale,
                              B_INT, False, IS_CAUSAL, HEAD_DIM, BM, DOT_PREC)
    tl.store(DK + io_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + io_ptrs, dv.to(DV.dtype.element_ty), mask=io_mask)


@triton.jit
def _q_tiles(acc_a, acc_b, sdp, ssum, e_dp, e_log, e_dplog, q, do, tau, K, V, kv_base, LIST, i_lo, i_hi,
             offs_m, offs_nb, offs_d, seq_len, length, c, b_exp,
             B_INT: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
             EVEN_D: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr, ALPHA_GRAD: tl.constexpr):
    for i in range(i_lo, i_hi):
        j = tl.load(LIST + i)
        cols = j * BN + offs_nb
        k_ptrs = K + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        v_ptrs = V + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :]
        if MASKED:
            ld = (cols[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=ld, other=0.0)
            v = tl.load(v_ptrs, mask=ld, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        u = s * c - tau[:, None]
        if MASKED:
            valid = cols[None, :] < length
            if IS_CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            u = tl.where(valid, u, 0.0)
        u = tl.maximum(u, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        w = pow_bm1(u, b_exp, B_INT)
        wdp = w * dp
        sdp += tl.sum(wdp, axis=1)
        ssum += tl.sum(w, axis=1)
        acc_a = tl.dot(wdp.to(k.dtype), k, acc_a, input_precision=DOT_PREC)
        acc_b = tl.dot(w.to(k.dtype), k, acc_b, input_precision=DOT_PREC)
        if ALPHA_GRAD:  # the row sums of the alpha gradient: u^b dP, u^b ln u, u^b ln u dP
            ub = w * u
            ub_log = ub * tl.log(tl.where(u > 0, u, 1.0))
            e_dp += tl.sum(ub * dp, axis=1)
            e_log += tl.sum(ub_log, axis=1)
            e_dplog += tl.sum(ub_log * dp, axis=1)
    return acc_a, acc_b, sdp, ssum, e_dp, e_log, e_dplog


@triton.jit
def _bwd_q_kernel(
    Q, K, V, DO, TAU, INVL, ROWS, DQ, GALPHA, LIST, COUNT, LENS,
    seq_len, H, GROUP, n_qt, n_kt, c, b_exp, sfac_exp, scale,
    B_INT: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
    ALPHA_GRAD: tl.constexpr,
):
    pid_m = n_qt - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = pid_bh.to(tl.int64) * seq_len * HEAD_DIM
    kv_base = (b * (H // GROUP) + h // GROUP).to(tl.int64) * seq_len * HEAD_DIM
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_nb = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    if HAS_VARLEN:
        length = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), seq_len)
    else:
        length = seq_len
    row_in = offs_m < seq_len
    io_mask = row_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    io_ptrs = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + io_ptrs, mask=io_mask, other=0.0)
    do = tl.load(DO + io_ptrs, mask=io_mask, other=0.0)
    stat = pid_bh.to(tl.int64) * seq_len + offs_m
    tau = tl.load(TAU + stat, mask=row_in, other=BIG)
    inv_l = tl.load(INVL + stat, mask=row_in, other=0.0)
    # the dK/dV kernel's per-row record [c * r, tau * r, delta, 0] with r = inv_l^(alpha-1) (zeros
    # for a row without support, whose tau is BIG); delta follows after the loop
    r = _row_prob_scale(inv_l, b_exp, B_INT)
    field = tl.arange(0, 4)[None, :]
    rec = tl.where(field == 0, (c * r)[:, None], tl.where(field == 1, tl.where(r > 0, tau * r, 0.0)[:, None], 0.0))
    tl.store(ROWS + stat[:, None] * 4 + field, rec, mask=row_in[:, None] & (field != 2))
    row = pid_bh.to(tl.int64) * n_qt + pid_m
    count = tl.load(COUNT + row * 2)
    plain = tl.load(COUNT + row * 2 + 1)
    lst = LIST + row * n_kt
    acc_a = tl.zeros([BM, BD], dtype=tl.float32)
    acc_b = tl.zeros([BM, BD], dtype=tl.float32)
    sdp = tl.zeros([BM], dtype=tl.float32)
    ssum = tl.zeros([BM], dtype=tl.float32)
    e_dp = tl.zeros([BM], dtype=tl.float32)
    e_log = tl.zeros([BM], dtype=tl.float32)
    e_dplog = tl.zeros([BM], dtype=tl.float32)
    acc_a, acc_b, sdp, ssum, e_dp, e_log, e_dplog = _q_tiles(
        acc_a, acc_b, sdp, ssum, e_dp, e_log, e_dplog, q, do, tau, K, V, kv_base, lst, 0, plain,
        offs_m, offs_nb, offs_d, seq_len, length, c, b_exp,
        B_INT, False, IS_CAUSAL, HEAD_DIM, EVEN_D, BN, DOT_PREC, ALPHA_GRAD)
    acc_a, acc_b, sdp, ssum, e_dp, e_log, e_dplog = _q_tiles(
        acc_a, acc_b, sdp, ssum, e_dp, e_log, e_dplog, q, do, tau, K, V, kv_base, lst, plain, count,
        offs_m, offs_nb, offs_d, seq_len, length, c, b_exp,
        B_INT, True, IS_CAUSAL, HEAD_DIM, EVEN_D, BN, DOT_PREC, ALPHA_GRAD)
    delta = tl.where(ssum > 0, sdp / tl.where(ssum > 0, ssum, 1.0), 0.0)
    dq = (acc_a - delta[:, None] * acc_b) * (_row_weight_scale(inv_l, sfac_exp, B_INT) * scale)[:, None]
    tl.store(DQ + io_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)
    tl.store(ROWS + stat * 4 + 2, delta, mask=row_in)
    if ALPHA_GRAD:
        # p = u^b / l with inv_l = 1 / l, so with sum p = 1: delta_p = sum dP p = inv_l e_dp,
        # H = sum p ln p = ln inv_l + b inv_l e_log, C = sum dP p ln p = ln inv_l delta_p + b inv_l e_dplog,
        # and d(sum dP p)/dalpha = b (b (delta_p - delta) - (C - delta H)) (torch_backend/alpha_grad.py).
        has = inv_l > 0
        ln_inv = tl.log(tl.where(has, inv_l, 1.0))
        delta_p = inv_l * e_dp
        entropy = ln_inv + b_exp * inv_l * e_log
        cross = ln_inv * delta_p + b_exp * inv_l * e_dplog
        g = b_exp * (b_exp * (delta_p - delta) - (cross - delta * entropy))
        tl.store(GALPHA + stat, tl.where(has, g, 0.0), mask=row_in)


_BWD_KERNELS = {"q": _bwd_q_kernel, "kv": _bwd_kv_kernel, "fused": _bwd_fused_kernel}


@functools.lru_cache(maxsize=512)
def backward_launch(kind: str, geo: Geometry, config: Config, alpha: float, scale: float, is_causal: bool,
                    has_varlen: bool, dtype: torch.dtype, alpha_grad: bool) -> Launch:
    """The launch of one backward kernel (``kind``: "q" over query-major lists of the dQ tiles,
    "kv" or "fused" over key-major lists of the dK/dV tiles) for one problem and config: planned
    once, so a warm call only allocates and launches."""
    if kind == "q":
        bm, bn = config["bwd_q_block_m"], config["bwd_q_block_n"]
        n_own, n_cand = triton.cdiv(geo.seq_len, bm), triton.cdiv(geo.seq_len, bn)
        head = (geo.seq_len, geo.q_heads, geo.group)
        warps, stages = config["bwd_q_warps"], config["bwd_q_stages"]
        extra = dict(EVEN_D=geo.even_d, ALPHA_GRAD=alpha_grad)
        grid = (n_own, geo.rows)
    else:
        bm, bn = config["bwd_block_m"], config["bwd_block_n"]
        n_own, n_cand = triton.cdiv(geo.seq_len, bn), triton.cdiv(geo.seq_len, bm)
        head = (geo.seq_len, geo.q_heads, geo.kv_heads, geo.group)
        warps, stages = config["bwd_warps"], config["bwd_stages"]
        extra = {}
        grid = (n_own, geo.batch * geo.kv_heads)
    scalars = (*head, n_own, n_cand, (alpha - 1.0) * scale, 1.0 / (alpha - 1.0), 2.0 - alpha, scale)
    meta = dict(B_INT=integer_b(alpha), IS_CAUSAL=is_causal, HAS_VARLEN=has_varlen, HEAD_DIM=geo.head_dim,
                BM=bm, BN=bn, BD=geo.block_d, DOT_PREC=dot_precision(dtype), **extra,
                num_warps=warps, num_stages=stages)
    return Launch(_BWD_KERNELS[kind], grid, scalars, meta)


def _check_lists(lists: TileLists, run: Launch, what: str) -> None:
    n_own, n_cand = run.scalars[-6], run.scalars[-5]
    if (lists.n_own, lists.n_cand) != (n_own, n_cand):
        raise ValueError(f"lists of {lists.n_own} x {lists.n_cand} tiles do not match the {what} tiles of the config "
                         f"({n_own} x {n_cand})")


def sparse_backward_kv(
    q, k, v, grad_out, rows, lists: TileLists, varlen, alpha: float, scale: float,
    is_causal: bool, config: Config,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dv) in k's shape and dtype; ``lists``: key-major (transposed) for (bwd_block_m, bwd_block_n);
    ``rows``: the per-row records from :func:`sparse_backward_q`. q, k, v, grad_out contiguous."""
    geo = Geometry.of(q, k)
    run = backward_launch("kv", geo, config, alpha, scale, is_causal, varlen is not None, q.dtype, False)
    _check_lists(lists, run, "dK/dV")
    dk = alloc(k.shape, k.dtype, k.device)
    dv = alloc(v.shape, v.dtype, v.device)
    lens = varlen if varlen is not None else rows
    run(q, k, v, grad_out, rows, dk, dv, lists.index, lists.count, lens)
    return dk, dv


def sparse_backward_q(
    q, k, v, grad_out, tau, inv_l, lists: TileLists, varlen, alpha: float, scale: float,
    is_causal: bool, config: Config, alpha_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq in q's shape and dtype, the rows' records (B*Hq, N, 4) float32 for the dK/dV kernel:
    ``[c * r, tau * r, delta, 0]`` with ``c = (alpha - 1) * scale`` and ``r = inv_l^(alpha - 1)``, so
    that kernel forms ``a = r * (z - tau)``, ``p = a^b`` and the weight ``a^(b-1)`` with no per-row
    power of inv_l and one 16-byte load per row; delta is ``rows[..., 2]``); ``lists``:
    query-major for (bwd_q_block_m, bwd_q_block_n). With ``alpha_rows`` ((B*Hq, N) float32) the
    same pass also writes each row's share of d(sum dO * out)/dalpha there (one log per score)."""
    geo = Geometry.of(q, k)
    run = backward_launch("q", geo, config, alpha, scale, is_causal, varlen is not None, q.dtype,
                          alpha_rows is not None)
    _check_lists(lists, run, "dQ")
    dq = alloc(q.shape, q.dtype, q.device)
    rows = alloc((geo.rows, geo.seq_len, 4), torch.float32, q.device)
    lens = varlen if varlen is not None else tau
    run(q, k, v, grad_out, tau, inv_l, rows, dq, alpha_rows if alpha_rows is not None else rows,
        lists.index, lists.count, lens)
    return dq, rows


def sparse_backward_fused(
    q, k, v, grad_out, o2, tau, inv_l, lists: TileLists, varlen, alpha: float, scale: float,
    is_causal: bool, config: Config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in q's / k's shape and dtype from one kernel per (key tile, kv head): dQ by
    atomic adds into float32. ``lists``: key-major (transposed) for (bwd_block_m, bwd_block_n);
    ``o2`` from the forward (``need_o2``). q, k, v, grad_out, o2 contiguous."""
    geo = Geometry.of(q, k)
    run = backward_launch("fused", geo, config, alpha, scale, is_causal, varlen is not None, q.dtype, False)
    _check_lists(lists, run, "dK/dV")
    dk = alloc(k.shape, k.dtype, k.device)
    dv = alloc(v.shape, v.dtype, v.device)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lens = varlen if varlen is not None else tau
    run(q, k, v, grad_out, o2, tau, inv_l, dk, dv, dq, lists.index, lists.count, lens)
    return dq.to(q.dtype), dk, dv
