"""Powers of ``u = [z - tau]_+`` for the Triton kernels, specialised on the alpha class.

With ``b = 1 / (alpha - 1)``: unnormalised probabilities are ``u^b``, the threshold's Halley
sweeps need ``(u^b, u^(b-1), u^(b-2))`` and the backward weight is ``u^(b-1)``.

``B_INT`` (a compile-time constant, :func:`~adasplash_tune.kernels.problem.integer_b`) is the
integer b of alpha = 2, 1.5, 4/3 and 1.25 (1, 2, 3, 4): the powers are then products, exact up to
rounding and free of special functions. ``B_INT = 0`` is the generic path: one ``log2`` and one
or two ``exp2`` per score, on the special-function units.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["pow_int", "pow_b", "pow_bm1", "tau_terms"]


@triton.jit
def pow_int(u, P: tl.constexpr):
    """u^P for a compile-time integer P in 0..4, by multiplication."""
    if P == 0:
        r = tl.where(u > 0, 1.0, 0.0)
    elif P == 1:
        r = u
    elif P == 2:
        r = u * u
    elif P == 3:
        r = u * u * u
    else:
        sq = u * u
        r = sq * sq
    return r


@triton.jit
def _log2_pos(u):
    pos = u > 0
    return pos, tl.math.log2(tl.where(pos, u, 1.0))


@triton.jit
def pow_b(u, b_exp, B_INT: tl.constexpr):
    """u^b for u >= 0 (0 where u == 0)."""
    if B_INT > 0:
        r = pow_int(u, B_INT)
    else:
        pos, lg = _log2_pos(u)
        r = tl.where(pos, tl.math.exp2(b_exp * lg), 0.0)
    return r


@triton.jit
def pow_bm1(u, b_exp, B_INT: tl.constexpr):
    """u^(b - 1) on the support (u > 0), 0 elsewhere: the backward weight before normalisation."""
    if B_INT > 0:
        r = pow_int(u, B_INT - 1)
    else:
        pos, lg = _log2_pos(u)
        r = tl.where(pos, tl.math.exp2((b_exp - 1.0) * lg), 0.0)
    return r


@triton.jit
def tau_terms(u, b_exp, B_INT: tl.constexpr):
    """Per-score terms of (sum u^b, sum u^(b-1), sum u^(b-2)), the sums behind f, f' and f''.

    alpha = 2 (b = 1) has f'' = 0: its third term is returned as zeros (callers skip its sum)."""
    if B_INT == 1:
        t0 = u
        t1 = tl.where(u > 0, 1.0, 0.0)
        t2 = u * 0.0
    elif B_INT == 2:
        t0 = u * u
        t1 = u
        t2 = tl.where(u > 0, 1.0, 0.0)
    elif B_INT == 3:
        t2 = u
        t1 = u * u
        t0 = t1 * u
    elif B_INT == 4:
        t2 = u * u
        t1 = t2 * u
        t0 = t2 * t2
    else:
        pos, lg = _log2_pos(u)
        t2 = tl.where(pos, tl.math.exp2((b_exp - 2.0) * lg), 0.0)
        t1 = t2 * u
        t0 = t1 * u
    return t0, t1, t2
