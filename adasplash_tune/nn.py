"""``AdaSplashAttention``: alpha-entmax attention as a ``torch.nn.Module``, with a fixed or learnable alpha.

Two ways to use it:

* heads in, heads out (no projections): ``AdaSplashAttention(alpha=1.5)(q, k, v)`` with
  q (B, Hq, N, D) and k, v (B, Hkv, N, D) -- drop-in where a model calls an attention function
  on (q, k, v), e.g. in place of ``F.scaled_dot_product_attention``;
* with projections: ``AdaSplashAttention(embed_dim, num_heads, num_kv_heads=...)(x)`` on
  (B, N, E) inputs, self-attention (or ``(query, key, value)`` of one length), returning (B, N, E).

A learnable alpha is ``1 + sigmoid(alpha_logit)``, always inside (1, 2); its gradient is the
closed form of :mod:`adasplash_tune.kernels.torch_backend.alpha_grad`: inside the Triton dQ pass
in eager mode, one extra dense PyTorch pass on the torch backend and under ``torch.compile``. Both modes compile with ``torch.compile(fullgraph=True)`` (with ``varlen``; a
``key_padding_mask`` is checked on the data, which breaks the graph there).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import api
from .kernels.spec import Config

__all__ = ["AdaSplashAttention"]

_ALPHA_EDGE = 1e-3  # a learnable alpha starts at most this close to 1 or 2 (sigmoid saturates)


class AdaSplashAttention(nn.Module):
    """alpha-entmax attention (AdaSplash); see the module docstring for the two modes.

    Args:
        embed_dim, num_heads: give both for projections (``embed_dim % num_heads == 0``);
            leave both None for the heads-in/heads-out form.
        num_kv_heads: key/value heads with projections (grouped-query attention), default num_heads.
        alpha: the entmax alpha in (1, 2], or its initial value when ``learn_alpha``.
        learn_alpha: make alpha a trained parameter (``alpha_logit``).
        is_causal: default causal masking (a call may override it).
        bias: projection biases.
        scale, niter, backend, config: passed to :func:`adasplash_tune.adasplash`.
    """

    def __init__(
        self,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        *,
        num_kv_heads: int | None = None,
        alpha: float = 1.5,
        learn_alpha: bool = False,
        is_causal: bool = False,
        bias: bool = True,
        scale: float | None = None,
        niter: int | None = None,
        backend: str | None = None,
        config: Mapping[str, Any] | Config | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        alpha = api._check_alpha(alpha)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        if not isinstance(learn_alpha, bool):
            raise TypeError(f"learn_alpha must be a bool, got {api._type_name(learn_alpha)}")
        if backend not in (None, "auto", "triton", "torch"):
            raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
        api._check_config_option(config, backend)  # now, not at the first forward
        self.is_causal = is_causal
        self.scale, self.niter, self.backend, self.config = api._check_scale(scale), api._check_niter(niter), backend, config
        self.learn_alpha = learn_alpha
        if self.learn_alpha:
            frac = min(max(alpha - 1.0, _ALPHA_EDGE), 1.0 - _ALPHA_EDGE)
            logit = math.log(frac / (1.0 - frac))
            self.alpha_logit = nn.Parameter(torch.tensor(logit, device=device, dtype=torch.float32))
        else:
            self._alpha = alpha
        self._init_projections(embed_dim, num_heads, num_kv_heads, bias, device, dtype)

    def _init_projections(self, embed_dim, num_heads, num_kv_heads, bias, device, dtype) -> None:
        if embed_dim is None and num_heads is None:
            if num_kv_heads is not None:
                raise ValueError("num_kv_heads needs embed_dim and num_heads (projections)")
            self.embed_dim = self.num_heads = self.num_kv_heads = self.head_dim = None
            return
        if embed_dim is None or num_heads is None:
            raise ValueError("give both embed_dim and num_heads (projections) or neither")
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 \
                or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        head_dim = embed_dim // num_heads
        if not api.MIN_HEAD_DIM <= head_dim <= api.MAX_HEAD_DIM:
            raise ValueError(f"embed_dim / num_heads = {head_dim} is not a supported head dim "
                             f"({api.MIN_HEAD_DIM}..{api.MAX_HEAD_DIM})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = head_dim
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, **kw)

    @property
    def alpha(self) -> float | Tensor:
        """The current alpha: a float, or a 0-d tensor in (1, 2) when learnable."""
        if self.learn_alpha:
            return 1.0 + torch.sigmoid(self.alpha_logit)
        return self._alpha

    def extra_repr(self) -> str:
        value = float(self.alpha.detach()) if self.learn_alpha else self._alpha
        alpha = f"{value:.4g}" + (" (learnable)" if self.learn_alpha else "")
        parts = [f"alpha={alpha}", f"is_causal={self.is_causal}"]
        if self.embed_dim is not None:
            parts[:0] = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}",
                         f"num_kv_heads={self.num_kv_heads}"]
        if self.backend not in (None, "auto"):
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        varlen: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        """Attention output. Heads form: (B, Hq, N, D). Projection form: (B, N, E) in and out.

        ``varlen`` (B,) valid lengths, or ``key_padding_mask`` (B, N) bool with True at padding
        (right padding only: anything else raises); output rows past a length are zero.
        """
        causal = self.is_causal if is_causal is None else is_causal
        if key_padding_mask is not None:
            if varlen is not None:
                raise ValueError("give varlen or key_padding_mask, not both")
            n = query.shape[-2] if self.embed_dim is None else query.shape[1]
            varlen = _lengths_from_padding(key_padding_mask, query.shape[0], n, query.device)
        if self.embed_dim is None:
            if key is None or value is None:
                raise ValueError("without projections, forward takes (q, k, v) head tensors")
            return self._attend(query, key, value, causal, varlen)
        return self._project(query, key, value, causal, varlen)

    def _project(self, x: Tensor, key: Tensor | None, value: Tensor | None, causal: bool,
                 varlen: Tensor | None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"query must have shape (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        key = x if key is None else key
        value = key if value is None else value
        if key.shape != x.shape or value.shape != x.shape:
            raise ValueError(f"key/value must have query's shape {tuple(x.shape)} "
                             f"(got {tuple(key.shape)}, {tuple(value.shape)})")
        batch, n, _ = x.shape
        q = self.q_proj(x).view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = self._attend(q, k, v, causal, varlen)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, self.embed_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, varlen: Tensor | None) -> Tensor:
        alpha = self.alpha  # a 0-d tensor when learnable: adasplash differentiates it
        return api.adasplash(q, k, v, alpha, causal, varlen, self.niter, scale=self.scale, backend=self.backend,
                             config=self.config)


def _lengths_from_padding(mask: Tensor, batch: int, n: int, device: torch.device) -> Tensor:
    """Valid lengths (B,) from a (B, N) bool padding mask (True = pad); only right padding is accepted."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, n):
        shape = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor of shape ({batch}, {n}) with True at "
                         f"padded positions, got {shape}")
    lengths = (~mask).sum(-1)
    expected = torch.arange(mask.shape[1], device=mask.device).view(1, -1) >= lengths.view(-1, 1)
    if not torch.equal(mask, expected):
        raise ValueError("key_padding_mask must be right padding (valid tokens first, then padding); "
                         "left padding and holes cannot be expressed by AdaSplash's varlen")
    return lengths.to(device=device, dtype=torch.int32)  # as the kernels read them: no conversion per call
