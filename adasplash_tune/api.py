"""The public functions: ``adasplash``, ``entmax`` and ``select`` (see INTERFACE.md).

Data flows one way: inputs are validated -> a problem key is built -> a config is selected
(explicit, or memo -> caches -> nearest -> default; never timed; :mod:`.selection`) -> the backend
runs it (:mod:`.ops` eagerly, :mod:`.compiled` while torch.compile traces).

The eager hot path: a call's raw signature (shapes, dtypes, devices, scalar types and values,
backend, config) maps to what a validated call with that signature runs (backend, scale, Config).
The first call validates and selects; a repeated signature re-checks only the scalars and the
varlen values (see :func:`.ops.check_varlen_values`) and goes straight to the backend.
Under ``torch.compile`` the inputs are validated while tracing and the custom ops select when the
graph runs.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor

from . import compiled, ops
from .cache.samples import ENV_SAMPLES
from .kernels.problem import alpha_class
from .kernels.spec import Config
from .selection import DTYPE_NAMES, Selection, attention_selection, entmax_selection, explicit_config, with_niter
from .selection import clear_memo as _clear_selection_memo

__all__ = ["adasplash", "entmax", "select", "Selection", "clear_memo"]

log = logging.getLogger("adasplash_tune")

_BACKEND_CHOICES = (None, "auto", "triton", "torch")
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MAX_NITER = 100


# --------------------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    """A value's type as a message names it: ``int``, but ``numpy.bool`` (whose bare name is ``bool``)."""
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _check_tensor(name: str, t: Any) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:
        layout = "nested" if t.is_nested else str(t.layout)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {layout} tensor")
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported dtypes are float32, float16 and bfloat16"
        )
    return t


def _check_alpha(alpha: Any) -> float:
    """alpha as a float in (1, 2]; a tensor alpha is read (``.item()``: a device sync on GPU)."""
    if isinstance(alpha, Tensor):
        _check_alpha_shape(alpha)
        if alpha.is_meta:
            raise ValueError("alpha is a meta tensor: its value cannot be read; pass a float or a real tensor")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):  # numpy scalars too
        raise TypeError(f"alpha must be a float in (1, 2], got {_type_name(alpha)}")
    alpha = float(alpha)
    if not (1.0 < alpha <= 2.0):
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    return alpha


def _check_alpha_shape(alpha: Tensor) -> None:
    if alpha.numel() != 1:
        raise ValueError(f"alpha must be a scalar, got a tensor of shape {tuple(alpha.shape)}")


def _check_niter(niter: Any) -> int | None:
    if niter is None:
        return None
    if isinstance(niter, bool) or not isinstance(niter, int):
        raise TypeError(f"niter must be an int or None, got {_type_name(niter)}")
    if not 1 <= niter <= MAX_NITER:
        raise ValueError(f"niter must be in 1..{MAX_NITER}, got {niter}")
    return niter


_TRITON_IMPORTABLE: list[bool] = []


def _triton_importable() -> bool:
    if not _TRITON_IMPORTABLE:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # automatic choice: fall back, with a log line
            log.warning("triton unavailable (%s); using the torch backend", exc)
            _TRITON_IMPORTABLE.append(False)
        else:
            _TRITON_IMPORTABLE.append(True)
    return _TRITON_IMPORTABLE[0]


def _resolve_backend(backend: Any, device: torch.device) -> str:
    if backend not in _BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    if backend is None or backend == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA (or ROCm) tensors; on CPU tensors it runs only under "
            "TRITON_INTERPRET=1. Use backend='torch' for CPU."
        )
    return backend


def _check_scale(scale: Any) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {_type_name(scale)}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def _check_config_option(config: Any, backend: Any) -> None:
    """An attention config given ahead of the calls (a module's or an integration's option): validated
    in full when ``backend`` names one, else its type only (the calls' device picks the backend)."""
    if config is None:
        return
    if backend in ("triton", "torch"):
        explicit_config("adasplash", backend, config)
    elif not isinstance(config, (Config, Mapping)):
        raise TypeError(f"config must be a mapping or a Config, got {type(config).__name__}")


def _check_attention_tensors(q, k, v, is_causal, varlen) -> None:
    """Everything about q, k, v, is_causal and varlen that does not read tensor data."""
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
    if min(batch, hq, hkv, n) < 1:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}, k and v {tuple(k.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {dim}")


def _check_flags(is_causal, varlen, batch: int, device: torch.device) -> None:
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {_type_name(is_causal)}")
    if varlen is not None:
        if not isinstance(varlen, Tensor):
            raise TypeError(f"varlen must be an integer tensor of shape (B,), got {type(varlen).__name__}")
        if varlen.dtype.is_floating_point or varlen.dtype.is_complex or varlen.dtype == torch.bool:
            raise TypeError(f"varlen must be an integer tensor, got dtype {varlen.dtype}")
        if varlen.shape != (batch,):
            raise ValueError(f"varlen must have shape ({batch},), got {tuple(varlen.shape)}")
        if varlen.device != device:
            raise ValueError(f"varlen is on {varlen.device} but q is on {device}")


def _check_attention_inputs(q, k, v, alpha, is_causal, varlen, niter, scale):
    """Validate a call (ValueError/TypeError naming the problem); returns the checked scalars."""
    _check_attention_tensors(q, k, v, is_causal, varlen)
    alpha = _check_alpha(alpha)
    _check_flags(is_causal, varlen, q.shape[0], q.device)
    return q, k, v, alpha, varlen, _check_niter(niter), _check_scale(scale)


# --------------------------------------------------------------------------- eager hot path

# raw call signature -> (backend, scale, Config as run): see the module docstring.
_CALLS: dict[tuple, tuple[str, float, Config]] = {}
_MAX_CALLS = 4096  # a long-running process meeting ever new shapes forgets and starts again

_alpha_class = functools.lru_cache(maxsize=1024)(alpha_class)


def _config_key(config: Any) -> Any:
    """A hashable stand-in for an explicit config (the Config itself, or a mapping's typed items:
    ``True`` and ``1`` are equal keys but not equally valid values)."""
    if config is None or isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        items = tuple((name, value.__class__, value) for name, value in config.items())
        try:
            hash(items)
        except TypeError:
            return _UNHASHABLE
        return items
    return _UNHASHABLE


_UNHASHABLE = object()


def _alpha_arg(alpha: Any) -> tuple[float | None, Tensor | None]:
    """(alpha as a float, the tensor when alpha is one that needs a gradient); (None, None) for a
    bad alpha, which the full validation then reports (in its order of checks)."""
    if type(alpha) is float and 1.0 < alpha <= 2.0:
        return alpha, None
    try:
        value = _check_alpha(alpha)
    except (TypeError, ValueError):
        return None, None
    return value, (alpha if _needs_grad(alpha) else None)


def _needs_grad(alpha: Any) -> bool:
    """Whether ``alpha`` is a tensor this call must differentiate."""
    return isinstance(alpha, Tensor) and alpha.requires_grad and torch.is_grad_enabled()


def _remember(memo: dict, key: tuple | None, call: tuple) -> None:
    if key is None:
        return
    if len(memo) >= _MAX_CALLS:
        memo.clear()
    memo[key] = call


def adasplash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor = 1.5,
    is_causal: bool = False,
    varlen: Tensor | None = None,
    niter: int | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    config: Mapping[str, Any] | Config | None = None,
) -> Tensor:
    """alpha-entmax attention (AdaSplash). q: (B, Hq, N, D); k, v: (B, Hkv, N, D), Hq % Hkv == 0.

    Returns a tensor of q's shape and dtype. Differentiable w.r.t. q, k and v, and w.r.t. alpha
    when it is a 0-d tensor that requires grad. See INTERFACE.md.
    """
    if torch.compiler.is_compiling():
        return _traced_adasplash(q, k, v, alpha, is_causal, varlen, niter, scale, backend, config)
    a, alpha_tensor = _alpha_arg(alpha)
    try:
        key = None if a is None else _attention_signature(q, k, v, a, is_causal, varlen, niter, scale, backend, config)
        call = _CALLS.get(key) if key is not None else None
    except (TypeError, RuntimeError):  # an unhashable argument, a tensor without sizes: validated below
        key = call = None
    if call is None:
        call = _attention_call(q, k, v, alpha, is_causal, varlen, niter, scale, backend, config)
        _remember(_CALLS, key, call)
    backend, scale, cfg = call
    return ops.attention(q, k, v, a, alpha_tensor, is_causal, varlen, scale, backend, cfg, niter)


def _attention_signature(q, k, v, alpha: float, is_causal, varlen, niter, scale, backend, config) -> tuple | None:
    """The memo key of a call: every fact its validation and selection depend on (None: not memoisable)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return None
    config_key = _config_key(config)
    if config_key is _UNHASHABLE:
        return None
    if varlen is None:
        lengths = None
    elif isinstance(varlen, Tensor):
        lengths = (varlen.dtype, varlen.shape, varlen.device)
    else:
        return None
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            q.layout, k.layout, v.layout, _alpha_class(alpha),
            is_causal.__class__, is_causal, lengths, niter.__class__, niter, scale.__class__, scale, backend,
            config_key)


def _attention_call(q, k, v, alpha, is_causal, varlen, niter, scale, backend, config):
    """Validate a new signature and select its config: (backend, scale, Config as run)."""
    q, k, v, alpha, varlen, niter, scale = _check_attention_inputs(q, k, v, alpha, is_causal, varlen, niter, scale)
    backend = _resolve_backend(backend, q.device)
    sel = attention_selection(q, k, alpha, is_causal, varlen is not None, backend, config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if sel.source != "explicit" and os.environ.get(ENV_SAMPLES):
        _record_sample(sel, q, k, v, varlen, alpha, is_causal, scale)
    return backend, scale, with_niter(sel._config, niter)


def _record_sample(sel: Selection, q, k, v, varlen, alpha: float, is_causal: bool, scale: float) -> None:
    """Opt-in (ADASPLASH_TUNE_RECORD and ADASPLASH_TUNE_RECORD_SAMPLES): save this new problem's inputs."""
    from .cache.loader import ENV_RECORD
    from .cache.samples import record_attention_sample
    from .device import fingerprint

    record_attention_sample(os.environ.get(ENV_RECORD), os.environ[ENV_SAMPLES], sel.key,
                            fingerprint(q.device).device_id, q, k, v, varlen, alpha, is_causal, scale)


def _traced_adasplash(q, k, v, alpha, is_causal, varlen, niter, scale, backend, config) -> Tensor:
    """The call as torch.compile traces it: checks on metadata now, a tensor alpha's value when the
    graph runs; the custom op selects the config then (or validates the explicit one)."""
    if isinstance(alpha, Tensor):
        _check_attention_tensors(q, k, v, is_causal, varlen)
        _check_alpha_shape(alpha)
        _check_flags(is_causal, varlen, q.shape[0], q.device)
        niter, scale = _check_niter(niter), _check_scale(scale)
    else:
        q, k, v, alpha, varlen, niter, scale = _check_attention_inputs(q, k, v, alpha, is_causal, varlen, niter,
                                                                       scale)
    backend = _resolve_backend(backend, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    cfg_json = compiled.explicit_config_json("adasplash", backend, config)
    return compiled.traced_attention(q, k, v, alpha, is_causal, varlen, scale, backend, cfg_json, niter)


def _check_entmax_inputs(x, alpha, dim, niter):
    x = _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {_type_name(dim)}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of rank {x.dim()}")
    return x, _check_alpha(alpha), dim % x.dim(), _check_niter(niter)


def _refuse_entmax_alpha_grad(alpha: Any) -> None:
    """entmax has no alpha gradient: detaching one silently would train nothing."""
    if _needs_grad(alpha):
        raise ValueError("entmax has no gradient w.r.t. alpha: pass a float or a tensor that does not "
                         "require grad (alpha.detach()); adasplash does differentiate a 0-d alpha tensor")


def _entmax_alpha(alpha: Any) -> float | None:
    """entmax's alpha as a float; None for a bad alpha or one that needs a gradient (the full
    validation then reports it)."""
    if type(alpha) is float and 1.0 < alpha <= 2.0:
        return alpha
    if _needs_grad(alpha):
        return None
    try:
        return _check_alpha(alpha)
    except (TypeError, ValueError):
        return None


# raw call signature -> (backend, dim >= 0, Config as run)
_ENTMAX_CALLS: dict[tuple, tuple[str, int, Config]] = {}


def entmax(
    x: Tensor,
    alpha: float = 1.5,
    dim: int = -1,
    niter: int | None = None,
    *,
    backend: str | None = None,
    config: Mapping[str, Any] | Config | None = None,
) -> Tensor:
    """alpha-entmax of ``x`` along ``dim`` (alpha in (1, 2]); differentiable w.r.t. ``x``."""
    if torch.compiler.is_compiling():
        x, alpha, dim, niter = _check_entmax_inputs(x, alpha, dim, niter)
        backend = _resolve_backend(backend, x.device)
        cfg_json = compiled.explicit_config_json("entmax", backend, config)
        return _entmax_rows(x, dim, lambda rows: compiled.traced_entmax(rows, alpha, backend, cfg_json, niter))
    a = _entmax_alpha(alpha)
    key = call = None
    if a is not None and isinstance(x, Tensor):
        config_key = _config_key(config)
        if config_key is not _UNHASHABLE:
            try:
                key = (x.shape, x.dtype, x.device, x.layout, _alpha_class(a), dim.__class__, dim, niter.__class__,
                       niter, backend, config_key)
                call = _ENTMAX_CALLS.get(key)
            except (TypeError, RuntimeError):  # an unhashable argument, a tensor without sizes: validated below
                key = call = None
    if call is None:
        x, a, dim, niter = _check_entmax_inputs(x, alpha, dim, niter)
        _refuse_entmax_alpha_grad(alpha)
        backend = _resolve_backend(backend, x.device)
        sel = entmax_selection(x, a, dim, backend, config)
        call = (backend, dim, with_niter(sel._config, niter))
        _remember(_ENTMAX_CALLS, key, call)
    backend, dim, cfg = call
    if dim == 1 and x.dim() == 2 and x.numel():
        return ops.entmax(x, a, backend, cfg)
    return _entmax_rows(x, dim, lambda rows: ops.entmax(rows, a, backend, cfg))


def _entmax_rows(x: Tensor, dim: int, run) -> Tensor:
    """``run`` on x's rows along ``dim`` viewed as a 2-D (rows, cols) tensor, shaped back like x."""
    if x.numel() == 0:  # nothing to compute; a clone stays in x's autograd graph, as softmax's result does
        return x.clone()
    moved = x if dim == x.dim() - 1 else x.movedim(dim, -1)
    rows = moved if moved.dim() == 2 else moved.reshape(-1, moved.shape[-1])
    out = run(rows)
    if out.shape != moved.shape:
        out = out.reshape(moved.shape)
    return out if moved is x else out.movedim(-1, dim)


# --------------------------------------------------------------------------- select


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
    if varlen is not None:
        ops.check_varlen_values(varlen, q.shape[2])
    backend = _resolve_backend(backend, q.device)
    return _as_run(attention_selection(q, k, alpha, is_causal, varlen is not None, backend, config), niter)


def _select_entmax(x, alpha=1.5, dim=-1, niter=None, *, backend=None, config=None) -> Selection:
    x, value, dim, niter = _check_entmax_inputs(x, alpha, dim, niter)
    _refuse_entmax_alpha_grad(alpha)  # as the call does: select explains no call that fails
    alpha = value
    backend = _resolve_backend(backend, x.device)
    return _as_run(entmax_selection(x, alpha, dim, backend, config), niter)


# A wrong argument list names the public function ("select() missing 2 required positional
# arguments: 'k' and 'v'"), not these private ones.
_select_adasplash.__qualname__ = _select_entmax.__qualname__ = "select"


def _as_run(sel: Selection, niter: int | None) -> Selection:
    """The selection as the call runs it: an explicit ``niter`` replaces the config's."""
    cfg = with_niter(sel._config, niter)
    return sel if cfg is sel._config else replace(sel, config=cfg.as_dict(), _config=cfg)


def clear_memo() -> None:
    """Forget memoised calls and selections (after the cache changed, or in tests)."""
    _CALLS.clear()
    _ENTMAX_CALLS.clear()
    _clear_selection_memo()


