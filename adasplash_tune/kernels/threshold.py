"""The threshold tau of alpha-entmax on a few candidate scores: the Halley starting point.

``tau`` is non-decreasing in the set of scores: adding a score adds a non-negative term to
``f(t) = sum_j [z_j - t]_+^b - 1`` at every t, so the root moves right. The threshold of any subset
of a row's scores is therefore a lower bound of the row's threshold. Both Triton kernels keep a
handful of a row's largest scores (chunk maxima) while they find its max, solve the threshold of
that subset here, and start their Halley sweeps from it: for a row whose support is at most a few
dozen keys the bound is within a small fraction of the support width, and it is always a valid
lower end of the bracket.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .powers import tau_terms

__all__ = ["subset_tau", "halley_step"]


@triton.jit
def halley_step(tau, lo, hi, s0, s1, s2, b_exp, B_INT: tl.constexpr):
    """One safeguarded Halley step on f(tau) = s0 - 1, from the sums (sum u^b, sum u^(b-1),
    sum u^(b-2)) at tau: the bracket [lo, hi] shrinks by the sign of f; the step is kept when it
    lands inside it, else the midpoint. Returns (new tau, lo, hi)."""
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
    cand = tau - tl.where(ok, 2.0 * f * df / tl.where(ok, den, 1.0), 0.0)
    inside = ok & (cand >= lo) & (cand <= hi)
    new = tl.where(f == 0, tau, tl.where(inside, cand, 0.5 * (lo + hi)))
    return new, lo, hi


@triton.jit
def subset_tau(vals, zmax, b_exp, B_INT: tl.constexpr, ITERS: tl.constexpr):
    """tau (in z units) of the scores ``vals`` [R, K] (``-inf`` for an empty slot), per row.

    ``zmax`` [R] is each row's largest score (it must be among ``vals``). Safeguarded Halley on
    the bracket [zmax - 1, zmax], ``ITERS`` steps (K is small: a few hundred operations per row).
    Returns the last iterate: the subset's root up to rounding, hence a lower bound of the whole
    row's threshold up to rounding (callers evaluate f there before trusting it as a bracket end).
    Rows without any finite value get ``zmax - 1``."""
    lo = zmax - 1.0
    hi = zmax
    tau = lo
    for _ in tl.static_range(ITERS):
        u = tl.maximum(vals - tau[:, None], 0.0)
        t0, t1, t2 = tau_terms(u, b_exp, B_INT)
        tau, lo, hi = halley_step(tau, lo, hi, tl.sum(t0, axis=1), tl.sum(t1, axis=1), tl.sum(t2, axis=1),
                                  b_exp, B_INT)
    return tau
