"""Row-wise alpha-entmax in Triton: jit kernels -> launchers (explicit Config) -> autograd.Function.

Forward, per row: z = (alpha - 1) x shifted by its max (so max z = 0), tau from the safeguarded
Halley-bisection of f(tau) = sum [z - tau]_+^b - 1 (b = 1 / (alpha - 1)) inside the bracket
[-1, -n^(1 - alpha)], then p = [z - tau]_+^b renormalised by its sum.
Backward: with s = p^(2 - alpha) on the support, dx = s g - s sum(s g) / sum(s).

The start (``tau_init``): "subset" takes the threshold of the row's chunk maxima (strided chunks
that each lie in one thread, max taken in registers by the pass that finds the row max): tau is
monotone in the set of scores, so the threshold of any subset is a lower bound of the row's; for a
support of a few dozen scores it is within a few percent of the root. A row held in registers
(one tile) first merges each thread's chunk maxima into one (:func:`_group_max`: 256 values at
8 warps instead of 2048) and solves their threshold in 3 steps instead of 4; each of those steps
is a cross-warp reduction, and on the H200 they cost more than the full-row step they replace
(benchmarks/results/h200-entmax-start-ab.json). "lo" starts at -1.
The iterations stop on the device once every valid row of the program moved by at most ``tau_tol``
of its support width ``max z - tau = -tau`` (``niter`` caps them): randn rows of 8192 need one or two
iterations from the subset start instead of three or four from -1.

A row longer than one tile is also *certified* (``_start_certified``): the max pass keeps each
chunk's second largest score too, so it knows the largest score outside the subset, ``rest``.
Halley starts at max(-1, rest); if the subset's f is still >= 0 there, the row's root is >= every
score outside the subset and the subset alone solves the row, exactly: the iterations and the
normaliser use the chunk maxima in registers and the row is read once more only to be stored
(randn rows at alpha 1.5: ~80-90% certified; H200, bf16, alpha 1.5: 1024 x 32768 default config
0.071 ms against 0.082, 4096 x 8192 with 4096-column tiles 0.062 against the one-tile 0.073;
benchmarks/results/h200-entmax-certified.json). A row in registers (one tile)
skips it: there the extra per-score work cost more than the sweeps it saves (0.079 vs 0.073 ms).

alpha = 1.5 and alpha = 2 are compile-time specialisations that use squares and support counts
only (a count is one ``set.gt`` per score on NVIDIA GPUs, :func:`_indicator`); any other alpha
uses log2/exp2. A row that fits one tile stays in registers across the
iterations; a longer row that is not certified is swept tile by tile in every iteration.

Launch parameters come only from the :class:`Config` (``block_n``, ``rows``, ``num_warps``,
``num_stages``, ``niter``, ``tau_tol``, ``tau_init``); see :func:`launch_params` for how they map onto
one launch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .declarations.entmax import NEAR2_ALPHA, TAU_TOL_AUTO
from .launch import Launch, env_value
from .spec import Config, ConfigError

__all__ = ["entmax_triton", "entmax_forward", "entmax_backward", "launch_params", "LaunchParams", "resolve_tol"]

_MODE_GENERIC, _MODE_15, _MODE_2 = 0, 1, 2
_MIN_TILE = 16
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
#: Halley steps that solve the threshold of the chunk maxima (the "subset" start).
_SUBSET_ITERS = tl.constexpr(4)
#: ... and of one maximum per thread, the start of a row held in registers.
_GROUPED_ITERS = tl.constexpr(3)
#: Defaults for configs stored before a knob existed (older caches, hand-built Configs).
_KNOB_DEFAULTS = {"tau_tol": "auto", "tau_init": "subset"}


# --------------------------------------------------------------------------- jit kernels


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    """log2 of a positive fp32 tile: one MUFU op on NVIDIA (lg2.approx), else the precise one."""
    if FAST_LOG:
        y = libdevice.fast_log2f(x)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _sum3(t0, t1, t2, FUSED: tl.constexpr):
    """Row sums of three tiles: one fused tuple reduction, or three tl.sum (interpreter)."""
    if FUSED:
        s0, s1, s2 = tl.reduce((t0, t1, t2), 1, _add3)
    else:
        s0 = tl.sum(t0, axis=1)
        s1 = tl.sum(t1, axis=1)
        s2 = tl.sum(t2, axis=1)
    return s0, s1, s2


@triton.jit
def _sum2(t0, t1, FUSED: tl.constexpr):
    if FUSED:
        s0, s1 = tl.reduce((t0, t1), 1, _add2)
    else:
        s0 = tl.sum(t0, axis=1)
        s1 = tl.sum(t1, axis=1)
    return s0, s1


@triton.jit
def _indicator(u, PTX: tl.constexpr):
    """1.0 where u > 0, else 0.0. On NVIDIA hardware one ``set.gt.f32.f32`` (FSET) per element:
    written as ``tl.where(u > 0, 1.0, 0.0)``, LLVM packs half a row's predicates into bit masks and
    unpacks them again (sm_90 SASS of the one-tile Halley step: 391 instructions a thread against
    309 with this), whether it compares u with 0 or z with tau."""
    if PTX:
        r = tl.inline_asm_elementwise("set.gt.f32.f32 $0, $1, 0f00000000;", "=r,r", [u], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = tl.where(u > 0.0, 1.0, 0.0)
    return r


@triton.jit
def _row_sums(z, tau, b, MODE: tl.constexpr, FUSED: tl.constexpr, FAST_LOG: tl.constexpr):
    """Per-row (sum u^b, sum u^(b-1), sum u^(b-2)) with u = [z - tau]_+ over a [ROWS, BLOCK_N] tile.

    alpha = 2 returns the third sum as zeros (f'' = 0).
    """
    u = tl.maximum(z - tau[:, None], 0.0)
    if MODE == 1:
        s0, s1, s2 = _sum3(u * u, u, _indicator(u, FAST_LOG), FUSED)
    elif MODE == 2:
        s0, s1 = _sum2(u, _indicator(u, FAST_LOG), FUSED)
        s2 = s0 * 0.0
    else:
        uc = tl.maximum(u, 1e-20)
        w2 = tl.where(u > 0.0, tl.exp2((b - 2.0) * _log2(uc, FAST_LOG)), 0.0)
        w1 = w2 * uc
        s0, s1, s2 = _sum3(w1 * uc, w1, w2, FUSED)
    return s0, s1, s2


@triton.jit
def _halley_step(tau, lo, hi, s0, s1, s2, b, MODE: tl.constexpr):
    """One safeguarded Halley (Newton for alpha = 2) update of tau and its bracket [lo, hi]."""
    f = s0 - 1.0
    above = f > 0.0
    lo = tl.where(above, tau, lo)
    hi = tl.where(above, hi, tau)
    if MODE == 2:
        num = f
        den = -s1
    elif MODE == 1:
        df = -2.0 * s1
        num = 2.0 * f * df
        den = 2.0 * df * df - 2.0 * f * s2
    else:
        df = -b * s1
        num = 2.0 * f * df
        den = 2.0 * df * df - f * (b * (b - 1.0) * s2)
    ok = den != 0.0
    cand = tau - num / tl.where(ok, den, 1.0)
    inside = ok & (cand >= lo) & (cand <= hi)
    nxt = tl.where(inside, cand, 0.5 * (lo + hi))
    tau = tl.where(f == 0.0, tau, nxt)
    return tau, lo, hi


@triton.jit
def _halley_go(tau, lo, hi, s0, s1, s2, b, row_ok, tol, MODE: tl.constexpr):
    """:func:`_halley_step`, plus whether to go on: some valid row moved by more than ``tol`` of
    its support width -tau (tau <= -n^(1-alpha) < 0). Padded rows never hold the loop; a
    negative ``tol`` never stops it."""
    new, lo, hi = _halley_step(tau, lo, hi, s0, s1, s2, b, MODE)
    step = tl.where(row_ok, tl.abs(new - tau) / (-new), 0.0)
    return new, lo, hi, tl.max(step, axis=0) > tol


@triton.jit
def _chunk_max(z, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """[ROWS, CHUNKS] maxima of a tile's strided column chunks (chunk c: the columns congruent to
    c mod CHUNKS). CHUNKS is a multiple of the columns the program's threads cover in one sweep
    of the tile's layout (at most 8 per thread x 32 x num_warps), so each chunk lies in one
    thread: the max is taken in registers, the reshape moves no data and the maxima stay spread
    over the threads (a few each, not replicated)."""
    return tl.max(tl.reshape(z, (ROWS, BLOCK_N // CHUNKS, CHUNKS)), axis=1)


@triton.jit
def _chunk_top2(z, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """(:func:`_chunk_max`, each chunk's second largest value counted with multiplicity): the
    largest score of the row outside the chunk maxima is the max of the second ones.

    Chunks of two or four columns (the launches' usual ones: a tile of 2 or 4 layout sweeps) take
    a max/min network, 1.5 operations a column; longer chunks mask their maximum out."""
    M: tl.constexpr = BLOCK_N // CHUNKS
    if M == 2:
        z3 = tl.reshape(z, (ROWS, 2, CHUNKS))
        c1 = tl.max(z3, axis=1)
        c2 = tl.min(z3, axis=1)
    elif M == 4:
        z4 = tl.reshape(z, (ROWS, 2, 2, CHUNKS))
        hi = tl.max(z4, axis=2)
        lo = tl.min(z4, axis=2)
        c1 = tl.max(hi, axis=1)
        c2 = tl.maximum(tl.min(hi, axis=1), tl.max(lo, axis=1))
    else:
        z3 = tl.reshape(z, (ROWS, M, CHUNKS))
        c1 = tl.max(z3, axis=1)
        top = z3 == c1[:, None, :]
        c2 = tl.max(tl.where(top, float("-inf"), z3), axis=1)
        ties = tl.sum(top.to(tl.int32), axis=1)
        c2 = tl.where(ties > 1, c1, c2)
    return c1, c2


@triton.jit
def _group_max(c, ROWS: tl.constexpr, CHUNKS: tl.constexpr, GROUP: tl.constexpr):
    """[ROWS, CHUNKS // GROUP] maxima of GROUP consecutive chunk maxima (those of one thread, so
    the max is taken in registers): a smaller subset for the start of a row held in registers."""
    if GROUP > 1:
        c = tl.max(tl.reshape(c, (ROWS, CHUNKS // GROUP, GROUP)), axis=2)
    return c


@triton.jit
def _merge_top2(a1, a2, b1, b2):
    """Largest and second largest (with multiplicity) of two (largest, second) pairs."""
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _max2(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


@triton.jit
def _row_max2(c1, c2, FUSED: tl.constexpr):
    """Per-row max of two [ROWS, CHUNKS] tiles (one fused reduction on hardware)."""
    if FUSED:
        m1, m2 = tl.reduce((c1, c2), 1, _max2)
    else:
        m1 = tl.max(c1, axis=1)
        m2 = tl.max(c2, axis=1)
    return m1, m2


@triton.jit
def _start_certified(vals, rest, lo, hi, b, MODE: tl.constexpr, FUSED: tl.constexpr, FAST_LOG: tl.constexpr):
    """The "subset" start, certified: ``rest`` is the row's largest score outside the subset
    ``vals`` (shifted like them). Halley starts at t0 = max(lo, rest); when f_subset(t0) >= 0 the
    row's root is at least t0 >= every score outside the subset, so the row's f equals the
    subset's from there on: the subset alone solves the row (``exact``). Returns (tau, lo, exact)
    with lo raised to t0 where exact."""
    t0 = tl.maximum(lo, rest)
    s0, s1, s2 = _row_sums(vals, t0, b, MODE, FUSED, FAST_LOG)
    exact = (s0 >= 1.0) | (rest <= lo)
    tau, slo, shi = _halley_step(t0, lo, hi, s0, s1, s2, b, MODE)
    for _ in tl.static_range(_SUBSET_ITERS - 1):
        s0, s1, s2 = _row_sums(vals, tau, b, MODE, FUSED, FAST_LOG)
        tau, slo, shi = _halley_step(tau, slo, shi, s0, s1, s2, b, MODE)
    tau = tl.minimum(tl.maximum(tau, lo), hi)
    return tau, tl.where(exact, t0, lo), exact


@triton.jit
def _start(vals, lo, hi, b, MODE: tl.constexpr, FUSED: tl.constexpr, FAST_LOG: tl.constexpr,
           INIT: tl.constexpr, ITERS: tl.constexpr):
    """First tau: the threshold of the scores ``vals`` [ROWS, k] (shifted like z; a subset of the
    row, so a lower bound of its root) by ITERS Halley steps from -1, clamped into [lo, hi]; or
    lo (INIT == 0)."""
    if INIT == 1:
        tau = lo
        slo = lo
        shi = hi
        for _ in tl.static_range(ITERS):
            s0, s1, s2 = _row_sums(vals, tau, b, MODE, FUSED, FAST_LOG)
            tau, slo, shi = _halley_step(tau, slo, shi, s0, s1, s2, b, MODE)
        tau = tl.minimum(tl.maximum(tau, lo), hi)
    else:
        tau = lo
    return tau


@triton.jit
def _probs(z, tau, b, MODE: tl.constexpr, FAST_LOG: tl.constexpr):
    """Unnormalised [z - tau]_+^b."""
    u = tl.maximum(z - tau[:, None], 0.0)
    if MODE == 1:
        p = u * u
    elif MODE == 2:
        p = u
    elif FAST_LOG:  # lg2.approx(0) = -inf and b > 0, so u = 0 gives ex2(-inf) = 0 without a select
        p = tl.exp2(b * _log2(u, FAST_LOG))
    else:
        p = tl.where(u > 0.0, tl.exp2(b * _log2(tl.maximum(u, 1e-20), FAST_LOG)), 0.0)
    return p


@triton.jit
def _load_z(x_rows, cols, row_ok, n_cols, zmax, scale):
    """Load one tile as scaled fp32 z - zmax; columns past the row hold -inf."""
    col_ok = cols < n_cols
    x = tl.load(x_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    z = x.to(tl.float32) * scale - zmax[:, None]
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _entmax_fwd_kernel(
    X, Y, n_rows, n_cols, stride_x, stride_y, scale, b, gap, niter, tol,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, SINGLE: tl.constexpr,
    FUSED: tl.constexpr, FAST_LOG: tl.constexpr, INIT: tl.constexpr, CHUNKS: tl.constexpr, GROUP: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    x_rows = X + rows.to(tl.int64) * stride_x
    y_rows = Y + rows.to(tl.int64) * stride_y
    cols = tl.arange(0, BLOCK_N)
    zero = tl.zeros([ROWS], dtype=tl.float32)
    lo = zero - 1.0
    hi = zero - gap
    # at most niter Halley steps; once `go` is false the remaining iterations skip the body (a
    # uniform branch; the same loop as `while` crashes Triton 3.6's layout pass)
    go = tl.program_id(0) >= 0
    if SINGLE:
        # the max pass runs on the unscaled row (scale > 0 keeps the order), so that z is one
        # fused multiply-add per score, not a product and then a shift
        x = _load_z(x_rows, cols, row_ok, n_cols, zero, 1.0)
        cmax = _chunk_max(x, ROWS, BLOCK_N, CHUNKS)
        zmax = tl.max(cmax, axis=1) * scale
        z = x * scale - zmax[:, None]
        vals = _group_max(cmax, ROWS, CHUNKS, GROUP) * scale - zmax[:, None]
        tau = _start(vals, lo, hi, b, MODE, FUSED, FAST_LOG, INIT, _GROUPED_ITERS)
        # niter >= 1: the first step is straight-line code (as the loop is when Triton specialises
        # niter == 1: 0.0525 against 0.0553 ms at 4096 x 8192, alpha 1.5, one step run either way)
        s0, s1, s2 = _row_sums(z, tau, b, MODE, FUSED, FAST_LOG)
        tau, lo, hi, go = _halley_go(tau, lo, hi, s0, s1, s2, b, row_ok, tol, MODE)
        for _ in range(1, niter):
            if go:
                s0, s1, s2 = _row_sums(z, tau, b, MODE, FUSED, FAST_LOG)
                tau, lo, hi, go = _halley_go(tau, lo, hi, s0, s1, s2, b, row_ok, tol, MODE)
        p = _probs(z, tau, b, MODE, FAST_LOG)
        p = p * (1.0 / tl.sum(p, axis=1))[:, None]
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        tl.store(y_rows[:, None] + cols[None, :], p.to(Y.dtype.element_ty), mask=mask)
    else:
        cmax = tl.full([ROWS, CHUNKS], float("-inf"), dtype=tl.float32)
        if INIT == 2:
            csec = tl.full([ROWS, CHUNKS], float("-inf"), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):  # unscaled, as in the one-tile path
                x = _load_z(x_rows, start + cols, row_ok, n_cols, zero, 1.0)
                t1, t2 = _chunk_top2(x, ROWS, BLOCK_N, CHUNKS)
                cmax, csec = _merge_top2(cmax, csec, t1, t2)
            xmax, rest = _row_max2(cmax, csec, FUSED)
            zmax = xmax * scale
            vals = cmax * scale - zmax[:, None]
            tau, lo, exact = _start_certified(vals, rest * scale - zmax, lo, hi, b, MODE, FUSED, FAST_LOG)
            subset_only = tl.min(tl.where(row_ok & ~exact, 0, 1), axis=0) > 0
        else:
            for start in range(0, n_cols, BLOCK_N):
                x = _load_z(x_rows, start + cols, row_ok, n_cols, zero, 1.0)
                cmax = tl.maximum(cmax, _chunk_max(x, ROWS, BLOCK_N, CHUNKS))
            zmax = tl.max(cmax, axis=1) * scale
            vals = cmax * scale - zmax[:, None]
            tau = _start(vals, lo, hi, b, MODE, FUSED, FAST_LOG, INIT, _SUBSET_ITERS)
            subset_only = tl.program_id(0) < 0
        for _ in range(niter):
            if go:
                if subset_only:  # the row's sums are the chunk maxima's: no sweep over the row
                    s0, s1, s2 = _row_sums(vals, tau, b, MODE, FUSED, FAST_LOG)
                else:
                    s0 = zero
                    s1 = zero
                    s2 = zero
                    for start in range(0, n_cols, BLOCK_N):
                        z = _load_z(x_rows, start + cols, row_ok, n_cols, zmax, scale)
                        a0, a1, a2 = _row_sums(z, tau, b, MODE, FUSED, FAST_LOG)
                        s0 += a0
                        s1 += a1
                        s2 += a2
                tau, lo, hi, go = _halley_go(tau, lo, hi, s0, s1, s2, b, row_ok, tol, MODE)
        if subset_only:  # ... and so is the normaliser: one pass left, the store
            total = tl.sum(_probs(vals, tau, b, MODE, FAST_LOG), axis=1)
        else:
            total = zero
            for start in range(0, n_cols, BLOCK_N):
                z = _load_z(x_rows, start + cols, row_ok, n_cols, zmax, scale)
                total += tl.sum(_probs(z, tau, b, MODE, FAST_LOG), axis=1)
        inv = 1.0 / total
        for start in range(0, n_cols, BLOCK_N):
            z = _load_z(x_rows, start + cols, row_ok, n_cols, zmax, scale)
            p = _probs(z, tau, b, MODE, FAST_LOG) * inv[:, None]
            mask = row_ok[:, None] & (start + cols < n_cols)[None, :]
            tl.store(y_rows[:, None] + (start + cols)[None, :], p.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _support_weight(p, expo, MODE: tl.constexpr, FAST_LOG: tl.constexpr):
    """s = p^(2 - alpha) on the support (any positive multiple of it gives the same gradient)."""
    if MODE == 1:
        s = tl.sqrt(p)
    elif MODE == 2:
        s = tl.where(p > 0.0, 1.0, 0.0)
    else:
        s = tl.where(p > 0.0, tl.exp2(expo * _log2(tl.maximum(p, 1e-30), FAST_LOG)), 0.0)
    return s


@triton.jit
def _entmax_bwd_kernel(
    P, G, DX, n_rows, n_cols, stride_p, stride_g, stride_dx, expo,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, SINGLE: tl.constexpr,
    FUSED: tl.constexpr, FAST_LOG: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    p_rows = P + rows.to(tl.int64) * stride_p
    g_rows = G + rows.to(tl.int64) * stride_g
    dx_rows = DX + rows.to(tl.int64) * stride_dx
    cols = tl.arange(0, BLOCK_N)
    zero = tl.zeros([ROWS], dtype=tl.float32)
    if SINGLE:
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        p = tl.load(p_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _support_weight(p, expo, MODE, FAST_LOG)
        sg = s * g
        ssum, sgsum = _sum2(s, sg, FUSED)
        mean = sgsum / tl.where(ssum > 0.0, ssum, 1.0)
        dx = sg - s * mean[:, None]
        tl.store(dx_rows[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    else:
        ssum = zero
        sgsum = zero
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < n_cols)[None, :]
            p = tl.load(p_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            s = _support_weight(p, expo, MODE, FAST_LOG)
            a0, a1 = _sum2(s, s * g, FUSED)
            ssum += a0
            sgsum += a1
        mean = sgsum / tl.where(ssum > 0.0, ssum, 1.0)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < n_cols)[None, :]
            p = tl.load(p_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            s = _support_weight(p, expo, MODE, FAST_LOG)
            dx = s * g - s * mean[:, None]
            tl.store(dx_rows[:, None] + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class LaunchParams:
    """What one launch actually uses for a row length (derived from a Config, never tuned directly)."""

    block_n: int
    rows: int
    num_warps: int
    num_stages: int
    niter: int
    single: bool
    tau_tol: float | str = "auto"
    subset_start: bool = True

    @property
    def chunks(self) -> int:
        """Chunk maxima per tile behind the subset start: the widest layout sweep of the tile
        (8 columns per thread, 16-byte loads of 16-bit inputs), chunks of >= 2 columns."""
        return max(1, min(8 * 32 * self.num_warps, self.block_n // 2))

    @property
    def group(self) -> int:
        """Chunk maxima per thread (of the one-tile layout), merged into one for the start of a row
        held in registers. From the threshold of 256 maxima in 3 steps, randn rows of 8192 need
        the same full-row steps as from 2048 in 4 at alpha 1.5 (one), 0.6 more at alpha 2 and
        0.5 more on flat alpha-1.3 rows, 1.2 fewer on flat alpha-2 rows
        (benchmarks/study_entmax_start.py); the start's steps are what the GPU saves."""
        return max(1, self.chunks // (32 * self.num_warps))

    def tol(self, dtype: torch.dtype, alpha: float) -> float:
        """The early-exit step for ``dtype`` and ``alpha`` as the kernel takes it (-1: never stop early)."""
        return resolve_tol(self.tau_tol, dtype, alpha)


def resolve_tol(tau_tol: float | str, dtype: torch.dtype, alpha: float) -> float:
    """``tau_tol`` as a number: "auto" picks :data:`TAU_TOL_AUTO` 's value for the dtype and alpha
    class; 0 becomes -1 (the kernel then always runs ``niter`` iterations)."""
    if tau_tol == "auto":
        if dtype == torch.float32:
            tau_tol = TAU_TOL_AUTO[("float32", "any")]
        else:
            cls = "1.5" if alpha == 1.5 else "near2" if alpha > NEAR2_ALPHA else "other"
            tau_tol = TAU_TOL_AUTO[("16bit", cls)]
    tol = float(tau_tol)
    return tol if tol > 0.0 else -1.0


def _mode(alpha: float) -> int:
    if alpha == 1.5:
        return _MODE_15
    if alpha == 2.0:
        return _MODE_2
    return _MODE_GENERIC


def _interpreted() -> bool:
    return env_value("TRITON_INTERPRET", "0") == "1"


def _hardware_flags(is_cuda: bool, interpreted: bool) -> dict[str, bool]:
    """Compile-time switches that differ between real hardware and the interpreter.

    FUSED: one tuple reduction for several row sums (the interpreter runs a custom combine
    function element by element, so it gets plain tl.sum). FAST_LOG: lg2.approx on NVIDIA GPUs
    (tl.log2 compiles to a polynomial) and PTX ``set.gt`` for support counts; the interpreter and
    ROCm use tl.log2 and tl.where.
    """
    nvidia = is_cuda and torch.version.hip is None
    return {"FUSED": not interpreted, "FAST_LOG": nvidia and not interpreted}


@functools.lru_cache(maxsize=512)
def _forward_launch(config: Config, n_rows: int, n_cols: int, stride_x: int, stride_y: int, alpha: float,
                    dtype: torch.dtype, is_cuda: bool, interpreted: bool) -> Launch:
    """The forward kernel's launch for one problem and config, planned once (kernels/launch.py)."""
    lp = launch_params(config, n_cols)
    scalars = (n_rows, n_cols, stride_x, stride_y, alpha - 1.0, 1.0 / (alpha - 1.0), float(n_cols) ** (1.0 - alpha),
               lp.niter, lp.tol(dtype, alpha))
    init = (1 if lp.single else 2) if lp.subset_start else 0  # 2: certified (multi-tile rows only)
    meta = dict(ROWS=lp.rows, BLOCK_N=lp.block_n, MODE=_mode(alpha), SINGLE=lp.single, INIT=init, CHUNKS=lp.chunks, GROUP=lp.group,
                **_hardware_flags(is_cuda, interpreted), num_warps=lp.num_warps, num_stages=lp.num_stages)
    return Launch(_entmax_fwd_kernel, (triton.cdiv(n_rows, lp.rows),), scalars, meta)


@functools.lru_cache(maxsize=512)
def _backward_launch(config: Config, n_rows: int, n_cols: int, stride_p: int, stride_g: int, stride_dx: int,
                     alpha: float, dtypes: tuple[torch.dtype, torch.dtype], is_cuda: bool,
                     interpreted: bool) -> Launch:
    """The backward kernel's launch for one problem and config, planned once. ``dtypes`` (of p
    and grad) are part of the key: a plan re-launches the kernel compiled for its first call's
    pointer types."""
    lp = launch_params(config, n_cols)
    meta = dict(ROWS=lp.rows, BLOCK_N=lp.block_n, MODE=_mode(alpha), SINGLE=lp.single,
                **_hardware_flags(is_cuda, interpreted), num_warps=lp.num_warps, num_stages=lp.num_stages)
    return Launch(_entmax_bwd_kernel, (triton.cdiv(n_rows, lp.rows),),
                  (n_rows, n_cols, stride_p, stride_g, stride_dx, 2.0 - alpha), meta)


def launch_params(config: Config, cols: int) -> LaunchParams:
    """Map a Config onto one launch for rows of ``cols`` columns.

    ``block_n`` is the widest tile: a row uses min(block_n, next_pow2(cols)) columns per tile
    (a wider tile would only add masked lanes) and is swept several times when longer.
    ``num_warps`` is capped so that every thread holds at least one element of the tile.
    """
    if config.kernel != "entmax" or config.backend != "triton":
        raise ConfigError(f"entmax_triton needs an entmax/triton config, got {config.kernel}/{config.backend}")
    try:
        block_n, rows = int(config["block_n"]), int(config["rows"])
        num_warps, num_stages, niter = int(config["num_warps"]), int(config["num_stages"]), int(config["niter"])
    except KeyError as exc:
        raise ConfigError(f"entmax/triton config lacks field {exc.args[0]!r}") from None
    if niter < 1:
        raise ConfigError(f"config field 'niter' must be >= 1, got {niter}")
    tau_tol = config.get("tau_tol", _KNOB_DEFAULTS["tau_tol"])
    if tau_tol != "auto" and (isinstance(tau_tol, bool) or not isinstance(tau_tol, (int, float)) or tau_tol < 0):
        raise ConfigError(f"config field 'tau_tol' must be 'auto' or a number >= 0, got {tau_tol!r}")
    tau_init = config.get("tau_init", _KNOB_DEFAULTS["tau_init"])
    if tau_init not in ("subset", "lo"):
        raise ConfigError(f"config field 'tau_init' must be 'subset' or 'lo', got {tau_init!r}")
    tile = min(block_n, max(_MIN_TILE, triton.next_power_of_2(max(cols, 1))))
    warps = max(1, min(num_warps, rows * tile // 32))
    return LaunchParams(tile, rows, warps, num_stages, niter, tile >= cols, tau_tol, tau_init == "subset")


def _check_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name} has dtype {t.dtype}; the triton entmax supports float32, float16, bfloat16")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{name} is on {t.device}: the triton entmax needs a GPU tensor "
                         "(CPU tensors only under TRITON_INTERPRET=1); use the torch backend")
    return t if t.stride(-1) == 1 else t.contiguous()


#: A warm forward's key (config, shape, dtype, device, alpha of a contiguous CUDA input) -> its
#: planned launch: a repeated call allocates y and launches with raw addresses (``Launch.direct``).
_WARM_FORWARD: dict[tuple, Launch] = {}


def entmax_forward(x: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """alpha-entmax over the last dim of a 2-D tensor (no autograd). Output has x's dtype."""
    key = None
    if type(x) is torch.Tensor and x.is_cuda and x.is_contiguous():
        key = (config, x.shape, x.dtype, x.device, alpha)
        run = _WARM_FORWARD.get(key)
        if run is not None and run.ready():
            y = torch.empty_like(x)
            if run.direct(x.data_ptr(), y.data_ptr()):
                return y
    x = _check_rows("x", x)
    n_rows, n_cols = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    run = _forward_launch(config, n_rows, n_cols, x.stride(0), y.stride(0), float(alpha), x.dtype, x.is_cuda,
                          _interpreted())
    run(x, y)
    if key is not None:
        if len(_WARM_FORWARD) >= 1024:
            _WARM_FORWARD.clear()
        _WARM_FORWARD[key] = run
    return y


def entmax_backward(p: torch.Tensor, grad: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """Gradient w.r.t. the entmax input, given its output ``p`` and the output gradient ``grad``."""
    p = _check_rows("p", p)
    grad = _check_rows("grad", grad)
    if grad.shape != p.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match output shape {tuple(p.shape)}")
    n_rows, n_cols = p.shape
    dx = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if p.numel() == 0:
        return dx
    _backward_launch(config, n_rows, n_cols, p.stride(0), grad.stride(0), dx.stride(0), float(alpha),
                     (p.dtype, grad.dtype), p.is_cuda, _interpreted())(p, grad, dx)
    return dx


# --------------------------------------------------------------------------- autograd


class _EntmaxTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:  # type: ignore[override]
        y = entmax_forward(x, alpha, config)
        ctx.alpha = alpha
        ctx.config = config
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        dx = entmax_backward(y, grad.to(y.dtype), ctx.alpha, ctx.config)
        return dx, None, None


def entmax_triton(x: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """alpha-entmax over the last dim of 2-D ``x`` (rows, cols) with the launch given by ``config``.

    Computes in fp32; the output has x's dtype (float32, float16 or bfloat16). Differentiable.
    """
    if not isinstance(config, Config):
        raise TypeError(f"config must be a Config, got {type(config).__name__}")
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    return _EntmaxTriton.apply(x, alpha, config)
