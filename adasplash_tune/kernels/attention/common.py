"""Pieces shared by the AdaSplash Triton stages: problem geometry, output allocation (with a
poison switch for tests) and the dot precision.

Units: scores are ``z = (alpha - 1) * scale * q.k``; a row's threshold ``tau`` is in z units and
``u = [z - tau]_+``. Unnormalised probabilities are ``u^b`` with ``b = 1 / (alpha - 1)``; the
backward weight is ``s = u^(b - 1)`` (``p^(2 - alpha)`` up to the row's normalisation). The powers
live in kernels/powers.py, specialised on ``B_INT`` (kernels/problem.py ``integer_b``).

Layout: every kernel takes contiguous (B, H, N, D) tensors, with the head dim as a compile-time
constant, so row offsets are ``((b * H + h) * N + n) * D`` and their alignment is known.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import triton
import triton.language as tl

__all__ = ["BIG", "Geometry", "dot_precision", "alloc", "poison_outputs"]

#: Threshold of a row with no valid key: every score minus BIG clamps to zero (finite, so that
#: differences of thresholds stay finite).
BIG = tl.constexpr(1.0e30)

_POISON: list[bool] = [False]


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Test hook: while active, kernel outputs are allocated filled with NaN, so an element a
    kernel fails to write shows up as NaN."""
    previous = _POISON[0]
    _POISON[0] = True
    try:
        yield
    finally:
        _POISON[0] = previous


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer every element of which a kernel writes (NaN-filled under poison_outputs)."""
    if _POISON[0] and dtype.is_floating_point:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use exact float32 products (tf32 would miss the 1e-4 forward gate)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class Geometry:
    """Shape facts of one attention call: q (B, Hq, N, D), k/v (B, Hkv, N, D)."""

    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def block_d(self) -> int:
        """Head dim padded to a power of two (at least 16); the padding is masked in the kernels."""
        return max(16, triton.next_power_of_2(self.head_dim))

    @property
    def even_d(self) -> bool:
        return self.block_d == self.head_dim

    def even_n(self, *tiles: int) -> bool:
        """Whether the sequence splits into whole tiles of every size in ``tiles`` (no key tile reaches
        past N: the kernels' EVEN_N drops the loads' bounds)."""
        return all(self.seq_len % tile == 0 for tile in tiles)

    @property
    def rows(self) -> int:
        return self.batch * self.q_heads

    @staticmethod
    def of(q: torch.Tensor, k: torch.Tensor) -> "Geometry":
        batch, hq, n, d = q.shape
        return Geometry(batch, hq, k.shape[1], n, d)
