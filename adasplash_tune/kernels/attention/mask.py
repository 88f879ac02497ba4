"""Stage 2: per-tile index lists from the block mask.

The mask is one head's (TM x TN) grid of (mask_m x mask_n) tiles. A compute stage visits tiles of
its own size (a multiple of the mask tile): a compute tile is active when any mask tile it covers
is. For each "own" tile (a query tile for the forward and dQ, a key tile for dK/dV) a program
writes the sorted indices of the active "candidate" tiles into a fixed-size row of the list buffer
and two counts: all entries, and the entries of the leading group. In query-major lists the
leading group is the tiles that need no causal / length masking; in key-major lists (transposed)
it is the query tiles that do need masking (they lie on the diagonal, or the key tile crosses the
valid length). Buffers and grids depend on shapes only, never on the mask's content.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import launch
from .common import Geometry

__all__ = ["tile_lists", "list_size", "TileLists"]

_CHUNK = 128  # candidate tiles handled per step of a list program


@triton.jit
def _list_kernel(
    MASK, LIST, COUNT, LENS,
    TM, TN, n_own, n_cand, seq_len, H, own_block, cand_block,
    R_OWN: tl.constexpr, R_CAND: tl.constexpr, CHUNK: tl.constexpr,
    TRANSPOSED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr,
):
    own = tl.program_id(0)
    bh = tl.program_id(1)
    if HAS_VARLEN:
        length = tl.minimum(tl.maximum(tl.load(LENS + bh // H).to(tl.int32), 0), seq_len)
    else:
        length = seq_len
    mask_base = MASK + bh.to(tl.int64) * TM * TN
    row = bh.to(tl.int64) * n_own + own
    list_base = LIST + row * n_cand
    o_idx = own * R_OWN + tl.arange(0, R_OWN)
    total = own * 0
    first = own * 0
    for c0 in range(0, n_cand, CHUNK):
        cand = c0 + tl.arange(0, CHUNK)
        c_idx = c0 * R_CAND + tl.arange(0, CHUNK * R_CAND)
        if TRANSPOSED:  # own: key tiles (mask columns), candidates: query tiles (mask rows)
            ptrs = mask_base + c_idx[None, :] * TN + o_idx[:, None]
            inb = (o_idx[:, None] < TN) & (c_idx[None, :] < TM)
        else:
            ptrs = mask_base + o_idx[:, None] * TN + c_idx[None, :]
            inb = (o_idx[:, None] < TM) & (c_idx[None, :] < TN)
        bits = tl.load(ptrs, mask=inb, other=0).to(tl.int32)
        hit = tl.max(bits, axis=0)
        hit = tl.max(tl.reshape(hit, (CHUNK, R_CAND)), axis=1)
        active = (hit > 0) & (cand < n_cand)
        pos = total + tl.cumsum(active.to(tl.int32), axis=0) - 1
        tl.store(list_base + pos, cand, mask=active)
        total += tl.sum(active.to(tl.int32), axis=0)
        if TRANSPOSED:
            # query tiles that need masking: the key tile crosses the length, or the diagonal
            lead = ((own + 1) * own_block > length) | (cand < 0)
            if IS_CAUSAL:
                lead = lead | (cand * cand_block < (own + 1) * own_block - 1)
        else:
            # key tiles that need no masking: inside the length and left of the diagonal
            lead = (cand + 1) * cand_block <= length
            if IS_CAUSAL:
                lead = lead & ((cand + 1) * cand_block - 1 <= own * own_block)
        first += tl.sum((active & lead).to(tl.int32), axis=0)
    tl.store(COUNT + row * 2, total)
    tl.store(COUNT + row * 2 + 1, first)


class TileLists:
    """Index lists of one compute tiling: ``index`` (B*Hq, n_own, n_cand) int32 and ``count``
    (B*Hq, n_own, 2) int32 = (entries, entries of the leading group)."""

    __slots__ = ("index", "count", "n_own", "n_cand")

    def __init__(self, index: torch.Tensor, count: torch.Tensor, n_own: int, n_cand: int) -> None:
        self.index, self.count, self.n_own, self.n_cand = index, count, n_own, n_cand


def list_size(geo: Geometry, block: tuple[int, int], *, transposed: bool) -> int:
    """int32 entries of the index lists of one compute tiling."""
    n_q, n_k = triton.cdiv(geo.seq_len, block[0]), triton.cdiv(geo.seq_len, block[1])
    return geo.rows * n_q * n_k


def tile_lists(
    mask: torch.Tensor,
    geo: Geometry,
    varlen: torch.Tensor | None,
    is_causal: bool,
    mask_tile: tuple[int, int],
    block: tuple[int, int],
    *,
    transposed: bool,
    buffer: torch.Tensor | None = None,
) -> TileLists:
    """Lists for compute tiles of ``block`` = (query rows, keys) over a mask of ``mask_tile``.

    ``transposed=False``: per query tile, its active key tiles (leading group: unmasked tiles).
    ``transposed=True``: per key tile, its active query tiles (leading group: masked tiles).
    ``buffer``: an int32 tensor of at least :func:`list_size` entries to hold the lists.
    """
    mm, mn = mask_tile
    bm, bn = block
    if bm % mm or bn % mn:
        raise ValueError(f"compute tile {block} is not a multiple of the mask tile {mask_tile}")
    tm, tn = triton.cdiv(geo.seq_len, mm), triton.cdiv(geo.seq_len, mn)
    n_q, n_k = triton.cdiv(geo.seq_len, bm), triton.cdiv(geo.seq_len, bn)
    if transposed:
        n_own, n_cand, r_own, r_cand, own_block, cand_block = n_k, n_q, bn // mn, bm // mm, bn, bm
    else:
        n_own, n_cand, r_own, r_cand, own_block, cand_block = n_q, n_k, bm // mm, bn // mn, bm, bn
    size = geo.rows * n_own * n_cand
    if buffer is None:
        index = torch.empty((geo.rows, n_own, n_cand), dtype=torch.int32, device=mask.device)
    else:  # a caller's int32 buffer of at least list_size() entries
        index = buffer[:size].view(geo.rows, n_own, n_cand)
    count = torch.empty((geo.rows, n_own, 2), dtype=torch.int32, device=mask.device)
    chunk = min(_CHUNK, triton.next_power_of_2(n_cand))
    lens = varlen if varlen is not None else count
    launch(_list_kernel, (n_own, geo.rows),
        mask, index, count, lens, tm, tn, n_own, n_cand, geo.seq_len, geo.q_heads, own_block, cand_block,
        R_OWN=r_own, R_CAND=r_cand, CHUNK=chunk, TRANSPOSED=transposed, IS_CAUSAL=is_causal,
        HAS_VARLEN=varlen is not None, num_warps=4,
    )
    return TileLists(index, count, n_own, n_cand)
