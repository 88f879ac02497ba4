"""The fp64 oracle: dense alpha-entmax and dense entmax attention.

Deliberately simple and certain rather than fast: tau by plain bisection in float64 (the bracket
[max - 1, max - n^(1-alpha)] halves to machine precision), then an exact renormalisation.
Tests and the tuner's accuracy gate compare every kernel against these functions.

alpha-entmax (Peters et al., 2019): p_i = [(alpha - 1) x_i - tau]_+ ^ (1 / (alpha - 1)) with tau
chosen so that sum_i p_i = 1. Its Jacobian is diag(s) - s s^T / sum(s) with s = p^(2 - alpha).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "entmax_reference", "attention_reference", "relative_error", "attention_mask", "TOLERANCES",
    "tolerance",
]

_BISECTION_STEPS = 80


def _tau_bisect(z: torch.Tensor, alpha: float, valid: torch.Tensor) -> torch.Tensor:
    """tau per row of ``z = (alpha - 1) * x`` (last dim), fp64; rows with no valid entry get +inf."""
    neg_inf = torch.tensor(-math.inf, dtype=z.dtype, device=z.device)
    z = torch.where(valid, z, neg_inf)
    count = valid.sum(dim=-1, keepdim=True).to(z.dtype)
    zmax = z.amax(dim=-1, keepdim=True)
    empty = count == 0
    zmax = torch.where(empty, torch.zeros_like(zmax), zmax)
    lo = zmax - 1.0
    hi = zmax - count.clamp(min=1.0).pow(1.0 - alpha)
    inv = 1.0 / (alpha - 1.0)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        mass = (z - mid).clamp(min=0.0).pow(inv).sum(dim=-1, keepdim=True)
        too_low = mass >= 1.0  # f(mid) >= 0: root is to the right
        lo = torch.where(too_low, mid, lo)
        hi = torch.where(too_low, hi, mid)
    tau = 0.5 * (lo + hi)
    return torch.where(empty, torch.full_like(tau, math.inf), tau)


class _EntmaxReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, valid: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z = (alpha - 1.0) * x
        tau = _tau_bisect(z, alpha, valid)
        p = torch.where(valid, (z - tau).clamp(min=0.0), torch.zeros_like(z)).pow(1.0 / (alpha - 1.0))
        total = p.sum(dim=-1, keepdim=True)
        p = torch.where(total > 0, p / total.clamp(min=1e-300), p)
        ctx.alpha = alpha
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        s = torch.where(p > 0, p.pow(2.0 - ctx.alpha), torch.zeros_like(p))
        ssum = s.sum(dim=-1, keepdim=True).clamp(min=1e-300)
        gx = s * grad - s * (s * grad).sum(dim=-1, keepdim=True) / ssum
        return gx, None, None


def entmax_reference(
    x: torch.Tensor, alpha: float = 1.5, dim: int = -1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """fp64 alpha-entmax of ``x`` along ``dim`` (differentiable). ``valid``: optional bool mask of
    entries that take part (others get probability 0; a row with none is all zeros)."""
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    x64 = x.to(torch.float64).movedim(dim, -1)
    if valid is None:
        valid64 = torch.ones_like(x64, dtype=torch.bool)
    else:
        valid64 = valid.movedim(dim, -1).expand_as(x64)
    p = _EntmaxReference.apply(x64, float(alpha), valid64)
    return p.movedim(-1, dim)


def attention_mask(
    n_q: int, n_k: int, batch: int, *, is_causal: bool, varlen: torch.Tensor | None, device=None
) -> torch.Tensor:
    """Boolean (B, 1, Nq, Nk) mask of the (query, key) pairs that take part."""
    rows = torch.arange(n_q, device=device).view(n_q, 1)
    cols = torch.arange(n_k, device=device).view(1, n_k)
    mask = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool, device=device)
    if is_causal:
        mask = mask & (cols <= rows)
    if varlen is not None:
        lengths = varlen.to(device=device, dtype=torch.long).view(batch, 1, 1, 1)
        mask = mask & (cols < lengths) & (rows < lengths)
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float = 1.5,
    is_causal: bool = False,
    varlen: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense fp64 entmax attention: q (B, Hq, N, D), k/v (B, Hkv, N, D) with GQA; differentiable.

    Rows with no valid key (past a varlen length) are zero.
    """
    batch, hq, n_q, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    if group > 1:
        k64 = k64.repeat_interleave(group, dim=1)
        v64 = v64.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = scale * (q64 @ k64.transpose(-1, -2))
    valid = attention_mask(n_q, k.shape[2], batch, is_causal=is_causal, varlen=varlen, device=q.device)
    probs = entmax_reference(scores, alpha, dim=-1, valid=valid.expand_as(scores))
    return probs @ v64


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


#: Relative-error gates against this oracle: dtype -> (forward, gradients). DESIGN.md's table.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-3),
    torch.float16: (1e-2, 2e-2),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float64: (1e-7, 1e-6),
}


def tolerance(dtype: torch.dtype, *, grad: bool = False) -> float:
    fwd, bwd = TOLERANCES[dtype]
    return bwd if grad else fwd
