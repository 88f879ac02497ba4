"""The public functions: ``adasplash``, ``entmax`` and ``select`` (see INTERFACE.md).

Data flows one way: inputs are validated -> a problem key is built -> a config is selected
(explicit, or memo -> caches -> nearest -> default; never timed) -> the backend runs it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from .kernels.problem import attention_key, entmax_key
from .kernels.registry import get_spec
from .kernels.spec import Config, ConfigError

__all__ = ["adasplash", "entmax", "select", "Selection"]

log = logging.getLogger("adasplash_tune")

_FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_BACKEND_CHOICES = (None, "auto", "triton", "torch")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_NITER = 100


@dataclass(frozen=True)
class Selection:
    """Which launch config a call uses, under which problem key, and where it came from."""

    kernel: str
    backend: str
    config: dict[str, Any]
    key: dict[str, Any]
    source: str  # "explicit" | "cache" | "shipped" | "nearest" | "default"
    _config: Config = field(repr=False, compare=False, default=None)  # type: ignore[assignment]


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported dtypes are float32, float16 and bfloat16"
        )
    return t


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a scalar, got a tensor of shape {tuple(alpha.shape)}")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float in (1, 2], got {type(alpha).__name__}")
    alpha = float(alpha)
    if not (1.0 < alpha <= 2.0):
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    return alpha


def _check_niter(niter: Any) -> int | None:
    if niter is None:
        return None
    if isinstance(niter, bool) or not isinstance(niter, int):
        raise TypeError(f"niter must be an int or None, got {type(niter).__name__}")
    if not 1 <= niter <= MAX_NITER:
        raise ValueError(f"niter must be in 1..{MAX_NITER}, got {niter}")
    return niter


def _resolve_backend(backend: Any, device: torch.device) -> str:
    if backend not in _BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    if backend in (None, "auto"):
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except Exception as exc:  # automatic choice: fall back, with a log line
                log.warning("triton unavailable (%s); using the torch backend", exc)
                return "torch"
            return "triton"
        return "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA (or ROCm) tensors; on CPU tensors it runs only under "
            "TRITON_INTERPRET=1. Use backend='torch' for CPU."
        )
    return backend


def _check_attention_inputs(q, k, v, alpha, is_causal, varlen, niter, scale):
    q, k, v = (_check_tensor(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, N, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, hq, n, dim = q.shape
    if k.shape[0] != batch or k.shape[2] != n or k.shape[3] != dim:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: "
            "expected (B, Hkv, N, D) with q's B, N and D"
        )
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if n < 1 or batch < 1 or hq < 1:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
    if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {dim}")
    alpha = _check_alpha(alpha)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if varlen is not None:
        if not isinstance(varlen, torch.Tensor):
            raise TypeError(f"varlen must be an integer tensor of shape (B,), got {type(varlen).__name__}")
        if varlen.dtype.is_floating_point or varlen.dtype.is_complex or varlen.dtype == torch.bool:
            raise TypeError(f"varlen must be an integer tensor, got dtype {varlen.dtype}")
        if varlen.shape != (batch,):
            raise ValueError(f"varlen must have shape ({batch},), got {tuple(varlen.shape)}")
        if varlen.device != q.device:
            raise ValueError(f"varlen is on {varlen.device} but q is on {q.device}")
    niter = _check_niter(niter)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        scale = float(scale)
    return q, k, v, alpha, varlen, niter, scale


def _explicit_config(kernel: str, backend: str, config: Any) -> Config:
    spec = get_spec(kernel, backend)
    if isinstance(config, Config):
        return spec.validate(config)
    if isinstance(config, Mapping):
        return spec.validate(config)
    raise TypeError(f"config must be a mapping or a Config, got {type(config).__name__}")


# --------------------------------------------------------------------------- selection

# Hot path: the call's raw signature -> Selection. After the first call for a signature,
# selection costs one tuple build and one dict lookup; the cache is never read again for it.
_MEMO: dict[tuple, Selection] = {}


def _select(kernel: str, backend: str, device: torch.device, key: dict[str, Any], config: Any,
            shape: dict[str, Any] | None = None) -> Selection:
    if config is not None:
        cfg = _explicit_config(kernel, backend, config)
        return Selection(kernel, backend, cfg.as_dict(), key, "explicit", cfg)
    from .cache.loader import resolve

    cfg, source = resolve(get_spec(kernel, backend), key, device, shape)
    return Selection(kernel, backend, cfg.as_dict(), key, source, cfg)


def _attention_selection(q, k, alpha, is_causal, varlen, backend, config) -> Selection:
    memo_key = None
    if config is None:
        memo_key = ("adasplash", backend, q.device, q.dtype, q.shape, k.shape[1], alpha, is_causal,
                    varlen is not None)
        hit = _MEMO.get(memo_key)
        if hit is not None:
            return hit
    batch, hq, n, dim = q.shape
    key = attention_key(
        backend=backend, dtype=_FLOAT_DTYPES[q.dtype], batch=batch, q_heads=hq, kv_heads=k.shape[1],
        seq_len=n, head_dim=dim, alpha=alpha, causal=is_causal, varlen=varlen is not None,
    )
    shape = {"batch": batch, "heads": hq, "kv_heads": k.shape[1], "seq_len": n, "head_dim": dim,
             "alpha": alpha, "causal": is_causal, "varlen": varlen is not None,
             "dtype": _FLOAT_DTYPES[q.dtype]}
    sel = _select("adasplash", backend, q.device, key, config, shape)
    if memo_key is not None:
        _MEMO[memo_key] = sel
    return sel


def _entmax_selection(x: torch.Tensor, alpha: float, dim: int, backend: str, config) -> Selection:
    memo_key = None
    if config is None:
        memo_key = ("entmax", backend, x.device, x.dtype, x.shape, dim, alpha)
        hit = _MEMO.get(memo_key)
        if hit is not None:
            return hit
    cols = x.shape[dim]
    rows = x.numel() // max(cols, 1)
    key = entmax_key(backend=backend, dtype=_FLOAT_DTYPES[x.dtype], rows=rows, cols=cols, alpha=alpha)
    shape = {"rows": rows, "cols": cols, "alpha": alpha, "dtype": _FLOAT_DTYPES[x.dtype]}
    sel = _select("entmax", backend, x.device, key, config, shape)
    if memo_key is not None:
        _MEMO[memo_key] = sel
    return sel


def clear_memo() -> None:
    """Forget memoised selections (after the cache changed, or in tests)."""
    _MEMO.clear()
    import sys

    loader = sys.modules.get("adasplash_tune.cache.loader")  # only if it was ever used
    if loader is not None:
        loader.clear_memo()


def _with_niter(cfg: Config, niter: int | None) -> Config:
    return cfg if niter is None or niter == cfg["niter"] else cfg.replace(niter=niter)


# --------------------------------------------------------------------------- public API


def adasplash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float = 1.5,
    is_causal: bool = False,
    varlen: torch.Tensor | None = None,
    niter: int | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    config: Mapping[str, Any] | Config | None = None,
) -> torch.Tensor:
    """alpha-entmax attention (AdaSplash). q: (B, Hq, N, D); k, v: (B, Hkv, N, D), Hq % Hkv == 0.

    Returns a tensor of q's shape and dtype. Differentiable w.r.t. q, k and v. See INTERFACE.md.
    """
    q, k, v, alpha, varlen, niter, scale = _check_attention_inputs(q, k, v, alpha, is_causal, varlen, niter, scale)
    backend = _resolve_backend(backend, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    from . import ops

    if torch.compiler.is_compiling():
        # Traced: the custom op selects at run time (same precedence chain, never timed).
        cfg_json = ops.explicit_config_json("adasplash", backend, config)
    else:
        cfg_json = ops.config_json(_attention_selection(q, k, alpha, is_causal, varlen, backend, config)._config)
    return ops.adasplash_op(q, k, v, alpha, is_causal, varlen, scale, backend, cfg_json, niter)


def _check_entmax_inputs(x, alpha, dim, niter):
    x = _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of rank {x.dim()}")
    return x, _check_alpha(alpha), dim % x.dim(), _check_niter(niter)


def entmax(
    x: torch.Tensor,
    alpha: float = 1.5,
    dim: int = -1,
    niter: int | None = None,
    *,
    backend: str | None = None,
    config: Mapping[str, Any] | Config | None = None,
) -> torch.Tensor:
    """alpha-entmax of ``x`` along ``dim`` (alpha in (1, 2]); differentiable."""
    x, alpha, dim, niter = _check_entmax_inputs(x, alpha, dim, niter)
    backend = _resolve_backend(backend, x.device)
    from . import ops

    if torch.compiler.is_compiling():
        # Traced: the custom op selects at run time (same precedence chain, never timed).
        cfg_json = ops.explicit_config_json("entmax", backend, config)
    else:
        cfg_json = ops.config_json(_entmax_selection(x, alpha, dim, backend, config)._config)
    if x.numel() == 0:
        return torch.empty_like(x)
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    out = ops.entmax_op(rows, alpha, backend, cfg_json, niter)
    return out.reshape(moved.shape).movedim(-1, dim)


def select(kernel: str, *args: Any, **kwargs: Any) -> Selection:
    """Explain which config ``kernel``'s call with these arguments would use (nothing is run).

    ``select("adasplash", q, k, v, alpha=1.5, is_causal=True)``, ``select("entmax", x, alpha=2)``.
    """
    if kernel == "adasplash":
        return _select_adasplash(*args, **kwargs)
    if kernel == "entmax":
        return _select_entmax(*args, **kwargs)
    raise ValueError(f"unknown kernel {kernel!r}; choose 'adasplash' or 'entmax'")


def _select_adasplash(q, k, v, alpha=1.5, is_causal=False, varlen=None, niter=None, *, scale=None,
                      backend=None, config=None) -> Selection:
    q, k, v, alpha, varlen, niter, scale = _check_attention_inputs(q, k, v, alpha, is_causal, varlen, niter, scale)
    backend = _resolve_backend(backend, q.device)
    return _with_niter_selection(_attention_selection(q, k, alpha, is_causal, varlen, backend, config), niter)


def _select_entmax(x, alpha=1.5, dim=-1, niter=None, *, backend=None, config=None) -> Selection:
    x, alpha, dim, niter = _check_entmax_inputs(x, alpha, dim, niter)
    backend = _resolve_backend(backend, x.device)
    return _with_niter_selection(_entmax_selection(x, alpha, dim, backend, config), niter)


def _with_niter_selection(sel: Selection, niter: int | None) -> Selection:
    """The selection as the call runs it: an explicit ``niter`` replaces the config's."""
    cfg = _with_niter(sel._config, niter)
    return sel if cfg is sel._config else replace(sel, config=cfg.as_dict(), _config=cfg)


