"""PyTorch custom ops around the backends, so ``torch.compile`` sees opaque, differentiable ops.

Registered under the ``adasplash_tune`` namespace (``torch.ops.adasplash_tune.<name>``) with fake
(meta) implementations and autograd formulas; the schemas take plain arguments only:

* ``attention_forward(q, k, v, varlen?, alpha, is_causal, scale, niter, backend, config)
  -> [out, *residuals]`` -- ``alpha`` is a 0-d tensor (a learnable alpha gets a gradient),
  ``config`` the launch config as JSON (:func:`config_json`) or ``""``;
* ``attention_backward(grad_out, q, k, v, varlen?, out, residuals, ...) -> (dq, dk, dv)``;
* ``attention_alpha_backward(grad_out, q, k, v, varlen?, alpha, ...) -> dalpha``;
* ``entmax_forward(x, alpha, niter, backend, config) -> y`` and
  ``entmax_backward(y, grad, alpha, niter, backend, config) -> dx`` (x: 2-D rows).

``config == ""`` means "select at run time": the op's implementation asks the same call-time
selection as the eager API (memo -> caches -> nearest -> default; never timed), on the real
tensors. That is how a compiled graph selects: nothing about selection is traced. ``niter > 0``
overrides the config's iteration count.

A backend plugs in through a forward/backward pair (:class:`AttentionPair`): the torch backend
and the Triton attention (``kernels/attention/op.py``'s ``adasplash_triton_forward``,
``adasplash_triton_backward`` and ``adasplash_triton_residuals``; see :func:`attention_pair`).
"""

# no `from __future__ import annotations`: torch.library reads the op signatures' real types
import functools
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .kernels.problem import alpha_class
from .kernels.registry import config_from_json
from .kernels.spec import Config, ConfigError

__all__ = [
    "AttentionPair", "attention_pair", "has_attention_op", "config_json",
    "explicit_config_json", "adasplash_op", "entmax_op",
]

log = logging.getLogger("adasplash_tune")

_NS = "adasplash_tune"


# --------------------------------------------------------------------------- config transport


@functools.lru_cache(maxsize=1024)
@functools.lru_cache(maxsize=1024)
def config_json(config: Config) -> str:
    """The JSON form a custom op receives for ``config`` (memoised: configs are hashable)."""
    return config.to_json()


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> Config:
    """The validated Config of a JSON text (ConfigError naming the bad field otherwise)."""
    return config_from_json(text)


def _parse_or_none(text: str) -> Optional[Config]:
    try:
        return _parse(text) if text else None
    except ValueError:  # reported when the op runs
        return None


def _constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (about 1 s of
    a process's first call): that decorator only sets the mark below, which dynamo reads when it
    traces (tests/test_ops.py checks the mark is still the one torch sets)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    return _mark_constant(fn)


def _mark_constant(fn: Callable) -> Callable:
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_constant_result
def explicit_config_json(kernel: str, backend: str, config: Any) -> str:
    """A user-given config as the op's JSON ("" for None), evaluated once at trace time.

    Not validated here: the op validates it when it runs, so a bad field raises ConfigError
    from the compiled call itself rather than a compiler error.
    """
    if config is None:
        return ""
    if isinstance(config, Config):
        kernel, backend, config = config.kernel, config.backend, config.as_dict()
    values = dict(config) if isinstance(config, Mapping) else config
    return json.dumps({"kernel": kernel, "backend": backend, "config": values}, sort_keys=True, default=repr)


def _given(text: str, kernel: str, backend: str) -> Config:
    cfg = _parse(text)
    if (cfg.kernel, cfg.backend) != (kernel, backend):
        raise ConfigError(f"config is for {cfg.kernel} ({cfg.backend}), not {kernel} ({backend})")
    return cfg


def _niter(config: Config, niter: int) -> Config:
    return config if niter <= 0 or niter == config["niter"] else config.replace(niter=niter)


def _selection_alpha(alpha: float) -> float:
    """The alpha the run-time selection is keyed by: a learnable alpha changes at every step, so a
    generic alpha is rounded to 1e-2 (its problem key only records the class) to bound the memo."""
    if alpha_class(alpha) != "generic":
        return alpha
    rounded = round(alpha, 2)
    return rounded if alpha_class(rounded) == "generic" and 1.0 < rounded < 2.0 else alpha


def _attention_config(q: Tensor, k: Tensor, varlen: Optional[Tensor], alpha: float, is_causal: bool,
                      niter: int, backend: str, config: str) -> Config:
    if config:
        cfg = _given(config, "adasplash", backend)
    else:
        from .api import _attention_selection

        cfg = _attention_selection(q, k, _selection_alpha(alpha), is_causal, varlen, backend, None)._config
    return _niter(cfg, niter)


def _entmax_config(x: Tensor, alpha: float, niter: int, backend: str, config: str) -> Config:
    if config:
        cfg = _given(config, "entmax", backend)
    else:
        from .api import _entmax_selection

        cfg = _entmax_selection(x, alpha, x.dim() - 1, backend, None)._config
    return _niter(cfg, niter)


# --------------------------------------------------------------------------- backend pairs


@dataclass(frozen=True)
class AttentionPair:
    """How one backend plugs into the attention op.

    ``forward(q, k, v, alpha, is_causal, varlen, scale, config) -> (out, residuals)``;
    ``backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale, config)
    -> (dq, dk, dv)``; ``residuals(q, k, v, config) -> [(shape, dtype), ...]`` describes the
    residual tensors for the fake (meta) implementation (``config`` may be None there: the
    shapes must then not depend on it).
    """

    forward: Callable[..., tuple[Tensor, Sequence[Tensor]]]
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    residuals: Callable[..., list[tuple[tuple[int, ...], torch.dtype]]]


def _torch_forward(q, k, v, alpha, is_causal, varlen, scale, config):
    from .kernels.torch_backend.attention import adasplash_torch_forward

    out, stats = adasplash_torch_forward(q, k, v, alpha, is_causal, varlen, scale, config)
    return out, [stats]


def _torch_backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale, config):
    from .kernels.torch_backend.attention import adasplash_torch_backward

    return adasplash_torch_backward(grad_out, q, k, v, residuals[0], alpha, is_causal, varlen, scale, config)


def _torch_residuals(q, k, v, config):
    return [((3, *q.shape[:3], 1), torch.float32)]


_TORCH_PAIR = AttentionPair(_torch_forward, _torch_backward, _torch_residuals)


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def attention_pair(backend: str) -> Optional[AttentionPair]:
    """The forward/backward pair of ``backend`` ("torch" or "triton"), None if it has none."""
    if backend == "torch":
        return _TORCH_PAIR
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; choose 'triton' or 'torch'")
    try:
        from .kernels.attention import op
    except ImportError as exc:
        log.debug("triton attention unavailable for the custom op (%s)", exc)
        return None
    names = ("adasplash_triton_forward", "adasplash_triton_backward", "adasplash_triton_residuals")
    if not all(hasattr(op, name) for name in names):
        return None
    return AttentionPair(*(getattr(op, name) for name in names))


@_constant_result
def has_attention_op(backend: str) -> bool:
    """Whether the attention custom op can run ``backend`` (the torch backend always can)."""
    return attention_pair(backend) is not None


def _pair(backend: str) -> AttentionPair:
    pair = attention_pair(backend)
    if pair is None:
        raise ValueError(
            f"the {backend} attention backend is unavailable here (triton could not be imported); "
            "use backend='torch'"
        )
    return pair


# --------------------------------------------------------------------------- attention op


@torch.library.custom_op(f"{_NS}::attention_forward", mutates_args=())
def _attention_forward(q: Tensor, k: Tensor, v: Tensor, varlen: Optional[Tensor], alpha: Tensor,
                       is_causal: bool, scale: float, niter: int, backend: str, config: str) -> list[Tensor]:
    a = float(alpha.item())
    cfg = _attention_config(q, k, varlen, a, is_causal, niter, backend, config)
    out, residuals = _pair(backend).forward(q, k, v, a, is_causal, varlen, scale, cfg)
    return [out.contiguous(), *(r.contiguous() for r in residuals)]


@_attention_forward.register_fake
def _(q, k, v, varlen, alpha, is_causal, scale, niter, backend, config):
    residuals = _pair(backend).residuals(q, k, v, _parse_or_none(config))
    return [q.new_empty(q.shape), *(q.new_empty(shape, dtype=dtype) for shape, dtype in residuals)]


@torch.library.custom_op(f"{_NS}::attention_backward", mutates_args=())
def _attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, varlen: Optional[Tensor],
                        out: Tensor, residuals: list[Tensor], alpha: Tensor, is_causal: bool, scale: float,
                        niter: int, backend: str, config: str) -> tuple[Tensor, Tensor, Tensor]:
    a = float(alpha.item())
    cfg = _attention_config(q, k, varlen, a, is_causal, niter, backend, config)
    dq, dk, dv = _pair(backend).backward(grad_out, q, k, v, out, residuals, a, is_causal, varlen, scale, cfg)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward.register_fake
def _(grad_out, q, k, v, varlen, out, residuals, alpha, is_causal, scale, niter, backend, config):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op(f"{_NS}::attention_alpha_backward", mutates_args=())
def _attention_alpha_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, varlen: Optional[Tensor],
                              alpha: Tensor, is_causal: bool, scale: float, niter: int) -> Tensor:
    from .kernels.torch_backend.alpha_grad import attention_alpha_grad

    grad = attention_alpha_grad(grad_out, q, k, v, float(alpha.item()), is_causal, varlen, scale,
                                niter=max(niter, 30))
    return grad.to(device=alpha.device, dtype=alpha.dtype).reshape(alpha.shape)


@_attention_alpha_backward.register_fake
def _(grad_out, q, k, v, varlen, alpha, is_causal, scale, niter):
    return alpha.new_empty(alpha.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, varlen, alpha, is_causal, scale, niter, backend, config = inputs
    out, *residuals = output
    ctx.mark_non_differentiable(*residuals)
    ctx.save_for_backward(q, k, v, varlen, alpha, out, *residuals)
    ctx.args = (is_causal, scale, niter, backend, config)


def _attention_grad(ctx, grads):
    q, k, v, varlen, alpha, out, *residuals = ctx.saved_tensors
    is_causal, scale, niter, backend, config = ctx.args
    grad_out = grads[0]
    dq = dk = dv = dalpha = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = _attention_backward(grad_out, q, k, v, varlen, out, residuals, alpha, is_causal, scale,
                                         niter, backend, config)
    if ctx.needs_input_grad[4]:
        dalpha = _attention_alpha_backward(grad_out, q, k, v, varlen, alpha, is_causal, scale, niter)
    return dq, dk, dv, None, dalpha, None, None, None, None, None


torch.library.register_autograd(f"{_NS}::attention_forward", _attention_grad, setup_context=_attention_setup)


def adasplash_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    is_causal: bool,
    varlen: Optional[Tensor],
    scale: float,
    backend: str,
    config: str = "",
    niter: int | None = None,
) -> Tensor:
    """alpha-entmax attention through the custom op (inputs already validated by the API).

    ``alpha``: a float, or a 0-d tensor (differentiable: a learnable alpha). ``config``: JSON from
    :func:`config_json`, or "" to select at run time. ``niter`` overrides the config's.
    """
    if not isinstance(alpha, Tensor):
        alpha = torch.tensor(float(alpha), dtype=torch.float64)
    return _attention_forward(q, k, v, varlen, alpha, bool(is_causal), float(scale), int(niter or 0), backend,
                              config)[0]


# --------------------------------------------------------------------------- entmax op


def _entmax_impl(backend: str):
    if backend == "torch":
        from .kernels.torch_backend.entmax import entmax_torch_backward, entmax_torch_forward

        return entmax_torch_forward, entmax_torch_backward
    if backend == "triton":
        from .kernels.entmax import entmax_backward, entmax_forward

        return entmax_forward, entmax_backward
    raise ValueError(f"unknown backend {backend!r}; choose 'triton' or 'torch'")


@torch.library.custom_op(f"{_NS}::entmax_forward", mutates_args=())
def _entmax_forward(x: Tensor, alpha: float, niter: int, backend: str, config: str) -> Tensor:
    forward, _ = _entmax_impl(backend)
    return forward(x, alpha, _entmax_config(x, alpha, niter, backend, config)).contiguous()


@_entmax_forward.register_fake
def _(x, alpha, niter, backend, config):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{_NS}::entmax_backward", mutates_args=())
def _entmax_backward(y: Tensor, grad: Tensor, alpha: float, niter: int, backend: str, config: str) -> Tensor:
    _, backward = _entmax_impl(backend)
    cfg = _entmax_config(y, alpha, niter, backend, config)
    return backward(y, grad.to(y.dtype).contiguous(), alpha, cfg).contiguous()


@_entmax_backward.register_fake
def _(y, grad, alpha, niter, backend, config):
    return y.new_empty(y.shape)


def _entmax_setup(ctx, inputs, output):
    _, alpha, niter, backend, config = inputs
    ctx.save_for_backward(output)
    ctx.args = (alpha, niter, backend, config)


def _entmax_grad(ctx, grad):
    (y,) = ctx.saved_tensors
    return _entmax_backward(y, grad, *ctx.args), None, None, None, None


torch.library.register_autograd(f"{_NS}::entmax_forward", _entmax_grad, setup_context=_entmax_setup)


def entmax_op(x: Tensor, alpha: float, backend: str, config: str = "", niter: int | None = None) -> Tensor:
    """alpha-entmax over the last dim of 2-D ``x`` through the custom op (input validated by the API)."""
    return _entmax_forward(x.contiguous(), float(alpha), int(niter or 0), backend, config)
