"""Blockwise AdaSplash attention in PyTorch ops: runs on any device, memory O(q_chunk x N) per head.

Layout. Grouped-query attention is handled without repeating k/v: a query chunk of shape
(B, Hq, qc, D) is viewed as (B, Hkv, G * qc, D) (G = Hq / Hkv; head h uses kv head h // G), so
one batched matmul against k (B, Hkv, N, D) gives the score strip (B, Hkv, G * qc, Nk).

Forward, per query chunk: the strip z = (alpha - 1) * scale * q k^T is built once (masked keys
-inf; only the keys any row of the chunk may see: causal and varlen shorten it), shifted by its
row max m, then tau comes from the safeguarded Halley solver whose power sums are accumulated
over key chunks of the strip. The output is sum_j p_j v_j / sum_j p_j over the same key chunks
(the renormalisation absorbs what the finite iteration count leaves of sum p - 1).

Backward recomputes the strip per query chunk from the saved row statistics (m, tau, S = sum p)
and uses the entmax Jacobian with s = p^(2 - alpha) = U / S^(2 - alpha),
U = [z - tau]_+^((2 - alpha)/(alpha - 1)):  dX = s * (dP - delta), delta = sum(U dP) / sum(U),
dq = scale * dX k, dk = scale * dX^T q, dv = P^T dO.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
from torch.autograd.function import once_differentiable

from ..spec import Config
from .tau import entmax_probs, halley_bisect, power_sums

__all__ = ["adasplash_torch", "adasplash_torch_forward", "adasplash_torch_backward"]

log = logging.getLogger("adasplash_tune")


# --------------------------------------------------------------------------- helpers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key_end(i1: int, n: int, is_causal: bool, max_len: int | None) -> int:
    """Number of leading keys any query row < i1 may see."""
    end = min(n, i1) if is_causal else n
    return end if max_len is None else min(end, max_len)


def _valid_mask(
    i0: int, i1: int, kend: int, is_causal: bool, lengths: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Bool mask (B or 1, 1, 1, qc, kend) of the (query, key) pairs that take part; None = all."""
    if not is_causal and lengths is None:
        return None
    rows = torch.arange(i0, i1, device=device).view(-1, 1)
    cols = torch.arange(kend, device=device).view(1, -1)
    valid = cols <= rows if is_causal else torch.ones(i1 - i0, kend, dtype=torch.bool, device=device)
    if lengths is not None:
        lens = lengths.view(-1, 1, 1)
        valid = valid & (cols < lens) & (rows < lens)
    else:
        valid = valid.unsqueeze(0)
    return valid[:, None, None]


def _strip(
    qz: torch.Tensor,
    k: torch.Tensor,
    kend: int,
    group: int,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Masked scores qz k[:kend]^T of one query chunk: (B, Hkv, G * qc, kend), masked = -inf."""
    z = torch.matmul(qz, k[:, :, :kend].transpose(-1, -2))
    if valid is not None:
        b, hkv, rows, _ = z.shape
        z.view(b, hkv, group, rows // group, kend).masked_fill_(~valid, -math.inf)
    return z


def _chunks(kend: int, k_chunk: int) -> list[tuple[int, int]]:
    return [(j, min(j + k_chunk, kend)) for j in range(0, kend, k_chunk)]


def _grad_weight(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """U = u^((2 - alpha)/(alpha - 1)) on the support (u > 0), 0 elsewhere."""
    if alpha == 1.5:
        return u
    if alpha == 2.0:
        return (u > 0).to(u.dtype)
    return u.pow((2.0 - alpha) / (alpha - 1.0))


def _row_chunk(t: torch.Tensor, i0: int, i1: int, hkv: int) -> torch.Tensor:
    """Rows i0:i1 of a (B, Hq, N, ...) tensor as (B, Hkv, G * qc, ...)."""
    b, hq = t.shape[:2]
    part = t.unflatten(1, (hkv, hq // hkv))[:, :, :, i0:i1]
    return part.reshape(b, hkv, -1, *t.shape[3:])


def _store_rows(dst: torch.Tensor, i0: int, i1: int, src: torch.Tensor) -> None:
    """Write a (B, Hkv, G * qc, ...) chunk into rows i0:i1 of a (B, Hq, N, ...) tensor."""
    b, hq = dst.shape[:2]
    hkv = src.shape[1]
    view = dst.unflatten(1, (hkv, hq // hkv))[:, :, :, i0:i1]
    view.copy_(src.reshape(view.shape))


class _Plan:
    """What the forward and backward sweeps share: sizes, chunking and masking facts."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        alpha: float,
        is_causal: bool,
        varlen: torch.Tensor | None,
        scale: float,
        q_chunk: int,
        k_chunk: int,
    ) -> None:
        self.batch, self.hq, self.n, self.dim = q.shape
        self.hkv = k.shape[1]
        self.group = self.hq // self.hkv
        self.alpha, self.is_causal, self.scale = alpha, is_causal, scale
        self.q_chunk, self.k_chunk = int(q_chunk), int(k_chunk)
        self.dtype = _compute_dtype(q.dtype)
        self.device = q.device
        if varlen is None:
            self.lengths, self.max_len = None, None
        else:
            self.lengths = varlen.to(device=q.device, dtype=torch.long).clamp(0, self.n)
            self.max_len = int(self.lengths.max().item()) if self.batch else 0

    def query_chunks(self) -> list[tuple[int, int, int]]:
        """(i0, i1, kend) for each query chunk with at least one valid (query, key) pair."""
        out = []
        last = self.n if self.max_len is None else self.max_len
        for i0 in range(0, last, self.q_chunk):
            i1 = min(i0 + self.q_chunk, self.n)
            kend = _key_end(i1, self.n, self.is_causal, self.max_len)
            if kend > 0:
                out.append((i0, i1, kend))
        return out

    def scores(self, q: torch.Tensor, k: torch.Tensor, i0: int, i1: int, kend: int):
        """(q chunk in compute dtype, masked strip, valid mask) for query rows i0:i1."""
        qc = _row_chunk(q, i0, i1, self.hkv).to(self.dtype)
        valid = _valid_mask(i0, i1, kend, self.is_causal, self.lengths, self.device)
        z = _strip(qc * ((self.alpha - 1.0) * self.scale), k, kend, self.group, valid)
        return qc, z, valid

    def counts(self, valid: torch.Tensor | None, rows: int, kend: int) -> torch.Tensor:
        """Valid keys per row, (B or 1, Hkv or 1, G * qc, 1), at least 1 (empty rows give p = 0)."""
        if valid is None:
            return torch.full((1, 1, 1, 1), float(kend), dtype=self.dtype, device=self.device)
        cnt = valid.sum(-1, keepdim=True).to(self.dtype)  # (B|1, 1, 1, qc, 1)
        cnt = cnt.expand(cnt.shape[0], self.hkv, self.group, rows // self.group, 1)
        return cnt.reshape(cnt.shape[0], self.hkv, rows, 1).clamp(min=1.0)


# --------------------------------------------------------------------------- forward / backward


def _forward(
    plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output (B, Hq, N, D) in the compute dtype and row statistics m, tau, S (B, Hq, N, 1)."""
    dt, alpha = plan.dtype, plan.alpha
    out = torch.zeros(plan.batch, plan.hq, plan.n, plan.dim, dtype=dt, device=plan.device)
    stats = torch.zeros(3, plan.batch, plan.hq, plan.n, 1, dtype=dt, device=plan.device)
    for i0, i1, kend in plan.query_chunks():
        _, z, valid = plan.scores(q, k, i0, i1, kend)
        rows = z.shape[2]
        m = z.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty rows stay all -inf
        z.sub_(m)
        chunks = _chunks(kend, plan.k_chunk)

        def sums(tau: torch.Tensor):
            s0 = s1 = s2 = None
            for j0, j1 in chunks:
                a, b, c = power_sums(z[..., j0:j1], tau, alpha)
                s0, s1, s2 = (a, b, c) if s0 is None else (s0 + a, s1 + b, s2 + c)
            return s0, s1, s2

        count = plan.counts(valid, rows, kend)
        tau = halley_bisect(sums, torch.zeros_like(m), count, alpha, niter)
        acc = torch.zeros(z.shape[0], z.shape[1], rows, plan.dim, dtype=dt, device=plan.device)
        total = torch.zeros_like(m)
        for j0, j1 in chunks:
            p = entmax_probs(z[..., j0:j1], tau, alpha)
            total += p.sum(-1, keepdim=True)
            acc += torch.matmul(p, v[:, :, j0:j1])
        acc /= torch.where(total > 0, total, torch.ones_like(total))
        _store_rows(out, i0, i1, acc)
        for slot, stat in enumerate((m, tau, total)):
            _store_rows(stats[slot], i0, i1, stat)
    return out, stats[0], stats[1], stats[2]


def _backward(
    plan: _Plan,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    m_all: torch.Tensor,
    tau_all: torch.Tensor,
    total_all: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (B, Hq, N, D), dk, dv (B, Hkv, N, D) in the compute dtype."""
    dt, alpha = plan.dtype, plan.alpha
    dq = torch.zeros(plan.batch, plan.hq, plan.n, plan.dim, dtype=dt, device=plan.device)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for i0, i1, kend in plan.query_chunks():
        qc, z, _ = plan.scores(q, k, i0, i1, kend)
        m = _row_chunk(m_all, i0, i1, plan.hkv)
        tau = _row_chunk(tau_all, i0, i1, plan.hkv)
        total = _row_chunk(total_all, i0, i1, plan.hkv)
        z.sub_(m)
        do = _row_chunk(grad_out, i0, i1, plan.hkv).to(dt)
        dp = torch.matmul(do, v[:, :, :kend].transpose(-1, -2))
        chunks = _chunks(kend, plan.k_chunk)

        sum_u = torch.zeros_like(tau)
        sum_udp = torch.zeros_like(tau)
        for j0, j1 in chunks:
            weight = _grad_weight((z[..., j0:j1] - tau).clamp(min=0.0), alpha)
            sum_u += weight.sum(-1, keepdim=True)
            sum_udp += (weight * dp[..., j0:j1]).sum(-1, keepdim=True)
        delta = sum_udp / torch.where(sum_u > 0, sum_u, torch.ones_like(sum_u))
        inv_total = 1.0 / torch.where(total > 0, total, torch.ones_like(total))
        s_factor = inv_total.pow(2.0 - alpha)

        dqc = torch.zeros_like(qc)
        for j0, j1 in chunks:
            zc = z[..., j0:j1]
            weight = _grad_weight((zc - tau).clamp(min=0.0), alpha)
            dx = weight * (dp[..., j0:j1] - delta) * s_factor
            probs = entmax_probs(zc, tau, alpha) * inv_total
            dqc += torch.matmul(dx, k[:, :, j0:j1])
            dk[:, :, j0:j1] += torch.matmul(dx.transpose(-1, -2), qc)
            dv[:, :, j0:j1] += torch.matmul(probs.transpose(-1, -2), do)
        _store_rows(dq, i0, i1, dqc.mul_(plan.scale))
    dk.mul_(plan.scale)
    return dq, dk, dv


class _AdaSplashTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, niter: int):  # type: ignore[override]
        kc, vc = (t.to(plan.dtype).contiguous() for t in (k, v))
        out, m, tau, total = _forward(plan, q, kc, vc, niter)
        ctx.plan = plan
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.save_for_backward(q, k, v, m, tau, total)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, m, tau, total = ctx.saved_tensors
        plan: _Plan = ctx.plan
        kc, vc = (t.to(plan.dtype).contiguous() for t in (k, v))
        dq, dk, dv = _backward(plan, grad_out, q, kc, vc, m, tau, total)
        dtq, dtk, dtv = ctx.in_dtypes
        return dq.to(dtq), dk.to(dtk), dv.to(dtv), None, None


# --------------------------------------------------------------------------- entry point


def _knob(config: Config | Mapping[str, Any], name: str) -> int:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"torch backend config field {name!r} must be a positive int, got {value!r}")
    return value


def adasplash_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    is_causal: bool,
    varlen: torch.Tensor | None,
    scale: float,
    config: Config | Mapping[str, Any],
) -> torch.Tensor:
    """alpha-entmax attention, blockwise: q (B, Hq, N, D), k/v (B, Hkv, N, D), Hq % Hkv == 0.

    Inputs are assumed validated (``api.adasplash`` does it). ``config`` supplies ``q_chunk``,
    ``k_chunk`` and ``niter``. Computes in float32 (float64 for float64 inputs) and returns q's
    dtype; differentiable w.r.t. q, k and v.
    """
    plan, niter = _plan_for(q, k, alpha, is_causal, varlen, scale, config)
    log.debug("adasplash torch: q %s k %s alpha=%s causal=%s varlen=%s q_chunk=%d k_chunk=%d niter=%d",
              tuple(q.shape), tuple(k.shape), alpha, is_causal, varlen is not None, plan.q_chunk,
              plan.k_chunk, niter)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _AdaSplashTorch.apply(q, k, v, plan, niter)
    kc, vc = (t.to(plan.dtype).contiguous() for t in (k, v))
    return _forward(plan, q, kc, vc, niter)[0].to(q.dtype)


def _plan_for(q, k, alpha, is_causal, varlen, scale, config) -> tuple[_Plan, int]:
    plan = _Plan(q, k, float(alpha), bool(is_causal), varlen, float(scale),
                 _knob(config, "q_chunk"), _knob(config, "k_chunk"))
    return plan, _knob(config, "niter")


def adasplash_torch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    is_causal: bool,
    varlen: torch.Tensor | None,
    scale: float,
    config: Config | Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward without autograd: (output in q's dtype, row statistics (3, B, Hq, N, 1) = m, tau, S
    in the compute dtype) -- the statistics are what :func:`adasplash_torch_backward` needs."""
    plan, niter = _plan_for(q, k, alpha, is_causal, varlen, scale, config)
    kc, vc = (t.to(plan.dtype).contiguous() for t in (k, v))
    out, m, tau, total = _forward(plan, q, kc, vc, niter)
    return out.to(q.dtype), torch.stack((m, tau, total))


def adasplash_torch_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stats: torch.Tensor,
    alpha: float,
    is_causal: bool,
    varlen: torch.Tensor | None,
    scale: float,
    config: Config | Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v from the statistics of :func:`adasplash_torch_forward`."""
    plan, _ = _plan_for(q, k, alpha, is_causal, varlen, scale, config)
    kc, vc = (t.to(plan.dtype).contiguous() for t in (k, v))
    dq, dk, dv = _backward(plan, grad_out, q, kc, vc, stats[0], stats[1], stats[2])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
