"""Halley-bisection for the entmax threshold tau, in PyTorch ops (shared by the torch backend).

f(tau) = sum_i [z_i - tau]_+^b - 1 with z = (alpha - 1) x and b = 1 / (alpha - 1) is decreasing
and convex in tau. The root lies in [max(z) - 1, max(z) - n^(1 - alpha)]. Each iteration evaluates
f, f', f'' at the current point (one sweep over the row, or over all key chunks), narrows the
bracket with the sign of f, and takes the Halley step if it lands strictly inside the bracket,
else the bracket midpoint. alpha = 1.5 and 2 use power-free formulas.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["power_sums", "halley_bisect", "entmax_probs"]

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def power_sums(z: torch.Tensor, tau: torch.Tensor, alpha: float) -> Stats:
    """(sum [z-tau]_+^b, sum [z-tau]_+^(b-1), sum [z-tau]_+^(b-2)) over the last dim, keepdim.

    Masked entries must hold -inf in ``z``. For alpha = 2 the last sum is returned as zeros
    (f'' = 0); for alpha = 1.5 the sums are of squares, values and support counts.
    """
    u = (z - tau).clamp(min=0.0)
    if alpha == 1.5:
        return (u * u).sum(-1, keepdim=True), u.sum(-1, keepdim=True), (u > 0).to(u.dtype).sum(-1, keepdim=True)
    if alpha == 2.0:
        s0 = u.sum(-1, keepdim=True)
        return s0, (u > 0).to(u.dtype).sum(-1, keepdim=True), torch.zeros_like(s0)
    b = 1.0 / (alpha - 1.0)
    pos = u > 0
    safe = torch.where(pos, u, torch.ones_like(u))
    logu = torch.log(safe)
    zero = torch.zeros_like(u)
    s0 = torch.where(pos, torch.exp(b * logu), zero).sum(-1, keepdim=True)
    s1 = torch.where(pos, torch.exp((b - 1.0) * logu), zero).sum(-1, keepdim=True)
    s2 = torch.where(pos, torch.exp((b - 2.0) * logu), zero).sum(-1, keepdim=True)
    return s0, s1, s2


def halley_bisect(
    sums: Callable[[torch.Tensor], Stats],
    zmax: torch.Tensor,
    count: torch.Tensor,
    alpha: float,
    niter: int,
) -> torch.Tensor:
    """tau per row after ``niter`` safeguarded Halley iterations.

    ``sums(tau)`` returns :func:`power_sums` over the whole row (possibly accumulated over
    chunks); ``zmax`` is the row max of z and ``count`` the number of valid entries (>= 1).
    """
    b = 1.0 / (alpha - 1.0)
    lo = zmax - 1.0
    hi = zmax - count.pow(1.0 - alpha)
    tau = lo
    for _ in range(niter):
        s0, s1, s2 = sums(tau)
        f = s0 - 1.0
        df = -b * s1
        d2f = b * (b - 1.0) * s2
        above = f > 0
        lo = torch.where(above, tau, lo)
        hi = torch.where(above, hi, tau)
        denom = 2.0 * df * df - f * d2f
        step = torch.where(denom != 0, 2.0 * f * df / torch.where(denom != 0, denom, torch.ones_like(denom)),
                           torch.zeros_like(f))
        # Near alpha = 2, f'' (a sum of u^(b-2), b - 2 close to -1) blows up on keys just inside the
        # support: the Halley step (the Newton step / (1 - r), r = f f'' / 2f'^2) then overshoots
        # far past the root or turns backwards, and 8 iterations from max - 1 left tau 8% off
        # (alpha = 1.95, flat rows of 1000 keys). Where r > 1/2 take the Newton step instead, which
        # from f > 0 on this convex decreasing f lands in [tau, root]; bisection stays the last resort.
        safe_df = torch.where(df != 0, df, torch.ones_like(df))
        newton = tau - f / safe_df
        halley_big = (df != 0) & (f * d2f > df * df)
        cand = torch.where(halley_big, newton, tau - step)
        inside = (cand >= lo) & (cand <= hi) & torch.isfinite(cand)
        newton_inside = (df != 0) & (newton >= lo) & (newton <= hi) & torch.isfinite(newton)
        cand = torch.where(inside, cand, newton)
        inside = inside | newton_inside
        nxt = torch.where(inside, cand, 0.5 * (lo + hi))
        tau = torch.where(f == 0, tau, nxt)  # exact root: stay
    return tau


def entmax_probs(z: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Unnormalised [z - tau]_+^(1/(alpha-1)) (masked entries of z hold -inf -> 0)."""
    u = (z - tau).clamp(min=0.0)
    if alpha == 1.5:
        return u * u
    if alpha == 2.0:
        return u
    return u.pow(1.0 / (alpha - 1.0))
