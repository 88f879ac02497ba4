"""What ``torch.compile`` traces: autograd.Functions around opaque custom ops.

While a graph is traced, :func:`traced_attention` and :func:`traced_entmax` replace the eager ops
of :mod:`.ops`: an autograd.Function whose forward and backward call custom ops registered with
``torch.library.Library`` (define + impl + fake; no autograd inside the ops, as flash-attention's
and vLLM's interfaces do), so that registering them imports nothing of the compiler. Their
schemas take plain arguments only (``torch.ops.adasplash_tune.<name>``):

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
length with its own config. ``niter > 0`` overrides the config's iteration count. The residual
shapes a fake reports come from the pair's ``residuals(q, k, v, config)``, with ``config`` None
when the graph selects at run time (they must then hold for every config; checked when it runs).
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .kernels.registry import config_from_json
from .kernels.spec import Config, ConfigError
from .selection import attention_selection, entmax_selection, selection_alpha, with_niter

__all__ = ["traced_attention", "traced_entmax", "config_json", "explicit_config_json"]

_NS = "adasplash_tune"


# --------------------------------------------------------------------------- config transport


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


# --------------------------------------------------------------------------- custom ops

_LIB = torch.library.Library(_NS, "FRAGMENT")


def _define(schema: str, impl: Callable, fake: Callable) -> None:
    """Register one op: schema, one implementation for every device, and its fake (meta) function."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{_NS}::{name}", fake, lib=_LIB)


def _attention_forward_impl(q, k, v, varlen, alpha, is_causal, scale, niter, backend, config, need_residuals):
    a = ops.check_alpha_value(float(alpha.item()))
    if varlen is not None:
        ops.check_varlen_values(varlen, q.shape[2])
    pair = ops.require_attention_pair(backend)
    cfg = _attention_config(q, k, varlen, a, is_causal, niter, backend, config)
    out, residuals = pair.forward(q, k, v, a, is_causal, varlen, scale, cfg, need_residuals=need_residuals,
                                  fixed_residuals=not config)
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
    residuals = ops.require_attention_pair(backend).residuals(q, k, v, _parse_or_none(config))
    return [q.new_empty(q.shape), *(q.new_empty(shape, dtype=dtype) for shape, dtype in residuals)]


_define("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? varlen, Tensor alpha, bool is_causal, "
        "float scale, int niter, str backend, str config, bool need_residuals) -> Tensor[]",
        _attention_forward_impl, _attention_forward_fake)


def _attention_backward_impl(grad_out, q, k, v, varlen, out, residuals, alpha, is_causal, scale, niter, backend,
                             config, needs):
    a = float(alpha.item())
    cfg = _attention_config(q, k, varlen, a, is_causal, niter, backend, config)
    grads = ops.require_attention_pair(backend).backward(grad_out, q, k, v, out, residuals, a, is_causal, varlen,
                                                         scale, cfg, needs=tuple(needs))
    return [g.contiguous() for g, need in zip(grads, needs) if need]


def _attention_backward_fake(grad_out, q, k, v, varlen, out, residuals, alpha, is_causal, scale, niter, backend,
                             config, needs):
    return [t.new_empty(t.shape) for t, need in zip((q, k, v), needs) if need]


_define("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? varlen, Tensor out, "
        "Tensor[] residuals, Tensor alpha, bool is_causal, float scale, int niter, str backend, str config, "
        "bool[3] needs) -> Tensor[]",
        _attention_backward_impl, _attention_backward_fake)


def _attention_alpha_backward_impl(grad_out, q, k, v, varlen, alpha, is_causal, scale, niter):
    return ops.alpha_gradient(grad_out, q, k, v, float(alpha.item()), is_causal, varlen, scale, niter, alpha)


def _attention_alpha_backward_fake(grad_out, q, k, v, varlen, alpha, is_causal, scale, niter):
    return alpha.new_empty(alpha.shape)


_define("attention_alpha_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? varlen, Tensor alpha, "
        "bool is_causal, float scale, int niter) -> Tensor",
        _attention_alpha_backward_impl, _attention_alpha_backward_fake)


def _entmax_forward_impl(x, alpha, niter, backend, config):
    cfg = _entmax_config(x, alpha, niter, backend, config)
    return ops.entmax_pair(backend).forward(x, alpha, cfg).contiguous()


def _entmax_forward_fake(x, alpha, niter, backend, config):
    return x.new_empty(x.shape)


_define("entmax_forward(Tensor x, float alpha, int niter, str backend, str config) -> Tensor",
        _entmax_forward_impl, _entmax_forward_fake)


def _entmax_backward_impl(y, grad, alpha, niter, backend, config):
    cfg = _entmax_config(y, alpha, niter, backend, config)
    return ops.entmax_pair(backend).backward(y, grad.to(y.dtype), alpha, cfg).contiguous()


def _entmax_backward_fake(y, grad, alpha, niter, backend, config):
    return y.new_empty(y.shape)


_define("entmax_backward(Tensor y, Tensor grad, float alpha, int niter, str backend, str config) -> Tensor",
        _entmax_backward_impl, _entmax_backward_fake)

_OPS = getattr(torch.ops, _NS)


# --------------------------------------------------------------------------- autograd around the ops


def _needed(grads: Sequence[Tensor], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    """Spread the gradients an op returned (only those asked for) over their ``needs`` slots."""
    given = iter(grads)
    return [next(given) if need else None for need in needs]



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
