"""The gradient of entmax attention w.r.t. alpha (for a learnable alpha), in PyTorch ops.

With scores x fixed, b = 1 / (alpha - 1), p = [(alpha - 1) x - tau]_+^b and s = p^(2 - alpha)
on the support, differentiating p_j^(1/b) = (alpha - 1) x_j - tau and using sum_j dp_j = 0 gives

    dp_j / dalpha = b * ( b * (p_j - s^_j) - (p_j log p_j - s^_j * H) ),
    s^ = s / sum(s),  H = sum_j p_j log p_j.

For out = P V the alpha gradient is sum_ij dP_ij dp_ij / dalpha with dP = dO V^T. This recomputes
P one query chunk at a time (memory O(chunk x N) per head): a learnable alpha costs one extra
dense pass in the backward, whatever backend ran the forward.
"""

from __future__ import annotations

import math

import torch

from .tau import entmax_probs, halley_bisect, power_sums

__all__ = ["attention_alpha_grad"]


def _support_weight(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = p^(2 - alpha) on the support, zero elsewhere."""
    if alpha == 2.0:
        return (p > 0).to(p.dtype)
    pos = p > 0
    return torch.where(pos, torch.where(pos, p, torch.ones_like(p)).pow(2.0 - alpha), torch.zeros_like(p))


@torch.no_grad()  # a closed form: recording its dense intermediates for autograd would cost O(niter * N^2)
def attention_alpha_grad(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    is_causal: bool,
    varlen: torch.Tensor | None,
    scale: float,
    *,
    niter: int = 30,
    q_chunk: int = 128,
) -> torch.Tensor:
    """d(sum(grad_out * out)) / dalpha as a 0-d float32 tensor (float64 for float64 inputs).

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with Hq % Hkv == 0. ``niter`` Halley-bisection steps
    solve tau for the recomputed probabilities.
    """
    alpha = float(alpha)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, hq, n, _ = q.shape
    group = hq // k.shape[1]
    kf = k.to(dt).repeat_interleave(group, dim=1) if group > 1 else k.to(dt)
    vf = v.to(dt).repeat_interleave(group, dim=1) if group > 1 else v.to(dt)
    lengths = None if varlen is None else varlen.to(device=q.device, dtype=torch.long).clamp(0, n)
    b = 1.0 / (alpha - 1.0)
    total = torch.zeros((), dtype=dt, device=q.device)
    cols = torch.arange(n, device=q.device).view(1, -1)
    for i0 in range(0, n, q_chunk):
        i1 = min(i0 + q_chunk, n)
        rows = torch.arange(i0, i1, device=q.device).view(-1, 1)
        valid = (cols <= rows) if is_causal else torch.ones(i1 - i0, n, dtype=torch.bool, device=q.device)
        valid = valid.view(1, 1, i1 - i0, n)
        if lengths is not None:
            lens = lengths.view(-1, 1, 1, 1)
            valid = valid & (cols.view(1, 1, 1, n) < lens) & (rows.view(1, 1, -1, 1) < lens)
        z = (alpha - 1.0) * scale * torch.matmul(q[:, :, i0:i1].to(dt), kf.transpose(-1, -2))
        z = z.masked_fill(~valid, -math.inf)
        zmax = z.amax(-1, keepdim=True)
        empty = ~torch.isfinite(zmax)
        z = z - torch.where(empty, torch.zeros_like(zmax), zmax)
        count = valid.sum(-1, keepdim=True).to(dt).clamp(min=1.0).expand_as(zmax)
        tau = halley_bisect(lambda t: power_sums(z, t, alpha), torch.zeros_like(zmax), count, alpha, niter)
        p = entmax_probs(z, tau, alpha)
        psum = p.sum(-1, keepdim=True)
        p = p / torch.where(psum > 0, psum, torch.ones_like(psum))
        s = _support_weight(p, alpha)
        ssum = s.sum(-1, keepdim=True)
        s_hat = s / torch.where(ssum > 0, ssum, torch.ones_like(ssum))
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        entropy_term = plogp.sum(-1, keepdim=True)
        dp_dalpha = b * (b * (p - s_hat) - (plogp - s_hat * entropy_term))
        d_p = torch.matmul(grad_out[:, :, i0:i1].to(dt), vf.transpose(-1, -2))
        total = total + (d_p * dp_dalpha).sum()
    return total
