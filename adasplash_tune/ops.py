"""The differentiable attention and entmax ops of eager calls, and the backend pairs they run.

:func:`attention` and :func:`entmax` go through plain ``torch.autograd.Function`` s that call a
backend's forward/backward pair directly with the validated :class:`Config`: no dispatcher layer,
no JSON. A call that needs no gradient skips autograd altogether and keeps no residuals; a
backward computes only the gradients asked for, and outputs that are not differentiated get no
zero-filled gradients. What ``torch.compile`` traces instead is in :mod:`.compiled`.

A backend plugs in through an :class:`AttentionPair`: the torch backend and the Triton attention
(``kernels/attention/op.py``'s ``adasplash_triton_forward``, ``adasplash_triton_backward`` and
``adasplash_triton_residuals``; see :func:`attention_pair`); entmax through an :class:`EntmaxPair`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kernels.spec import Config
from .kernels.torch_backend.alpha_grad import attention_alpha_grad
from .kernels.torch_backend.attention import adasplash_torch_backward, adasplash_torch_forward
from .kernels.torch_backend.entmax import entmax_torch_backward, entmax_torch_forward

__all__ = [
    "AttentionPair", "attention_pair", "require_attention_pair", "EntmaxPair", "entmax_pair", "attention", "entmax",
    "check_varlen_values", "check_alpha_value", "alpha_gradient", "ENV_CHECK_VARLEN",
]

log = logging.getLogger("adasplash_tune")

#: ``ADASPLASH_TUNE_CHECK_VARLEN=1``: check varlen values on GPU tensors too (one device sync per call).
ENV_CHECK_VARLEN = "ADASPLASH_TUNE_CHECK_VARLEN"

#: The alpha gradient's tau solve takes at least this many iterations.
_ALPHA_GRAD_MIN_NITER = 30


# --------------------------------------------------------------------------- backend pairs


@dataclass(frozen=True)
class AttentionPair:
    """How one backend plugs into the attention ops.

    ``forward(q, k, v, alpha, is_causal, varlen, scale, config, *, need_residuals=True,
    fixed_residuals=False) -> (out, residuals)`` (no residuals without ``need_residuals``; with
    ``fixed_residuals`` they have the config-free shapes ``residuals(q, k, v, None)`` declares, for
    compiled graphs that select their config at run time);
    ``backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale, config, *,
    needs=(True, True, True)) -> (dq, dk, dv)``, None for a gradient ``needs`` does not ask for;
    ``residuals(q, k, v, config) -> [(shape, dtype), ...]`` describes the residual tensors for
    the compiled path's fake implementation (:mod:`.compiled`). ``config`` is None there when the graph selects at
    run time: the shapes must then hold for every config.
    """

    forward: Callable[..., tuple[Tensor, Sequence[Tensor]]]
    backward: Callable[..., tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]
    residuals: Callable[..., list[tuple[tuple[int, ...], torch.dtype]]]
    #: ``backward``'s arguments -> (dq, dk, dv, dalpha 0-d float32) in one pass; None: the alpha
    #: gradient is the dense PyTorch pass of :func:`alpha_gradient`.
    alpha_backward: Optional[Callable[..., tuple[Optional[Tensor], ...]]] = None


def _torch_forward(q, k, v, alpha, is_causal, varlen, scale, config, *, need_residuals: bool = True,
                   fixed_residuals: bool = False):
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
    names = ("adasplash_triton_forward", "adasplash_triton_backward", "adasplash_triton_residuals",
             "adasplash_triton_alpha_backward")
    if not all(hasattr(op, name) for name in names):
        return None
    return AttentionPair(*(getattr(op, name) for name in names))


def require_attention_pair(backend: str) -> AttentionPair:
    """``attention_pair(backend)``, or ValueError when it has none here."""
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


#: Integer dtypes ``torch.aminmax`` does not take (read as int64).
_NO_AMINMAX = (torch.uint16, torch.uint32, torch.uint64)


def check_varlen_values(varlen: Tensor, n: int) -> None:
    """ValueError unless every length in ``varlen`` is in [0, n].

    Reading the values of a GPU tensor synchronises with the device, so they are checked for CPU
    tensors always and for other devices only under ``ADASPLASH_TUNE_CHECK_VARLEN=1``; unchecked,
    a length outside [0, n] acts as its nearest bound (clamped)."""
    if varlen.device.type != "cpu" and os.environ.get(ENV_CHECK_VARLEN, "0") in ("", "0"):
        return
    if varlen.numel() == 0:
        return
    if varlen.dtype in _NO_AMINMAX:
        varlen = varlen.to(torch.int64)
    low, high = (int(t) for t in torch.aminmax(varlen))
    if low < 0 or high > n:
        raise ValueError(f"varlen values must be valid lengths in [0, {n}] (the sequence length), "
                         f"got values from {low} to {high}")


def check_alpha_value(alpha: float) -> float:
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    return alpha


def alpha_gradient(grad_out, q, k, v, alpha: float, is_causal, varlen, scale, niter: int,
                    like: Tensor) -> Tensor:
    """d(sum(grad_out * out)) / d alpha in ``like``'s shape, dtype and device."""
    grad = attention_alpha_grad(grad_out, q, k, v, alpha, is_causal, varlen, scale,
                                niter=max(niter, _ALPHA_GRAD_MIN_NITER))
    return grad.to(device=like.device, dtype=like.dtype).reshape(like.shape)


# --------------------------------------------------------------------------- eager attention


class _Attention(torch.autograd.Function):
    """Eager autograd around a backend pair (inputs: q, k, v, alpha tensor or None, then plain data)."""

    @staticmethod
    def forward(ctx, q, k, v, alpha_tensor, pair, alpha, is_causal, varlen, scale, config, niter):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        need_qkv = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        fused_alpha = ctx.needs_input_grad[3] and pair.alpha_backward is not None
        out, residuals = pair.forward(q, k, v, alpha, is_causal, varlen, scale, config,
                                      need_residuals=need_qkv or fused_alpha)
        ctx.save_for_backward(q, k, v, varlen, out, *residuals)
        ctx.call = (pair, alpha, is_causal, scale, config, niter, alpha_tensor)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients are not differentiable
            return _attention_backward_once(ctx, grad_out)
        return _attention_backward(ctx, grad_out)


def _attention_backward(ctx, grad_out):
    """_Attention's backward (grad mode off: a plain backward; see :func:`_attention_backward_once`)."""
    dq = dk = dv = dalpha = None
    if grad_out is not None:
        q, k, v, varlen, out, *residuals = ctx.saved_tensors
        pair, alpha, is_causal, scale, config, niter, alpha_tensor = ctx.call
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.needs_input_grad[3] and pair.alpha_backward is not None:
            dq, dk, dv, dalpha = pair.alpha_backward(grad_out, q, k, v, out, residuals, alpha, is_causal,
                                                     varlen, scale, config, needs=needs)
            return (dq, dk, dv, dalpha.to(alpha_tensor.dtype).reshape(alpha_tensor.shape),
                    None, None, None, None, None, None, None)
        if any(needs):
            dq, dk, dv = pair.backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale,
                                       config, needs=needs)
        if ctx.needs_input_grad[3]:
            dalpha = alpha_gradient(grad_out, q, k, v, alpha, is_causal, varlen, scale, niter or 0,
                                     alpha_tensor)
    return dq, dk, dv, dalpha, None, None, None, None, None, None, None


#: With grad mode on (``create_graph=True``) the backward goes through ``once_differentiable``, whose
#: outputs refuse a second differentiation; a plain backward skips its wrapper (~5 µs of host time).
_attention_backward_once = once_differentiable(_attention_backward)


def attention(q: Tensor, k: Tensor, v: Tensor, alpha: float, alpha_tensor: Optional[Tensor], is_causal: bool,
              varlen: Optional[Tensor], scale: float, backend: str, config: Config,
              niter: Optional[int] = None) -> Tensor:
    """alpha-entmax attention, eagerly, with the validated ``config`` (niter already applied).

    ``alpha_tensor``: the 0-d tensor ``alpha`` came from when it needs a gradient, else None.
    ``niter``: the call's explicit override (the alpha gradient solves with at least 30)."""
    pair = require_attention_pair(backend)
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
