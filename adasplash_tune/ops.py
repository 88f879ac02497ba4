"""The differentiable attention and entmax ops around the backends: eager and under torch.compile.

Eager calls (:func:`attention`, :func:`entmax`) go through plain ``torch.autograd.Function`` s that
call a backend's forward/backward pair directly with the validated :class:`Config`: no dispatcher
layer, no JSON. A call that needs no gradient skips autograd altogether and keeps no residuals; a
backward computes only the gradients asked for, and outputs that are not differentiated get no
zero-filled gradients.

Under ``torch.compile`` (:func:`traced_attention`, :func:`traced_entmax`) the same structure is
traced: an autograd.Function whose forward and backward call opaque custom ops, registered
with ``torch.library.Library`` (define + impl + fake; no autograd inside the ops), so that
registering them imports nothing of the compiler. Their schemas take plain arguments only:

* ``attention_forward(q, k, v, varlen?, alpha, is_causal, scale, niter, backend, config,
  need_residuals) -> [out, *residuals]`` -- ``alpha`` a 0-d tensor, ``config`` the launch config
  as JSON (:func:`config_json`) or ``""``;
* ``attention_backward(grad_out, q, k, v, varlen?, out, residuals, alpha, is_causal, scale, niter,
  backend, config, needs) -> [the gradients of q, k, v that needs asks for]``;
* ``attention_alpha_backward(grad_out, q, k, v, varlen?, alpha, is_causal, scale, niter) -> dalpha``;
* ``entmax_forward(x, alpha, niter, backend, config) -> y`` and
  ``entmax_backward(y, grad, alpha, niter, backend, config) -> dx`` (x: 2-D rows).

``config == ""`` means "select when the graph runs": the op asks :mod:`.selection` (memo ->
caches -> nearest -> default; never timed) on the real tensors, so one dynamic graph serves every
length with its own config. ``niter > 0`` overrides the config's iteration count.

A backend plugs in through an :class:`AttentionPair`: the torch backend and the Triton attention
(``kernels/attention/op.py``'s ``adasplash_triton_forward``, ``adasplash_triton_backward`` and
``adasplash_triton_residuals``; see :func:`attention_pair`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kernels.spec import Config, ConfigError
from .kernels.torch_backend.alpha_grad import attention_alpha_grad
from .kernels.torch_backend.attention import adasplash_torch_backward, adasplash_torch_forward
from .kernels.torch_backend.entmax import entmax_torch_backward, entmax_torch_forward
from .selection import attention_selection, entmax_selection, selection_alpha, with_niter

__all__ = [
    "AttentionPair", "attention_pair", "EntmaxPair", "entmax_pair", "attention", "entmax",
    "traced_attention", "traced_entmax", "config_json", "explicit_config_json", "check_varlen_values",
    "ENV_CHECK_VARLEN",
]

log = logging.getLogger("adasplash_tune")

_NS = "adasplash_tune"

#: ``ADASPLASH_TUNE_CHECK_VARLEN=1``: check varlen values on GPU tensors too (one device sync per call).
ENV_CHECK_VARLEN = "ADASPLASH_TUNE_CHECK_VARLEN"

#: The alpha gradient's tau solve takes at least this many iterations.
_ALPHA_GRAD_MIN_NITER = 30


# --------------------------------------------------------------------------- backend pairs


@dataclass(frozen=True)
class AttentionPair:
    """How one backend plugs into the attention ops.

    ``forward(q, k, v, alpha, is_causal, varlen, scale, config, *, need_residuals=True)
    -> (out, residuals)`` (no residuals without ``need_residuals``);
    ``backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale, config, *,
    needs=(True, True, True)) -> (dq, dk, dv)``, None for a gradient ``needs`` does not ask for;
    ``residuals(q, k, v, config) -> [(shape, dtype), ...]`` describes the residual tensors for
    the compiled path's fake implementation. ``config`` is None there when the graph selects at
    run time: the shapes must then hold for every config.
    """

    forward: Callable[..., tuple[Tensor, Sequence[Tensor]]]
    backward: Callable[..., tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]
    residuals: Callable[..., list[tuple[tuple[int, ...], torch.dtype]]]


def _torch_forward(q, k, v, alpha, is_causal, varlen, scale, config, *, need_residuals: bool = True):
    out, stats = adasplash_torch_forward(q, k, v, alpha, is_causal, varlen, scale, config)
    return out, ([stats] if need_residuals else [])


def _torch_backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale, config, *,
                    needs: tuple[bool, bool, bool] = (True, True, True)):
    grads = adasplash_torch_backward(grad_out, q, k, v, residuals[0], alpha, is_causal, varlen, scale, config)
    return tuple(g if need else None for g, need in zip(grads, needs))


def _torch_residuals(q, k, v, config):
    return [((3, *q.shape[:3], 1), torch.float32)]


_TORCH_PAIR = AttentionPair(_torch_forward, _torch_backward, _torch_residuals)


@functools.lru_cache(maxsize=None)
def attention_pair(backend: str) -> Optional[AttentionPair]:
    """The forward/backward pair of ``backend`` ("torch" or "triton"), None if it has none here."""
    if backend == "torch":
        return _TORCH_PAIR
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; choose 'triton' or 'torch'")
    try:
        from .kernels.attention import op
    except ImportError as exc:
        log.debug("triton attention unavailable (%s)", exc)
        return None
    names = ("adasplash_triton_forward", "adasplash_triton_backward", "adasplash_triton_residuals")
    if not all(hasattr(op, name) for name in names):
        return None
    return AttentionPair(*(getattr(op, name) for name in names))


def _pair(backend: str) -> AttentionPair:
    pair = attention_pair(backend)
    if pair is None:
        raise ValueError(
            f"the {backend} attention backend is unavailable here (triton could not be imported); "
            "use backend='torch'"
        )
    return pair


@dataclass(frozen=True)
class EntmaxPair:
    """``forward(x, alpha, config) -> y`` and ``backward(y, grad, alpha, config) -> dx`` on 2-D rows."""

    forward: Callable[[Tensor, float, Config], Tensor]
    backward: Callable[[Tensor, Tensor, float, Config], Tensor]


@functools.lru_cache(maxsize=None)
def entmax_pair(backend: str) -> EntmaxPair:
    """The entmax forward/backward of ``backend`` ("torch" or "triton"; the latter imports triton)."""
    if backend == "torch":
        return EntmaxPair(entmax_torch_forward, entmax_torch_backward)
    if backend == "triton":
        from .kernels.entmax import entmax_backward, entmax_forward

        return EntmaxPair(entmax_forward, entmax_backward)
    raise ValueError(f"unknown backend {backend!r}; choose 'triton' or 'torch'")


# --------------------------------------------------------------------------- shared checks


def check_varlen_values(varlen: Tensor, n: int) -> None:
    """ValueError unless every length in ``varlen`` is in [0, n].

    Reading the values of a GPU tensor synchronises with the device, so they are checked for CPU
    tensors always and for other devices only under ``ADASPLASH_TUNE_CHECK_VARLEN=1``; unchecked,
    a length outside [0, n] acts as its nearest bound (clamped)."""
    if varlen.device.type != "cpu" and os.environ.get(ENV_CHECK_VARLEN, "0") in ("", "0"):
        return
    if varlen.numel() == 0:
        return
    low, high = (int(t) for t in torch.aminmax(varlen))
    if low < 0 or high > n:
        raise ValueError(f"varlen values must be valid lengths in [0, {n}] (the sequence length), "
                         f"got values from {low} to {high}")


def _check_alpha_value(alpha: float) -> float:
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    return alpha


def _alpha_gradient(grad_out, q, k, v, alpha: float, is_causal, varlen, scale, niter: int,
                    like: Tensor) -> Tensor:
    """d(sum(grad_out * out)) / d alpha in ``like``'s shape, dtype and device."""
    grad = attention_alpha_grad(grad_out, q, k, v, alpha, is_causal, varlen, scale,
                                niter=max(niter, _ALPHA_GRAD_MIN_NITER))
    return grad.to(device=like.device, dtype=like.dtype).reshape(like.shape)


def _needed(grads: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    """Spread the gradients an op returned (only those asked for) over their ``needs`` slots."""
    given = iter(grads)
    return [next(given) if need else None for need in needs]


# --------------------------------------------------------------------------- eager attention


class _Attention(torch.autograd.Function):
    """Eager autograd around a backend pair (inputs: q, k, v, alpha tensor or None, then plain data)."""

    @staticmethod
    def forward(ctx, q, k, v, alpha_tensor, pair, alpha, is_causal, varlen, scale, config, niter):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        need_qkv = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        out, residuals = pair.forward(q, k, v, alpha, is_causal, varlen, scale, config, need_residuals=need_qkv)
        ctx.save_for_backward(q, k, v, varlen, out, *residuals)
        ctx.call = (pair, alpha, is_causal, scale, config, niter, alpha_tensor)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        dq = dk = dv = dalpha = None
        if grad_out is not None:
            q, k, v, varlen, out, *residuals = ctx.saved_tensors
            pair, alpha, is_causal, scale, config, niter, alpha_tensor = ctx.call
            needs = tuple(ctx.needs_input_grad[:3])
            if any(needs):
                dq, dk, dv = pair.backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale,
                                           config, needs=needs)
            if ctx.needs_input_grad[3]:
                dalpha = _alpha_gradient(grad_out, q, k, v, alpha, is_causal, varlen, scale, niter or 0,
                                         alpha_tensor)
        return dq, dk, dv, dalpha, None, None, None, None, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, alpha: float, alpha_tensor: Optional[Tensor], is_causal: bool,
              varlen: Optional[Tensor], scale: float, backend: str, config: Config,
              niter: Optional[int] = None) -> Tensor:
    """alpha-entmax attention, eagerly, with the validated ``config`` (niter already applied).

    ``alpha_tensor``: the 0-d tensor ``alpha`` came from when it needs a gradient, else None.
    ``niter``: the call's explicit override (the alpha gradient solves with at least 30)."""
    pair = _pair(backend)
    if varlen is not None:
        check_varlen_values(varlen, q.shape[2])
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or alpha_tensor is not None):
        return _Attention.apply(q, k, v, alpha_tensor, pair, alpha, is_causal, varlen, scale, config, niter)
    return pair.forward(q, k, v, alpha, is_causal, varlen, scale, config, need_residuals=False)[0]


# --------------------------------------------------------------------------- eager entmax


class _Entmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pair, alpha, config):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        y = pair.forward(x, alpha, config)
        ctx.save_for_backward(y)
        ctx.call = (pair, alpha, config)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        if grad is None:
            return None, None, None, None
        (y,) = ctx.saved_tensors
        pair, alpha, config = ctx.call
        return pair.backward(y, grad, alpha, config), None, None, None


def entmax(x: Tensor, alpha: float, backend: str, config: Config) -> Tensor:
    """alpha-entmax over the last dim of 2-D ``x``, eagerly, with the validated ``config``."""
    pair = entmax_pair(backend)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Entmax.apply(x, pair, alpha, config)
    return pair.forward(x, alpha, config)


# --------------------------------------------------------------------------- config transport (compiled)


@functools.lru_cache(maxsize=1024)
def config_json(config: Config) -> str:
    """The JSON form a custom op receives for ``config`` (memoised: configs are hashable)."""
    return config.to_json()


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> Config:
    """The validated Config of a JSON text (ConfigError naming the bad field otherwise)."""
    return Config.from_json(text)


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


def _attention_config(q: Tensor, k: Tensor, varlen: Optional[Tensor], alpha: float, is_causal: bool,
                      niter: int, backend: str, config: str) -> Config:
    """The config a compiled attention call runs: the given JSON, or selected now."""
    if config:
        cfg = _given(config, "adasplash", backend)
    else:
        cfg = attention_selection(q, k, selection_alpha(alpha), is_causal, varlen is not None, backend)._config
    return with_niter(cfg, niter)


def _entmax_config(x: Tensor, alpha: float, niter: int, backend: str, config: str) -> Config:
    if config:
        cfg = _given(config, "entmax", backend)
    else:
        cfg = entmax_selection(x, alpha, x.dim() - 1, backend)._config
    return with_niter(cfg, niter)


# --------------------------------------------------------------------------- custom ops (compiled)

_LIB = torch.library.Library(_NS, "FRAGMENT")


def _define(schema: str, impl: Callable, fake: Callable) -> None:
    """Register one op: schema, one implementation for every device, and its fake (meta) function."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_NS}::{name}", fake, lib=_LIB)


def _attention_forward_impl(q, k, v, varlen, alpha, is_causal, scale, niter, backend, config, need_residuals):
    a = _check_alpha_value(float(alpha.item()))
    if varlen is not None:
        check_varlen_values(varlen, q.shape[2])
    pair = _pair(backend)
    cfg = _attention_config(q, k, varlen, a, is_causal, niter, backend, config)
    out, residuals = pair.forward(q, k, v, a, is_causal, varlen, scale, cfg, need_residuals=need_residuals)
    if need_residuals and not config:
        _check_residuals(residuals, pair.residuals(q, k, v, None), backend)
    return [out.contiguous(), *(r.contiguous() for r in residuals)]


def _check_residuals(got: Sequence[Tensor], declared: Sequence[tuple], backend: str) -> None:
    """A graph that selects at run time was traced with config-free residual shapes: hold the pair to them."""
    if [(tuple(r.shape), r.dtype) for r in got] != [(tuple(s), d) for s, d in declared]:
        raise RuntimeError(f"the {backend} attention pair returned residuals {[tuple(r.shape) for r in got]}, "
                           f"not the config-free shapes {[tuple(s) for s, _ in declared]} its residuals() "
                           "declares for a compiled graph that selects at run time")


def _attention_forward_fake(q, k, v, varlen, alpha, is_causal, scale, niter, backend, config, need_residuals):
    if not need_residuals:
        return [q.new_empty(q.shape)]
    residuals = _pair(backend).residuals(q, k, v, _parse_or_none(config))
    return [q.new_empty(q.shape), *(q.new_empty(shape, dtype=dtype) for shape, dtype in residuals)]


_define("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? varlen, Tensor alpha, bool is_causal, "
        "float scale, int niter, str backend, str config, bool need_residuals) -> Tensor[]",
        _attention_forward_impl, _attention_forward_fake)


def _attention_backward_impl(grad_out, q, k, v, varlen, out, residuals, alpha, is_causal, scale, niter, backend,
                             config, needs):
    a = float(alpha.item())
    cfg = _attention_config(q, k, varlen, a, is_causal, niter, backend, config)
    grads = _pair(backend).backward(grad_out, q, k, v, out, residuals, a, is_causal, varlen, scale, cfg,
                                    needs=tuple(needs))
    return [g.contiguous() for g, need in zip(grads, needs) if need]


def _attention_backward_fake(grad_out, q, k, v, varlen, out, residuals, alpha, is_causal, scale, niter, backend,
                             config, needs):
    return [t.new_empty(t.shape) for t, need in zip((q, k, v), needs) if need]


_define("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? varlen, Tensor out, "
        "Tensor[] residuals, Tensor alpha, bool is_causal, float scale, int niter, str backend, str config, "
        "bool[3] needs) -> Tensor[]",
        _attention_backward_impl, _attention_backward_fake)


def _attention_alpha_backward_impl(grad_out, q, k, v, varlen, alpha, is_causal, scale, niter):
    return _alpha_gradient(grad_out, q, k, v, float(alpha.item()), is_causal, varlen, scale, niter, alpha)


def _attention_alpha_backward_fake(grad_out, q, k, v, varlen, alpha, is_causal, scale, niter):
    return alpha.new_empty(alpha.shape)


_define("attention_alpha_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? varlen, Tensor alpha, "
        "bool is_causal, float scale, int niter) -> Tensor",
        _attention_alpha_backward_impl, _attention_alpha_backward_fake)


def _entmax_forward_impl(x, alpha, niter, backend, config):
    cfg = _entmax_config(x, alpha, niter, backend, config)
    return entmax_pair(backend).forward(x, alpha, cfg).contiguous()


def _entmax_forward_fake(x, alpha, niter, backend, config):
    return x.new_empty(x.shape)


_define("entmax_forward(Tensor x, float alpha, int niter, str backend, str config) -> Tensor",
        _entmax_forward_impl, _entmax_forward_fake)


def _entmax_backward_impl(y, grad, alpha, niter, backend, config):
    cfg = _entmax_config(y, alpha, niter, backend, config)
    return entmax_pair(backend).backward(y, grad.to(y.dtype), alpha, cfg).contiguous()


def _entmax_backward_fake(y, grad, alpha, niter, backend, config):
    return y.new_empty(y.shape)


_define("entmax_backward(Tensor y, Tensor grad, float alpha, int niter, str backend, str config) -> Tensor",
        _entmax_backward_impl, _entmax_backward_fake)

_OPS = getattr(torch.ops, _NS)


# --------------------------------------------------------------------------- compiled autograd


class _TracedAttention(torch.autograd.Function):
    """What torch.compile traces: the custom ops inside an autograd.Function (autograd outside the ops)."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, varlen, is_causal, scale, niter, backend, config, need_residuals):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        out, *residuals = _OPS.attention_forward(q, k, v, varlen, alpha, is_causal, scale, niter, backend, config,
                                                 need_residuals)
        ctx.save_for_backward(q, k, v, alpha, varlen, out, *residuals)
        ctx.args = (is_causal, scale, niter, backend, config)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        dq = dk = dv = dalpha = None
        if grad_out is not None:
            q, k, v, alpha, varlen, out, *residuals = ctx.saved_tensors
            is_causal, scale, niter, backend, config = ctx.args
            needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            if needs[0] or needs[1] or needs[2]:
                grads = _OPS.attention_backward(grad_out, q, k, v, varlen, out, residuals, alpha, is_causal, scale,
                                                niter, backend, config, needs)
                dq, dk, dv = _needed(grads, needs)
            if ctx.needs_input_grad[3]:
                dalpha = _OPS.attention_alpha_backward(grad_out, q, k, v, varlen, alpha, is_causal, scale, niter)
        return dq, dk, dv, dalpha, None, None, None, None, None, None, None


def traced_attention(q: Tensor, k: Tensor, v: Tensor, alpha: float | Tensor, is_causal: bool,
                     varlen: Optional[Tensor], scale: float, backend: str, config: str = "",
                     niter: Optional[int] = None) -> Tensor:
    """alpha-entmax attention as torch.compile traces it (inputs validated as far as tracing can).

    ``alpha``: a float or a 0-d tensor (checked in (1, 2] when the graph runs; differentiable).
    ``config``: JSON from :func:`explicit_config_json`, or "" to select when the graph runs."""
    if not isinstance(alpha, Tensor):
        alpha = torch.tensor(float(alpha), dtype=torch.float64)
    niter = int(niter or 0)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or alpha.requires_grad):
        need_residuals = q.requires_grad or k.requires_grad or v.requires_grad
        return _TracedAttention.apply(q, k, v, alpha, varlen, is_causal, scale, niter, backend, config,
                                      need_residuals)
    return _OPS.attention_forward(q, k, v, varlen, alpha, is_causal, scale, niter, backend, config, False)[0]


class _TracedEntmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, niter, backend, config):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        y = _OPS.entmax_forward(x, alpha, niter, backend, config)
        ctx.save_for_backward(y)
        ctx.args = (alpha, niter, backend, config)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if grad is None:
            return None, None, None, None, None
        (y,) = ctx.saved_tensors
        return _OPS.entmax_backward(y, grad, *ctx.args), None, None, None, None


def traced_entmax(x: Tensor, alpha: float, backend: str, config: str = "", niter: Optional[int] = None) -> Tensor:
    """alpha-entmax over the last dim of 2-D ``x`` as torch.compile traces it."""
    niter = int(niter or 0)
    if torch.is_grad_enabled() and x.requires_grad:
        return _TracedEntmax.apply(x, float(alpha), niter, backend, config)
    return _OPS.entmax_forward(x, float(alpha), niter, backend, config)
