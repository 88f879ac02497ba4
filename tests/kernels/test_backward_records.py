"""The dQ kernel's per-row records for dK/dV: ``[c r, tau r, delta, 0]`` with ``r = inv_l^(alpha-1)``.

Checked field by field against float64 torch on the kernel's own tau and 1/sum (so this tests the
records, not the threshold), for every alpha class (b = 1, 2, 3, 4 and the generic path), causal
rows and rows past a varlen length (no support: zeros). Under the Triton interpreter on CPU (float32 inputs,
the dQ kernel's exact float32 products), on the GPU when there is one."""

from __future__ import annotations

import math

import pytest
import torch

from adasplash_tune.kernels.attention import backward as bw
from adasplash_tune.kernels.attention import op
from adasplash_tune.kernels.attention.common import Geometry
from adasplash_tune.kernels.attention.forward import sparse_forward
from adasplash_tune.kernels.attention.mask import tile_lists
from adasplash_tune.kernels.attention.tau import solve_tau, tau_scratch_size
from adasplash_tune.kernels.declarations.attention import TRITON

CONFIG = dict(tau_block_m=16, tau_block_n=16, tau_sweep_block_n=16, mask_m=16, mask_n=16, fwd_block_m=16,
              fwd_block_n=16, bwd_block_m=16, bwd_block_n=32, bwd_q_block_m=32, bwd_q_block_n=16, niter=12,
              tau_tol=0.0, fwd_mode="staged")


def _records(alpha: float, causal: bool, lengths: list[int] | None, seed: int, device: str):
    gen = torch.Generator().manual_seed(seed)
    b_, h, n, d = (len(lengths) if lengths else 1), 2, 40, 16
    q, k, v, grad = (torch.randn(b_, h, n, d, generator=gen).to(device) for _ in range(4))
    varlen = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    cfg = TRITON.default().replace(**CONFIG)
    scale = 1.0 / math.sqrt(d)
    geo = Geometry.of(q, k)
    mask = op._new_mask(geo, cfg, q.device)
    scratch = torch.empty(tau_scratch_size(geo, cfg), dtype=torch.int32, device=device)
    tau = solve_tau(q, k, varlen, alpha, scale, causal, cfg, mask, scratch)
    tile = (cfg["mask_m"], cfg["mask_n"])
    lists = tile_lists(mask, geo, varlen, causal, tile, (cfg["fwd_block_m"], cfg["fwd_block_n"]), transposed=False)
    _, inv_l, _ = sparse_forward(q, k, v, tau, lists, varlen, alpha, scale, causal, cfg, need_stats=True)
    lq = tile_lists(mask, geo, varlen, causal, tile, (cfg["bwd_q_block_m"], cfg["bwd_q_block_n"]), transposed=False)
    with op.poison_outputs():  # every field must be written
        _, rows = bw.sparse_backward_q(q, k, v, grad, tau, inv_l, lq, varlen, alpha, scale, causal, cfg)
    return q, k, v, grad, varlen, scale, tau, inv_l, rows.view(b_, h, n, 4)


@pytest.mark.parametrize("alpha", [2.0, 1.5, 4 / 3, 1.25, 1.7])
@pytest.mark.parametrize("causal,lengths", [(True, None), (False, [40, 23])])
def test_records_hold_the_scaled_threshold_and_delta(alpha, causal, lengths, triton_device):
    q, k, v, grad, varlen, scale, tau, inv_l, rows = _records(alpha, causal, lengths, 3, triton_device)
    q, k, v, grad, tau, inv_l, rows = (t.cpu() for t in (q, k, v, grad, tau, inv_l, rows))
    assert not torch.isnan(rows).any()
    b_, h, n, _ = rows.shape
    c = (alpha - 1.0) * scale
    tau, inv_l = tau.double().view(b_, h, n), inv_l.double().view(b_, h, n)
    r = torch.where(inv_l > 0, inv_l.clamp(min=1e-300) ** (alpha - 1.0), torch.zeros_like(inv_l))
    # delta = sum_j s_ij dP_ij / sum_j s_ij with s = p^(2-alpha), p = [z - tau]_+^b / l
    z = c * q.double() @ k.double().transpose(-1, -2)
    valid = torch.ones(n, n, dtype=torch.bool)
    if causal:
        valid = torch.tril(valid)
    valid = valid.expand(b_, h, n, n).clone()
    if varlen is not None:
        for i, length in enumerate(varlen.tolist()):
            valid[i, :, :, length:] = False
            valid[i, :, length:, :] = False
    u = torch.where(valid, (z - tau[..., None]).clamp(min=0), torch.zeros_like(z))
    s = (u ** (1.0 / (alpha - 1.0)) * inv_l[..., None]) ** (2.0 - alpha)
    s = torch.where(u > 0, s, torch.zeros_like(s))
    dp = grad.double() @ v.double().transpose(-1, -2)
    den = s.sum(-1)
    delta = torch.where(den > 0, (s * dp).sum(-1) / den.clamp(min=1e-300), torch.zeros_like(den))
    torch.testing.assert_close(rows[..., 0].double(), c * r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rows[..., 1].double(), tau * r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[..., 2].double(), delta, rtol=1e-4, atol=1e-4)
    assert torch.all(rows[..., 3] == 0)
    if varlen is not None:  # rows past a length have no support: a = 0 for every key
        for i, length in enumerate(varlen.tolist()):
            assert torch.all(rows[i, :, length:, :2] == 0)
