"""Row-wise alpha-entmax in Triton: jit kernels -> launchers (explicit Config) -> autograd.Function.

Forward, per row, with z = (alpha - 1) x shifted by its max (max z = 0) and b = 1 / (alpha - 1):

1. **One max pass** that also keeps ``chunks`` chunk maxima (chunk c: the columns congruent to c
   modulo ``chunks``). With ``init="subset"`` Halley starts at the threshold of those few scores
   (:func:`~adasplash_tune.kernels.threshold.subset_tau`), a lower bound of the row's threshold
   that is exact when the chunk maxima hold the whole support (peaked rows); ``init="bracket"``
   starts at the bracket's lower end ``max - 1``.
2. **Halley sweeps on the b-norm** ``phi(tau) = (sum [z - tau]_+^b)^(1/b)``, safeguarded by the
   bracket ``[max - 1, max - n^(1 - alpha)]``. ``phi`` is convex and decreasing, and linear for a
   row of equal scores, so a flat row (thousands of keys in the support) converges in one step
   where Halley on ``f = phi^b - 1`` needs four or more; the sums are the usual
   ``(sum u^b, sum u^(b-1), sum u^(b-2))`` (alpha = 2: Newton, two sums). Sweeps stop, on the
   device, once every row's step is at most ``tol`` times its support width ``max z - tau``
   (``niter`` caps them). The step measure is the larger of the Halley step and the Newton
   distance ``|phi - 1| / |phi'|``, so a Halley step shrunk by a huge ``f''`` (alpha > 1.5, a score
   just above tau) never passes for convergence.
3. p = [z - tau]_+^b renormalised by its sum.

Backward: dx = s g - s sum(s g) / sum(s) with s = p^(2 - alpha) = (p^(1/b))^(b-1) on the support
(any per-row multiple of s gives the same dx). Only p is known there, so a per-score root is
unavoidable; for integer b it is algebraic: b = 2 sqrt(p), b = 4 sqrt(p) sqrt(sqrt(p)), b = 3
p * p^(-1/3) by three division-free Newton steps from a bit-level guess (exact up to rounding);
other alphas use exp2/log2.

Powers are specialised on ``B_INT`` (:func:`~adasplash_tune.kernels.problem.integer_b`: 1..4 for
alpha = 2, 1.5, 4/3, 1.25, products only; 0 = generic, exp2/log2) through
:mod:`~adasplash_tune.kernels.powers`. A row that fits one tile is loaded once, solved in
registers and stored once; a longer row is swept tile by tile in every pass.

Launch parameters come only from the :class:`Config`; :func:`launch_params` maps them onto one
launch, and the per-(config, shape, dtype, alpha) launch plan is memoised.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .declarations.entmax import TOL_AUTO
from .powers import pow_b, tau_terms
from .problem import integer_b
from .spec import Config, ConfigError
from .threshold import subset_tau

__all__ = [
    "entmax_triton", "entmax_forward", "entmax_backward", "forward_sweeps", "launch_params",
    "resolve_tol", "LaunchParams",
]

_MIN_TILE = 16
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
#: Halley steps of the chunk-maxima subset solve (a start only: 4 steps leave it within a few
#: percent of the subset's root for 16..128 maxima; the sweeps correct the rest).
_SUBSET_ITERS = 4


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


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
def _row_sums(z, tau, b_exp, B_INT: tl.constexpr, FUSED: tl.constexpr):
    """Per-row (sum u^b, sum u^(b-1), sum u^(b-2)), u = [z - tau]_+, over a [ROWS, BLOCK_N] tile.

    alpha = 2 (B_INT = 1) returns its third sum as zeros (Newton needs two). Support counts
    compare z with tau: testing u > 0 instead makes LLVM pack the predicates into bit masks and
    unpack them again (about 30% more instructions per sweep, measured on the H200)."""
    u = tl.maximum(z - tau[:, None], 0.0)
    if B_INT == 1:
        s0, s1 = _sum2(u, tl.where(z > tau[:, None], 1.0, 0.0), FUSED)
        s2 = s0 * 0.0
    elif B_INT == 2:
        s0, s1, s2 = _sum3(u * u, u, tl.where(z > tau[:, None], 1.0, 0.0), FUSED)
    else:
        t0, t1, t2 = tau_terms(u, b_exp, B_INT)
        s0, s1, s2 = _sum3(t0, t1, t2, FUSED)
    return s0, s1, s2


@triton.jit
def _root_b(s, b_exp, B_INT: tl.constexpr):
    """s^(1/b) per row (s > 0): the b-norm from the sum of b-th powers."""
    if B_INT == 1:
        r = s
    elif B_INT == 2:
        r = tl.sqrt(s)
    elif B_INT == 4:
        r = tl.sqrt(tl.sqrt(s))
    else:
        r = tl.math.exp2(tl.math.log2(s) / b_exp)
    return r


@triton.jit
def _norm_step(tau, lo, hi, s0, s1, s2, b_exp, B_INT: tl.constexpr):
    """One safeguarded Halley step on phi(tau) - 1, phi = s0^(1/b) (Newton for alpha = 2).

    Returns the new tau, the narrowed bracket and the step measure (the larger of the step taken
    and the Newton distance |phi - 1| / |phi'|). With q = phi, g = q - 1:
    phi' = -q s1 / s0 and phi'' = (b - 1) q (s0 s2 - s1^2) / s0^2, so the Halley step is
    2 g s0 s1 / (2 q s1^2 - g (b - 1) (s0 s2 - s1^2))."""
    above = s0 > 1.0
    lo = tl.where(above, tau, lo)
    hi = tl.where(above, hi, tau)
    q = _root_b(s0, b_exp, B_INT)
    g = q - 1.0
    if B_INT == 1:
        num = s0 - 1.0
        den = s1
    else:
        num = 2.0 * g * s0 * s1
        den = 2.0 * q * s1 * s1 - g * (b_exp - 1.0) * (s0 * s2 - s1 * s1)
    ok = den > 0.0
    cand = tau + num / tl.where(ok, den, 1.0)
    inside = ok & (cand >= lo) & (cand <= hi)
    new = tl.where(inside, cand, 0.5 * (lo + hi))
    new = tl.where(s0 == 1.0, tau, new)
    newton = tl.abs(g) * s0 / tl.maximum(q * s1, 1e-30)
    return new, lo, hi, tl.maximum(tl.abs(new - tau), newton)


@triton.jit
def _start(cmax, xmax, scale, gap, CHUNKS: tl.constexpr, B_INT: tl.constexpr, b_exp,
           SUB_ITERS: tl.constexpr):
    """First tau and bracket [lo, hi] in z units (z = scale * x - scale * xmax)."""
    zero = xmax * 0.0
    lo = zero - 1.0
    hi = zero - gap
    if CHUNKS > 0:
        vals = cmax * scale - (xmax * scale)[:, None]
        tau = tl.minimum(tl.maximum(subset_tau(vals, zero, b_exp, B_INT, SUB_ITERS), lo), hi)
    else:
        tau = lo
    return tau, lo, hi


@triton.jit
def _chunk_max(x, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """[ROWS, CHUNKS] maxima of a tile: chunk c holds the columns congruent to c mod CHUNKS."""
    return tl.max(tl.reshape(x, [ROWS, BLOCK_N // CHUNKS, CHUNKS]), axis=1)


@triton.jit
def _load_x(x_rows, cols, n_cols):
    """One tile as fp32; columns past the row hold -inf."""
    return tl.load(x_rows[:, None] + cols[None, :], mask=(cols < n_cols)[None, :],
                   other=float("-inf")).to(tl.float32)


# --------------------------------------------------------------------------- forward kernel


@triton.jit
def _entmax_fwd_kernel(
    X, Y, SWEEPS, n_rows, n_cols, stride_x, stride_y, scale, b_exp, gap, tol, niter,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, B_INT: tl.constexpr,
    SINGLE: tl.constexpr, SUB_ITERS: tl.constexpr, FUSED: tl.constexpr, COUNT: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    # rows past the end re-read the last row (valid memory, finite values); their stores are masked
    safe_rows = tl.minimum(rows, n_rows - 1).to(tl.int64)
    x_rows = X + safe_rows * stride_x
    y_rows = Y + rows.to(tl.int64) * stride_y
    cols = tl.arange(0, BLOCK_N)
    it = tl.program_id(0) * 0
    if SINGLE:
        x = _load_x(x_rows, cols, n_cols)
        if CHUNKS > 0:
            cmax = _chunk_max(x, ROWS, BLOCK_N, CHUNKS)
            xmax = tl.max(cmax, axis=1)
        else:
            cmax = x
            xmax = tl.max(x, axis=1)
        z = x * scale - (xmax * scale)[:, None]
        tau, lo, hi = _start(cmax, xmax, scale, gap, CHUNKS, B_INT, b_exp, SUB_ITERS)
        go = it < niter
        while go:
            s0, s1, s2 = _row_sums(z, tau, b_exp, B_INT, FUSED)
            tau, lo, hi, step = _norm_step(tau, lo, hi, s0, s1, s2, b_exp, B_INT)
            it += 1
            go = (it < niter) & (tl.max(step / -tau, axis=0) > tol)
        p = pow_b(tl.maximum(z - tau[:, None], 0.0), b_exp, B_INT)
        p = p * (1.0 / tl.sum(p, axis=1))[:, None]
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        tl.store(y_rows[:, None] + cols[None, :], p.to(Y.dtype.element_ty), mask=mask)
    else:
        xmax = tl.full([ROWS], float("-inf"), tl.float32)
        if CHUNKS > 0:
            cmax = tl.full([ROWS, CHUNKS], float("-inf"), tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                cmax = tl.maximum(cmax, _chunk_max(_load_x(x_rows, start + cols, n_cols), ROWS, BLOCK_N, CHUNKS))
            xmax = tl.max(cmax, axis=1)
        else:
            cmax = xmax[:, None]
            for start in range(0, n_cols, BLOCK_N):
                xmax = tl.maximum(xmax, tl.max(_load_x(x_rows, start + cols, n_cols), axis=1))
        zmax = xmax * scale
        tau, lo, hi = _start(cmax, xmax, scale, gap, CHUNKS, B_INT, b_exp, SUB_ITERS)
        go = it < niter
        while go:
            s0 = xmax * 0.0
            s1 = s0
            s2 = s0
            for start in range(0, n_cols, BLOCK_N):
                z = _load_x(x_rows, start + cols, n_cols) * scale - zmax[:, None]
                a0, a1, a2 = _row_sums(z, tau, b_exp, B_INT, FUSED)
                s0 += a0
                s1 += a1
                s2 += a2
            tau, lo, hi, step = _norm_step(tau, lo, hi, s0, s1, s2, b_exp, B_INT)
            it += 1
            go = (it < niter) & (tl.max(step / -tau, axis=0) > tol)
        total = xmax * 0.0
        for start in range(0, n_cols, BLOCK_N):
            z = _load_x(x_rows, start + cols, n_cols) * scale - zmax[:, None]
            total += tl.sum(pow_b(tl.maximum(z - tau[:, None], 0.0), b_exp, B_INT), axis=1)
        inv = 1.0 / total
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            z = _load_x(x_rows, c, n_cols) * scale - zmax[:, None]
            p = pow_b(tl.maximum(z - tau[:, None], 0.0), b_exp, B_INT) * inv[:, None]
            tl.store(y_rows[:, None] + c[None, :], p.to(Y.dtype.element_ty),
                     mask=row_ok[:, None] & (c < n_cols)[None, :])
    if COUNT:
        tl.store(SWEEPS + rows, it + rows * 0, mask=row_ok)


# --------------------------------------------------------------------------- backward kernel


@triton.jit
def _inv_cbrt(p):
    """p^(-1/3) for normal positive fp32 p: a bit-level first guess (within 3.5%), then three
    division-free Newton steps y <- y (4 - p y^3) / 3 (relative error e -> 2 e^2: fp32 rounding)."""
    bits = p.to(tl.int32, bitcast=True)
    y = (0x54A237FB - bits // 3).to(tl.float32, bitcast=True)
    for _ in tl.static_range(3):
        y = y * (4.0 - p * (y * y * y)) * (1.0 / 3.0)
    return y


@triton.jit
def _support_weight(p, b_exp, B_INT: tl.constexpr):
    """s = p^(1 - 1/b) = p^(2 - alpha) on the support, 0 elsewhere (up to a per-row factor)."""
    pos = p > 0.0
    if B_INT == 1:
        s = tl.where(pos, 1.0, 0.0)
    elif B_INT == 2:
        s = tl.sqrt(p)
    elif B_INT == 4:
        r = tl.sqrt(p)
        s = r * tl.sqrt(r)
    elif B_INT == 3:
        pc = tl.maximum(p, 1e-30)  # a weight below 1e-20 is nothing beside the row's largest
        s = tl.where(pos, pc * _inv_cbrt(pc), 0.0)
    else:
        s = tl.where(pos, tl.math.exp2((1.0 - 1.0 / b_exp) * tl.math.log2(tl.where(pos, p, 1.0))), 0.0)
    return s


@triton.jit
def _entmax_bwd_kernel(
    P, G, DX, n_rows, n_cols, stride_p, stride_g, stride_dx, b_exp,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, B_INT: tl.constexpr, SINGLE: tl.constexpr,
    FUSED: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    p_rows = P + rows.to(tl.int64) * stride_p
    g_rows = G + rows.to(tl.int64) * stride_g
    dx_rows = DX + rows.to(tl.int64) * stride_dx
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        p = tl.load(p_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _support_weight(p, b_exp, B_INT)
        ssum, sgsum = _sum2(s, s * g, FUSED)
        mean = sgsum / tl.where(ssum > 0.0, ssum, 1.0)
        dx = s * (g - mean[:, None])
        tl.store(dx_rows[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    else:
        ssum = tl.zeros([ROWS], dtype=tl.float32)
        sgsum = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < n_cols)[None, :]
            p = tl.load(p_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            s = _support_weight(p, b_exp, B_INT)
            a0, a1 = _sum2(s, s * g, FUSED)
            ssum += a0
            sgsum += a1
        mean = sgsum / tl.where(ssum > 0.0, ssum, 1.0)
        for start in range(0, n_cols, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < n_cols)[None, :]
            p = tl.load(p_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dx = _support_weight(p, b_exp, B_INT) * (g - mean[:, None])
            tl.store(dx_rows[:, None] + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class LaunchParams:
    """What one launch actually uses for a row length (derived from a Config, never tuned directly).

    ``chunks`` is 0 for ``init="bracket"``; ``tol`` may still be ``"auto"`` (see
    :func:`resolve_tol`)."""

    block_n: int
    rows: int
    num_warps: int
    num_stages: int
    niter: int
    single: bool
    chunks: int
    tol: Any


def launch_params(config: Config, cols: int) -> LaunchParams:
    """Map a Config onto one launch for rows of ``cols`` columns.

    ``block_n`` is the widest tile: a row uses min(block_n, next_pow2(cols)) columns per tile
    (a wider tile would only add masked lanes) and is swept several times when longer.
    ``num_warps`` is capped so that every thread holds at least one element of the tile, and
    ``chunks`` at the tile width.
    """
    if config.kernel != "entmax" or config.backend != "triton":
        raise ConfigError(f"entmax_triton needs an entmax/triton config, got {config.kernel}/{config.backend}")
    try:
        block_n, rows = int(config["block_n"]), int(config["rows"])
        num_warps, num_stages, niter = int(config["num_warps"]), int(config["num_stages"]), int(config["niter"])
        init, chunks, tol = config["init"], int(config["chunks"]), config["tol"]
    except KeyError as exc:
        raise ConfigError(f"entmax/triton config lacks field {exc.args[0]!r}") from None
    if niter < 1:
        raise ConfigError(f"config field 'niter' must be >= 1, got {niter}")
    if init not in ("subset", "bracket"):
        raise ConfigError(f"config field 'init' must be 'subset' or 'bracket', got {init!r}")
    tile = min(block_n, max(_MIN_TILE, triton.next_power_of_2(max(cols, 1))))
    warps = max(1, min(num_warps, rows * tile // 32))
    return LaunchParams(tile, rows, warps, num_stages, niter, tile >= cols,
                        min(chunks, tile) if init == "subset" else 0, tol)


def resolve_tol(tol: Any, dtype: torch.dtype, alpha: float) -> float:
    """The early-exit step of a config's ``tol`` (``"auto"``: per precision and alpha class)."""
    if tol != "auto":
        return float(tol)
    b = integer_b(alpha)
    kind = "generic" if b == 0 else "2" if b == 1 else "int"
    return TOL_AUTO[("float32" if dtype == torch.float32 else "16bit", kind)]


@functools.cache
def _interpreted() -> bool:
    """Triton decides interpreter or compiler when a kernel is decorated, so this is read once."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fused_reductions() -> bool:
    """One tuple reduction for several row sums on hardware; the interpreter runs a custom combine
    function element by element, so it gets plain tl.sum."""
    return not _interpreted()


@dataclass(frozen=True)
class _Plan:
    """Everything a launch needs beyond the tensors, decided once per (config, shape, dtype, alpha)."""

    rows: int
    scalars: tuple[float, ...]
    meta: dict[str, Any]


@functools.lru_cache(maxsize=512)
def _forward_plan(config: Config, n_cols: int, dtype: torch.dtype, alpha: float, fused: bool,
                  count: bool) -> _Plan:
    lp = launch_params(config, n_cols)
    b_exp = 1.0 / (alpha - 1.0)
    scalars = (alpha - 1.0, b_exp, float(n_cols) ** (1.0 - alpha), resolve_tol(lp.tol, dtype, alpha), lp.niter)
    meta = dict(ROWS=lp.rows, BLOCK_N=lp.block_n, CHUNKS=lp.chunks, B_INT=integer_b(alpha),
                SINGLE=lp.single, SUB_ITERS=_SUBSET_ITERS, FUSED=fused, COUNT=count,
                num_warps=lp.num_warps, num_stages=lp.num_stages)
    return _Plan(lp.rows, scalars, meta)


@functools.lru_cache(maxsize=512)
def _backward_plan(config: Config, n_cols: int, alpha: float, fused: bool) -> _Plan:
    lp = launch_params(config, n_cols)
    meta = dict(ROWS=lp.rows, BLOCK_N=lp.block_n, B_INT=integer_b(alpha), SINGLE=lp.single,
                FUSED=fused, num_warps=lp.num_warps, num_stages=lp.num_stages)
    return _Plan(lp.rows, (1.0 / (alpha - 1.0),), meta)


def _check_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name} has dtype {t.dtype}; the triton entmax supports float32, float16, bfloat16")
    if not t.is_cuda and not _interpreted():
        raise ValueError(f"{name} is on {t.device}: the triton entmax needs a GPU tensor "
                         "(CPU tensors only under TRITON_INTERPRET=1); use the torch backend")
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x: torch.Tensor, alpha: float, config: Config, sweeps: torch.Tensor | None) -> torch.Tensor:
    x = _check_rows("x", x)
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    plan = _forward_plan(config, n_cols, x.dtype, float(alpha), _fused_reductions(), sweeps is not None)
    _entmax_fwd_kernel[(triton.cdiv(n_rows, plan.rows),)](
        x, y, y if sweeps is None else sweeps, n_rows, n_cols, x.stride(0), y.stride(0),
        *plan.scalars, **plan.meta,
    )
    return y


def entmax_forward(x: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """alpha-entmax over the last dim of a 2-D tensor (no autograd). Output has x's dtype."""
    return _forward(x, alpha, config, None)


def forward_sweeps(x: torch.Tensor, alpha: float, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`entmax_forward` plus the number of Halley sweeps each row's program ran (int32,
    one per row): a diagnostic for benchmarks (a separately compiled variant of the kernel)."""
    sweeps = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    return _forward(x, alpha, config, sweeps), sweeps


def entmax_backward(p: torch.Tensor, grad: torch.Tensor, alpha: float, config: Config) -> torch.Tensor:
    """Gradient w.r.t. the entmax input, given its output ``p`` and the output gradient ``grad``."""
    p = _check_rows("p", p)
    grad = _check_rows("grad", grad)
    if grad.shape != p.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} does not match output shape {tuple(p.shape)}")
    n_rows, n_cols = p.shape
    dx = torch.empty((n_rows, n_cols), dtype=p.dtype, device=p.device)
    if p.numel() == 0:
        return dx
    plan = _backward_plan(config, n_cols, float(alpha), _fused_reductions())
    _entmax_bwd_kernel[(triton.cdiv(n_rows, plan.rows),)](
        p, grad, dx, n_rows, n_cols, p.stride(0), grad.stride(0), dx.stride(0), *plan.scalars, **plan.meta,
    )
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
