"""Problem keys: the small, hashable description of a call that configs are cached under.

The same functions build the key when tuning and at call time, so a tuned entry is found again.
Sizes are bucketed (next power of two) so that nearby shapes share an entry.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

__all__ = [
    "alpha_class", "pow2_bucket", "attention_key", "entmax_key", "key_to_json", "key_from_json",
    "DTYPE_NAMES",
]

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def alpha_class(alpha: float) -> str:
    """'1.5' and '2' have their own specialised code paths; every other alpha is 'generic'."""
    if alpha == 1.5:
        return "1.5"
    if alpha == 2.0:
        return "2"
    return "generic"


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum, 1)
    return 1 << math.ceil(math.log2(n))


def attention_key(
    *,
    backend: str,
    dtype: str,
    batch: int,
    q_heads: int,
    kv_heads: int,
    seq_len: int,
    head_dim: int,
    alpha: float,
    causal: bool,
    varlen: bool,
) -> dict[str, Any]:
    """Cache key of an adasplash call."""
    return {
        "backend": backend,
        "dtype": dtype,
        "head_dim": int(head_dim),
        "causal": bool(causal),
        "alpha": alpha_class(alpha),
        "gqa": int(q_heads // max(kv_heads, 1)),
        "varlen": bool(varlen),
        "seq": pow2_bucket(seq_len, 16),
        "bh": pow2_bucket(batch * q_heads),
    }


def entmax_key(*, backend: str, dtype: str, rows: int, cols: int, alpha: float) -> dict[str, Any]:
    """Cache key of an entmax call (``rows`` independent rows of length ``cols``)."""
    return {
        "backend": backend,
        "dtype": dtype,
        "alpha": alpha_class(alpha),
        "cols": pow2_bucket(cols, 16),
        "rows": pow2_bucket(rows),
    }


def key_to_json(key: Mapping[str, Any]) -> str:
    """Canonical text form of a key (sorted, compact): what the cache stores and indexes."""
    return json.dumps(dict(key), sort_keys=True, separators=(",", ":"))


def key_from_json(text: str) -> dict[str, Any]:
    return json.loads(text)
