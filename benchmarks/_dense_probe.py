"""The probe kernel of bench_dense_pass.py: the tau kernel's prologue and dense pass alone
(imported after the benchmark has chosen the Triton interpreter or the GPU)."""

import triton
import triton.language as tl

from adasplash_tune.kernels.attention.tau import _dense_stage


@triton.jit
def probe(Q, K, MASK, OUT, seq_len, H, GROUP, TM, TN, n_mblocks, c,
          IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr,
          TOPK: tl.constexpr,
          CODES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, MM: tl.constexpr,
          MN: tl.constexpr, DOT_PREC: tl.constexpr):
    """The tau kernel's prologue and dense pass; stores the row max and the smallest kept
    maximum (so that nothing is optimised away)."""
    pid_m = n_mblocks - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_base = pid_bh.to(tl.int64) * seq_len * HEAD_DIM
    kv_base = (b * (H // GROUP) + h // GROUP).to(tl.int64) * seq_len * HEAD_DIM
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    row0 = pid_m * BM
    if IS_CAUSAL:
        kv_stop = tl.minimum(row0 + BM, seq_len)
        kv_full = tl.minimum(seq_len, row0 + 1)
    else:
        kv_stop = seq_len
        kv_full = seq_len
    row_ok = offs_m < seq_len
    mask_base = pid_bh.to(tl.int64) * TM * TN
    grows = pid_m * (BM // MM) + tl.arange(0, BM // MM)
    m, a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7 = _dense_stage(
        q, K, kv_base, kv_full, kv_stop, offs_m, offs_d, seq_len, seq_len, c, row_ok, MASK, mask_base, grows, TM, TN,
        IS_CAUSAL, EVEN_D, EVEN_N, HEAD_DIM, TOPK, CODES, BM, BN, MM, MN, DOT_PREC)
    kept = a7
    if TOPK == 16:
        kept = b7
    out = OUT + pid_bh.to(tl.int64) * seq_len * 2 + offs_m * 2
    tl.store(out, m, mask=row_ok)
    tl.store(out + 1, kept, mask=row_ok)
