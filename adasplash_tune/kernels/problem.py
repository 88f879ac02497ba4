"""Problem keys: the small, hashable description of a call that configs are cached under.

The same functions build the key when tuning and at call time, so a tuned entry is found again.
Sizes are bucketed (next power of two) so that nearby shapes share an entry.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

__all__ = [
    "alpha_class", "integer_b", "pow2_bucket", "attention_key", "entmax_key", "key_to_json", "key_from_json",
    "DTYPE_NAMES",
]

DTYPE_NAMES = ("float32", "float16", "bfloat16")


#: alpha = 1 + 1/b for these integer b: the kernels raise to the power b by multiplication.
_INTEGER_B_CLASSES = {1: "2", 2: "1.5", 3: "4/3", 4: "1.25"}


def integer_b(alpha: float) -> int:
    """b = 1 / (alpha - 1) when it is an integer in 1..4 (alpha = 2, 1.5, 4/3, 1.25), else 0.

    Those alphas need no exp2/log2: powers u^b, u^(b-1), u^(b-2) are products. ``4/3`` as a float
    is accepted (b = 3 up to rounding)."""
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        return 0
    b = 1.0 / (alpha - 1.0)
    r = round(b)
    return r if r in _INTEGER_B_CLASSES and abs(b - r) <= 1e-9 * r else 0


def alpha_class(alpha: float) -> str:
    """The alpha's code path: '2', '1.5', '4/3' and '1.25' (alpha = 1 + 1/b, integer b: powers
    by products) each have their own; every other alpha is 'generic' (exp2/log2)."""
    b = integer_b(alpha)
    return _INTEGER_B_CLASSES[b] if b else "generic"


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
