"""The short paths of warm eager calls: a planned forward or backward that only allocates and
launches.

A call whose problem and config ran before repeats exactly the launches it ran then, into buffers
of the same sizes. Its plan holds those launches and the byte layout of one workspace for the
buffers the caller never sees (tile lists, and without residuals tau and the block mask), so a
warm call makes one workspace allocation plus its outputs, and passes raw device addresses to the
compiled kernels (``Launch.direct``: no tensor views, no ``data_ptr`` calls in the launcher).

The workspace keeps the general path's layout (the same offsets within each list buffer, every
buffer 256-byte aligned), so the pointers have the 16-byte-alignment pattern the general path's
first launch recorded. A plan covers the common case only -- CUDA, one launch per forward
(``fwd_mode="fused"``, no row chunks), the split backward without the alpha gradient, varlen as
int32 lengths on the device -- and falls back (returns None, having launched nothing, or only
work into its own workspace, which is dropped) whenever a launch is not ready; the caller then
takes the general path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..launch import Launch
from ..spec import Config
from .backward import backward_launch
from .common import _POISON, Geometry
from .mask import list_launch, list_layout, list_pair_launch
from .tau import tau_launch

__all__ = ["FusedForward", "plan_fused_forward", "fused_forward", "SplitBackward", "plan_split_backward",
           "split_backward"]

_ALIGN = 256


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class FusedForward(NamedTuple):
    """A one-launch forward: the tau kernel with its fused forward. Without residuals the block
    mask, tau and the sweep lists share the workspace (mask at 0, then tau, then the lists);
    with them the stats and the mask are tensors of their own (the backward keeps them) and the
    workspace holds the lists only."""

    run: Launch
    residuals: bool
    need_o2: bool
    mask_shape: tuple[int, int, int]
    stats_shape: tuple[int, int, int]
    tau_at: int  # byte offsets in the workspace
    lists_at: int
    size: int  # workspace bytes


def plan_fused_forward(geo: Geometry, cfg: Config, alpha: float, scale: float, is_causal: bool, has_varlen: bool,
                       dtype: torch.dtype, mask_shape: tuple[int, int, int], scratch: int,
                       residuals: bool) -> FusedForward:
    """The plan of a fused forward without row chunks; ``scratch``: int32 entries of its lists."""
    need_o2 = residuals and cfg["bwd_mode"] == "fused"
    run = tau_launch(geo, cfg, alpha, scale, is_causal, has_varlen, dtype, False, True, residuals, need_o2)
    rows_n = geo.rows * geo.seq_len
    tau_at = 0 if residuals else _aligned(mask_shape[0] * mask_shape[1] * mask_shape[2])
    lists_at = 0 if residuals else tau_at + _aligned(4 * rows_n)
    return FusedForward(run, residuals, need_o2, mask_shape, (2, geo.rows, geo.seq_len), tau_at, lists_at,
                        lists_at + 4 * scratch)


def fused_forward(plan: FusedForward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  varlen: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """(out, residuals as the general path returns them), or None, having launched nothing, when
    the short path does not apply to these tensors (poisoned outputs under test, no compiled
    kernel recorded for their alignment on this device). Strided inputs (q, k, v as views of one
    packed projection, as models make them) are copied to contiguous ones, as the general path
    does. ``varlen``: int32 lengths on q's device, when the plan has them."""
    if _POISON[0] or not plan.run.ready():
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    ws = q.new_empty((plan.size,), dtype=torch.uint8)
    o, w = out.data_ptr(), ws.data_ptr()
    if plan.residuals:
        stats = q.new_empty(plan.stats_shape, dtype=torch.float32)
        mask = q.new_empty(plan.mask_shape, dtype=torch.int8)
        o2 = torch.empty_like(q) if plan.need_o2 else None
        tau = stats.data_ptr()
        inv_l = tau + 4 * plan.stats_shape[1] * plan.stats_shape[2]
        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), tau, o, inv_l, o if o2 is None else o2.data_ptr(),
                    mask.data_ptr(), w + plan.lists_at, tau if varlen is None else varlen.data_ptr(), tau)
    else:
        tau = w + plan.tau_at
        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), tau, o, tau, o, w, w + plan.lists_at,
                    tau if varlen is None else varlen.data_ptr(), tau)
    if not plan.run.direct(*pointers):
        return None
    if not plan.residuals:
        return out, []
    return out, [stats, mask] + ([o2] if o2 is not None else [])


class SplitBackward(NamedTuple):
    """The split backward: the tile lists (both tilings in one launch with dK/dV, the dQ tiling
    alone without), the dQ kernel (which also writes the rows' records for dK/dV: delta and the
    scaled threshold, kernels/attention/backward.py), the dK/dV kernel. The workspace holds the
    lists as the general path lays them out, then the records (16 bytes a row)."""

    lists: Launch
    dq: Launch
    dkv: Launch | None
    list_at: tuple[int, ...]  # byte offsets: dQ index, dQ counts (, dK/dV index, dK/dV counts)
    rows_at: int
    size: int
    rows_n: int


def plan_split_backward(geo: Geometry, cfg: Config, alpha: float, scale: float, is_causal: bool, has_varlen: bool,
                        dtype: torch.dtype, need_kv: bool) -> SplitBackward:
    mask_tile = (cfg["mask_m"], cfg["mask_n"])
    q_tile, kv_tile = (cfg["bwd_q_block_m"], cfg["bwd_q_block_n"]), (cfg["bwd_block_m"], cfg["bwd_block_n"])
    dq = backward_launch("q", geo, cfg, alpha, scale, is_causal, has_varlen, dtype, False)
    dkv = backward_launch("kv", geo, cfg, alpha, scale, is_causal, has_varlen, dtype, False) if need_kv else None
    run = q_lists = list_launch(geo, is_causal, has_varlen, mask_tile, q_tile, False)
    index, end = list_layout(geo.rows, q_lists.scalars[2], q_lists.scalars[3])  # scalars: tm, tn, n_own, n_cand
    offsets = [0, 4 * index]
    end *= 4
    if need_kv:  # the key-major lists follow the query-major ones, as tile_list_pair lays them out
        run = list_pair_launch(geo, is_causal, has_varlen, mask_tile, q_tile, kv_tile)
        index_k, size_k = list_layout(geo.rows, run.scalars[8], run.scalars[9])
        offsets += [end, end + 4 * index_k]
        end += 4 * size_k
    rows_n = geo.rows * geo.seq_len
    rows_at = _aligned(end)
    return SplitBackward(run, dq, dkv, tuple(offsets), rows_at, rows_at + 16 * rows_n, rows_n)


def split_backward(plan: SplitBackward, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, stats: torch.Tensor, mask: torch.Tensor, varlen: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """(dq, dk, dv) (dk, dv None without dK/dV), or None when the short path does not apply: then
    nothing was launched, or only work into this call's own workspace, which is dropped. Strided
    tensors are copied to contiguous ones first, as in :func:`fused_forward`; the gradients are
    contiguous. ``varlen``: int32 lengths on q's device, when the plan has them."""
    launches = (plan.lists, plan.dq) if plan.dkv is None else (plan.lists, plan.dq, plan.dkv)
    if _POISON[0] or not all(run.ready() for run in launches):
        return None
    grad_out, q, k, v = grad_out.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    ws = q.new_empty((plan.size,), dtype=torch.uint8)
    dq = torch.empty_like(q)
    w, m = ws.data_ptr(), mask.data_ptr()
    at = plan.list_at
    q_index, q_count = w + at[0], w + at[1]
    lens = None if varlen is None else varlen.data_ptr()
    if plan.dkv is None:
        listed = plan.lists.direct(m, q_index, q_count, q_count if lens is None else lens)
    else:
        listed = plan.lists.direct(m, q_index, q_count, w + at[2], w + at[3], q_count if lens is None else lens)
    if not listed:
        return None
    qp, kp, vp, gp = q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr()
    tau = stats.data_ptr()
    inv_l, rows = tau + 4 * plan.rows_n, w + plan.rows_at
    lens = tau if lens is None else lens
    if not plan.dq.direct(qp, kp, vp, gp, tau, inv_l, rows, dq.data_ptr(), rows, q_index, q_count, lens):
        return None
    if plan.dkv is None:
        return dq, None, None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if not plan.dkv.direct(qp, kp, vp, gp, rows, dk.data_ptr(), dv.data_ptr(), w + at[2], w + at[3], lens):
        return None
    return dq, dk, dv
