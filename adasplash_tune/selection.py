"""Call-time selection: which launch config a call runs, under which problem key, from where.

explicit config (validated) -> memo -> user cache -> shipped caches -> nearest -> declared default,
never timed. The caches are read by :func:`adasplash_tune.cache.loader.resolve`, imported on the
first miss only. Used by the public API (eager calls and ``select``) and by the custom ops (a
compiled graph selects when it runs, on the real tensors).

Inputs are assumed validated (``api.py`` does it): this module only builds keys and looks up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .kernels.problem import alpha_class, attention_key, entmax_key
from .kernels.registry import get_spec
from .kernels.spec import Config

__all__ = [
    "Selection", "DTYPE_NAMES", "explicit_config", "attention_selection", "entmax_selection",
    "with_niter", "selection_alpha", "clear_memo",
]

#: The dtypes the kernels take, by the names problem keys use.
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Selection:
    """Which launch config a call uses, under which problem key, and where it came from."""

    kernel: str
    backend: str
    config: dict[str, Any]
    key: dict[str, Any]
    source: str  # "explicit" | "cache" | "shipped" | "nearest" | "default"
    _config: Config = field(repr=False, compare=False, default=None)  # type: ignore[assignment]


def explicit_config(kernel: str, backend: str, config: Any) -> Config:
    """A user-given config (mapping or Config) validated against ``kernel`` on ``backend``."""
    if isinstance(config, (Config, Mapping)):
        return get_spec(kernel, backend).validate(config)
    raise TypeError(f"config must be a mapping or a Config, got {type(config).__name__}")


# Problem facts -> Selection. A signature is looked up in the caches once; afterwards selection
# costs one tuple build and one dict lookup.
_MEMO: dict[tuple, Selection] = {}


def _select(kernel: str, backend: str, device: torch.device, key: dict[str, Any], config: Any,
            shape: dict[str, Any]) -> Selection:
    if config is not None:
        cfg = explicit_config(kernel, backend, config)
        return Selection(kernel, backend, cfg.as_dict(), key, "explicit", cfg)
    from .cache.loader import resolve

    cfg, source = resolve(get_spec(kernel, backend), key, device, shape)
    return Selection(kernel, backend, cfg.as_dict(), key, source, cfg)


def attention_selection(q: torch.Tensor, k: torch.Tensor, alpha: float, is_causal: bool, has_varlen: bool,
                        backend: str, config: Any = None) -> Selection:
    """The selection of an adasplash call (q: (B, Hq, N, D), k: (B, Hkv, N, D))."""
    memo_key = None
    if config is None:
        memo_key = ("adasplash", backend, q.device, q.dtype, q.shape, k.shape[1], alpha, is_causal, has_varlen)
        hit = _MEMO.get(memo_key)
        if hit is not None:
            return hit
    batch, hq, n, dim = q.shape
    dtype = DTYPE_NAMES[q.dtype]
    key = attention_key(backend=backend, dtype=dtype, batch=batch, q_heads=hq, kv_heads=k.shape[1],
                        seq_len=n, head_dim=dim, alpha=alpha, causal=is_causal, varlen=has_varlen)
    shape = {"batch": batch, "heads": hq, "kv_heads": k.shape[1], "seq_len": n, "head_dim": dim,
             "alpha": alpha, "causal": is_causal, "varlen": has_varlen, "dtype": dtype}
    sel = _select("adasplash", backend, q.device, key, config, shape)
    if memo_key is not None:
        _MEMO[memo_key] = sel
    return sel


def entmax_selection(x: torch.Tensor, alpha: float, dim: int, backend: str, config: Any = None) -> Selection:
    """The selection of an entmax call along ``dim`` (non-negative) of ``x``."""
    memo_key = None
    if config is None:
        memo_key = ("entmax", backend, x.device, x.dtype, x.shape, dim, alpha)
        hit = _MEMO.get(memo_key)
        if hit is not None:
            return hit
    cols = x.shape[dim]
    rows = x.numel() // max(cols, 1)
    dtype = DTYPE_NAMES[x.dtype]
    key = entmax_key(backend=backend, dtype=dtype, rows=rows, cols=cols, alpha=alpha)
    shape = {"rows": rows, "cols": cols, "alpha": alpha, "dtype": dtype}
    sel = _select("entmax", backend, x.device, key, config, shape)
    if memo_key is not None:
        _MEMO[memo_key] = sel
    return sel


@functools.lru_cache(maxsize=1024)
def with_niter(config: Config, niter: int | None) -> Config:
    """``config`` as a call runs it: an explicit ``niter`` (not None, > 0) replaces the config's."""
    if not niter or niter == config["niter"]:
        return config
    return config.replace(niter=niter)


def selection_alpha(alpha: float) -> float:
    """The alpha a selection is keyed by. A learnable alpha changes at every step, so a generic alpha
    is rounded to 1e-2 (its problem key records only the class) to bound the memo."""
    if alpha_class(alpha) != "generic":
        return alpha
    rounded = round(alpha, 2)
    return rounded if alpha_class(rounded) == "generic" and 1.0 < rounded < 2.0 else alpha


def clear_memo() -> None:
    """Forget memoised selections, and the loader's (after the cache changed, or in tests)."""
    _MEMO.clear()
    with_niter.cache_clear()
    import sys

    for name in ("adasplash_tune.cache.loader", "adasplash_tune.cache.samples"):  # only if ever used
        module = sys.modules.get(name)
        if module is not None:
            module.clear_memo()
