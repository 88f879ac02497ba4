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

import functools

import torch
import triton
import triton.language as tl

from ..launch import Launch
from .common import Geometry

__all__ = ["tile_lists", "tile_list_pair", "list_size", "list_layout", "TileLists"]

_CHUNK = 128  # candidate tiles handled per step of a list program


@triton.jit
def _list_body(
    MASK, LIST, COUNT, LENS,
    TM, TN, n_own, n_cand, seq_len, H, own_block, cand_block, own, bh,
    R_OWN: tl.constexpr, R_CAND: tl.constexpr, CHUNK: tl.constexpr,
    TRANSPOSED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr,
):
    """The list of one (own tile, head row): its active candidate tiles, leading group first."""
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


@triton.jit
def _list_kernel(
    MASK, LIST, COUNT, LENS,
    TM, TN, n_own, n_cand, seq_len, H, own_block, cand_block,
    R_OWN: tl.constexpr, R_CAND: tl.constexpr, CHUNK: tl.constexpr,
    TRANSPOSED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr,
):
    _list_body(MASK, LIST, COUNT, LENS, TM, TN, n_own, n_cand, seq_len, H, own_block, cand_block,
               tl.program_id(0), tl.program_id(1), R_OWN, R_CAND, CHUNK, TRANSPOSED, IS_CAUSAL, HAS_VARLEN)


@triton.jit
def _list_pair_kernel(
    MASK, LIST_Q, COUNT_Q, LIST_K, COUNT_K, LENS,
    TM, TN, seq_len, H, n_own_q, n_cand_q, own_block_q, cand_block_q, n_own_k, n_cand_k, own_block_k, cand_block_k,
    R_OWN_Q: tl.constexpr, R_CAND_Q: tl.constexpr, CHUNK_Q: tl.constexpr,
    R_OWN_K: tl.constexpr, R_CAND_K: tl.constexpr, CHUNK_K: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_VARLEN: tl.constexpr,
):
    """The backward's two tilings in one launch: grid axis 2 picks the query-major lists (0) or
    the key-major ones (1); axis 0 covers the larger of the two own-tile counts."""
    own = tl.program_id(0)
    bh = tl.program_id(1)
    if tl.program_id(2) == 0:
        if own < n_own_q:
            _list_body(MASK, LIST_Q, COUNT_Q, LENS, TM, TN, n_own_q, n_cand_q, seq_len, H, own_block_q, cand_block_q,
                       own, bh, R_OWN_Q, R_CAND_Q, CHUNK_Q, False, IS_CAUSAL, HAS_VARLEN)
    else:
        if own < n_own_k:
            _list_body(MASK, LIST_K, COUNT_K, LENS, TM, TN, n_own_k, n_cand_k, seq_len, H, own_block_k, cand_block_k,
                       own, bh, R_OWN_K, R_CAND_K, CHUNK_K, True, IS_CAUSAL, HAS_VARLEN)


class TileLists:
    """Index lists of one compute tiling: ``index`` (B*Hq, n_own, n_cand) int32 and ``count``
    (B*Hq, n_own, 2) int32 = (entries, entries of the leading group)."""

    __slots__ = ("index", "count", "n_own", "n_cand")

    def __init__(self, index: torch.Tensor, count: torch.Tensor, n_own: int, n_cand: int) -> None:
        self.index, self.count, self.n_own, self.n_cand = index, count, n_own, n_cand


@functools.lru_cache(maxsize=1024)
def list_size(geo: Geometry, block: tuple[int, int], *, transposed: bool) -> int:
    """int32 entries of one compute tiling's lists: the index lists, then the per-tile counts."""
    n_q, n_k = triton.cdiv(geo.seq_len, block[0]), triton.cdiv(geo.seq_len, block[1])
    return list_layout(geo.rows, n_k, n_q)[1] if transposed else list_layout(geo.rows, n_q, n_k)[1]


@functools.lru_cache(maxsize=512)
def list_launch(geo: Geometry, is_causal: bool, has_varlen: bool, mask_tile: tuple[int, int],
                block: tuple[int, int], transposed: bool) -> Launch:
    """The list kernel's launch for one compute tiling (scalars: tm, tn, n_own, n_cand, ...):
    planned once per problem and tiling."""
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
    scalars = (tm, tn, n_own, n_cand, geo.seq_len, geo.q_heads, own_block, cand_block)
    meta = dict(R_OWN=r_own, R_CAND=r_cand, CHUNK=min(_CHUNK, triton.next_power_of_2(n_cand)),
                TRANSPOSED=transposed, IS_CAUSAL=is_causal, HAS_VARLEN=has_varlen, num_warps=4)
    return Launch(_list_kernel, (n_own, geo.rows), scalars, meta)


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
    ``buffer``: an int32 tensor of at least :func:`list_size` entries to hold the lists (one
    allocation when None).
    """
    run = list_launch(geo, is_causal, varlen is not None, mask_tile, block, transposed)
    if buffer is None:
        buffer = torch.empty(list_size(geo, block, transposed=transposed), dtype=torch.int32, device=mask.device)
    lists = _lists_in(buffer, geo.rows, run.scalars[2], run.scalars[3])  # scalars: tm, tn, n_own, n_cand, ...
    run(mask, lists.index, lists.count, varlen if varlen is not None else lists.count)
    return lists


def list_layout(rows: int, n_own: int, n_cand: int) -> tuple[int, int]:
    """(int32 entries of the index lists, entries in all) of one tiling's lists in a buffer: the
    index lists, then the per-tile counts."""
    index = rows * n_own * n_cand
    return index, index + rows * n_own * 2


def _lists_in(buffer: torch.Tensor, rows: int, n_own: int, n_cand: int) -> TileLists:
    """One tiling's lists as views of ``buffer`` (at least its :func:`list_size` entries), laid
    out as :func:`list_layout` says."""
    size, end = list_layout(rows, n_own, n_cand)
    return TileLists(buffer[:size].view(rows, n_own, n_cand), buffer[size:end].view(rows, n_own, 2), n_own, n_cand)


@functools.lru_cache(maxsize=512)
def list_pair_launch(geo: Geometry, is_causal: bool, has_varlen: bool, mask_tile: tuple[int, int],
                     q_block: tuple[int, int], kv_block: tuple[int, int]) -> Launch:
    """The launch of both backward tilings' lists at once (query-major for ``q_block``, key-major
    for ``kv_block``), planned once per problem and tilings."""
    q = list_launch(geo, is_causal, has_varlen, mask_tile, q_block, False)
    kv = list_launch(geo, is_causal, has_varlen, mask_tile, kv_block, True)
    sq, sk = q.scalars, kv.scalars  # tm, tn, n_own, n_cand, seq_len, H, own_block, cand_block
    scalars = (sq[0], sq[1], geo.seq_len, geo.q_heads, sq[2], sq[3], sq[6], sq[7], sk[2], sk[3], sk[6], sk[7])
    meta = dict(R_OWN_Q=q.meta["R_OWN"], R_CAND_Q=q.meta["R_CAND"], CHUNK_Q=q.meta["CHUNK"],
                R_OWN_K=kv.meta["R_OWN"], R_CAND_K=kv.meta["R_CAND"], CHUNK_K=kv.meta["CHUNK"],
                IS_CAUSAL=is_causal, HAS_VARLEN=has_varlen, num_warps=4)
    return Launch(_list_pair_kernel, (max(sq[2], sk[2]), geo.rows, 2), scalars, meta)


def tile_list_pair(
    mask: torch.Tensor,
    geo: Geometry,
    varlen: torch.Tensor | None,
    is_causal: bool,
    mask_tile: tuple[int, int],
    q_block: tuple[int, int],
    kv_block: tuple[int, int],
    buffer: torch.Tensor | None = None,
) -> tuple[TileLists, TileLists]:
    """Both tilings of the split backward in one launch: (query-major lists for ``q_block``,
    key-major lists for ``kv_block``), the same lists :func:`tile_lists` builds one at a time.
    ``buffer``: int32 with at least the two :func:`list_size` entries, the query-major ones first."""
    run = list_pair_launch(geo, is_causal, varlen is not None, mask_tile, q_block, kv_block)
    q_size = list_size(geo, q_block, transposed=False)
    if buffer is None:
        buffer = torch.empty(q_size + list_size(geo, kv_block, transposed=True), dtype=torch.int32,
                             device=mask.device)
    s = run.scalars  # TM, TN, seq_len, H, then per tiling: n_own, n_cand, own_block, cand_block
    lq = _lists_in(buffer[:q_size], geo.rows, s[4], s[5])
    lk = _lists_in(buffer[q_size:], geo.rows, s[8], s[9])
    run(mask, lq.index, lq.count, lk.index, lk.count, varlen if varlen is not None else lq.count)
    return lq, lk
