"""Hugging Face transformers: ``attn_implementation="adasplash"`` for models that dispatch through
``transformers.AttentionInterface`` (BERT, RoBERTa, ModernBERT, Llama, Mistral, Qwen, GPT-NeoX, ...).

``register()`` adds the attention function (and, on transformers >= 4.53, the boolean-mask
builder it needs, the same one ``sdpa`` uses) under a name. The function maps the model's mask
onto AdaSplash's two mask forms and refuses anything else, never computing another attention:

* no mask -> full or causal attention (``is_causal`` from the call or the module);
* a 4-D mask that is causal or bidirectional attention over right-padded sequences -> ``varlen``
  lengths (output rows at padded positions are zero: they never feed a valid token);
* anything else -- left padding, packed sequences, sliding windows, additive biases, a query
  length different from the key length (KV-cache decoding) -- raises ``ValueError``.

Attention dropout cannot be expressed either: a model in training mode needs its attention
dropout set to 0 (e.g. ``attention_probs_dropout_prob=0.0``, ``attention_dropout=0.0``).
alpha is the registered value, or ``model.config.adasplash_alpha`` when the config carries one.

Under ``torch.compile(fullgraph=True)`` the mask check runs inside a custom op when the graph
runs (no graph break); the pattern (causal or not) is then the module's ``is_causal``.
"""

# no `from __future__ import annotations`: torch.library reads the op signatures' real types
import logging
import weakref
from typing import Any, Mapping

import torch

from ..api import adasplash

__all__ = ["register", "adasplash_attention_forward", "mask_to_varlen"]

log = logging.getLogger("adasplash_tune")

_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias")
_LAST: list[Any] = []  # one-slot memo: (mask weakref, version, batch, n, hint) -> result


_PATTERN_ERROR = (
    "adasplash expresses only causal or bidirectional attention over right-padded sequences; this "
    "attention_mask is something else (left padding, packed sequences, a sliding window or a custom "
    "mask). Pad on the right (tokenizer.padding_side = 'right') or use another attn_implementation."
)


def _check_shape(mask: Any, batch: int, n: int) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError("adasplash takes no attention_mask or a 4-D one (batch, heads, query, key); got "
                         f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}")
    if mask.shape[-1] < n or mask.shape[-2] not in (1, n) or mask.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not fit {batch} sequences of "
                         f"{n} tokens")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ValueError(f"attention_mask of dtype {mask.dtype} is not supported (bool or float expected)")


def _analyse(mask: torch.Tensor, batch: int, n: int) -> tuple[torch.Tensor, dict[bool, bool]]:
    """(lengths (B,), {causal: whether the mask is that pattern over those lengths}) of a 4-D mask."""
    mask = mask[..., :n]
    if mask.dtype == torch.bool:
        allowed = mask
    else:  # additive: 0 = attend, the dtype minimum (or -inf) = masked, nothing else
        allowed = mask == 0
        if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise ValueError("adasplash cannot apply an additive attention bias (the float attention_mask "
                             "holds values other than 0 and the dtype minimum)")
    if not bool((allowed.all(dim=1) == allowed.any(dim=1)).all()):
        raise ValueError("adasplash cannot apply a different attention_mask per head")
    allowed = allowed[:, 0].expand(batch, n, n)  # broadcast over batch and (1-row masks) queries
    lengths = allowed[:, -1].sum(-1)  # the last query row sees every valid key, causal or not
    rows = torch.arange(n, device=mask.device).view(1, n, 1)
    cols = torch.arange(n, device=mask.device).view(1, 1, n)
    lens = lengths.view(batch, 1, 1)
    # Padded query rows see the valid keys in both patterns (AdaSplash zeroes their outputs,
    # which no valid token reads).
    patterns = {False: cols < lens, True: (cols < lens) & (cols <= rows)}
    return lengths, {c: bool((allowed == want).all()) for c, want in patterns.items()}


@torch.library.custom_op("adasplash_tune::hf_mask_lengths", mutates_args=())
def _checked_lengths(mask: torch.Tensor, batch: int, n: int, causal: bool) -> torch.Tensor:
    """Lengths (B,) int32 of a mask that is the ``causal`` pattern over right padding, else ValueError.
    An op, so that a compiled model checks its mask when it runs, without a graph break."""
    lengths, matches = _analyse(mask, batch, n)
    if not matches[causal]:
        raise ValueError(_PATTERN_ERROR + f" (compiled: the module's is_causal={causal} must match the mask)")
    return lengths.to(torch.int32)


@_checked_lengths.register_fake
def _(mask, batch, n, causal):
    return mask.new_empty((batch,), dtype=torch.int32)


def mask_to_varlen(
    attention_mask: torch.Tensor | None,
    batch: int,
    n: int,
    causal_hint: bool,
) -> tuple[bool, torch.Tensor | None]:
    """Map a transformers attention mask onto AdaSplash's ``(is_causal, varlen)``.

    ``attention_mask``: None, or (B or 1, H or 1, N or 1, >= N) bool (True = attend) or additive
    float (0 = attend, the dtype minimum = masked). ``causal_hint``: what the module does without
    a mask. Eagerly the mask decides (the hint first); under ``torch.compile`` the pattern is the
    hint's and the mask is checked when the graph runs (lengths always passed). Raises ValueError
    for a mask that is not causal/bidirectional attention over right-padded sequences.
    """
    if attention_mask is None:
        return bool(causal_hint), None
    _check_shape(attention_mask, batch, n)
    if torch.compiler.is_compiling():
        return bool(causal_hint), _checked_lengths(attention_mask, batch, n, bool(causal_hint))
    memo = _memo_get(attention_mask, batch, n, causal_hint)
    if memo is not None:
        return memo
    lengths, matches = _analyse(attention_mask, batch, n)
    order = (bool(causal_hint), not causal_hint)
    is_causal = next((c for c in order if matches[c]), None)
    if is_causal is None:
        raise ValueError(_PATTERN_ERROR)
    varlen = None if bool((lengths == n).all()) else lengths.to(torch.int32)
    result = (is_causal, varlen)
    _memo_put(attention_mask, batch, n, causal_hint, result)
    return result


def _memo_get(mask: torch.Tensor, batch: int, n: int, hint: bool):
    """The last layer's answer when the same, unmodified mask tensor comes again (every layer)."""
    if not _LAST:
        return None
    ref, version, ident, result = _LAST[0]
    if ref() is mask and version == mask._version and ident == (batch, n, hint):
        return result
    return None


def _memo_put(mask: torch.Tensor, batch: int, n: int, hint: bool, result) -> None:
    try:
        ref = weakref.ref(mask)
    except TypeError:
        return
    _LAST[:] = [(ref, mask._version, (batch, n, hint), result)]


def adasplash_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    alpha: float = 1.5,
    backend: str | None = None,
    niter: int | None = None,
    config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, N, D), key/value (B, Hkv, N, D) ->
    ((B, N, H, D) output, None). Attention weights are never materialised."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"adasplash attention does not support {name!r}")
    if dropout:
        raise ValueError(
            f"adasplash attention has no attention dropout (got dropout={dropout}); set the model's "
            "attention dropout to 0 (e.g. attention_probs_dropout_prob=0.0 or attention_dropout=0.0)"
        )
    batch, _, n, _ = query.shape
    if key.shape[2] != n:
        raise ValueError(
            f"adasplash needs as many keys as queries (got {n} queries, {key.shape[2]} keys): KV-cache "
            "decoding and cross-attention of another length are not supported (generate with use_cache=False)"
        )
    window = kwargs.get("sliding_window")
    if window is not None and window < n:
        raise ValueError(f"adasplash does not support sliding-window attention (window {window} < {n} tokens)")
    hint = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    causal, varlen = mask_to_varlen(attention_mask, batch, n, bool(hint) and n > 1)
    model_alpha = getattr(getattr(module, "config", None), "adasplash_alpha", None)
    out = adasplash(query, key, value, alpha if model_alpha is None else model_alpha, causal, varlen, niter,
                    scale=scaling, backend=backend, config=config)
    return out.transpose(1, 2).contiguous(), None


def register(
    name: str = "adasplash",
    *,
    alpha: float = 1.5,
    backend: str | None = None,
    niter: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> str:
    """Register AdaSplash as transformers attention implementation ``name`` and return ``name``.

    Then ``AutoModel.from_pretrained(..., attn_implementation=name)``,
    ``Model(config)`` with ``config._attn_implementation = name``, or
    ``model.set_attn_implementation(name)`` use it. Registering again replaces the options.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError("the transformers integration needs transformers>=4.48: "
                          "pip install 'adasplash-tune[hf]'") from exc
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    from ..api import _check_alpha, _check_config_option, _check_niter

    alpha = _check_alpha(alpha)
    niter = _check_niter(niter)
    if backend not in (None, "auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton' or 'torch'")
    _check_config_option(config, backend)  # now, not at the model's first forward
    options = {"alpha": alpha, "backend": backend, "niter": niter, "config": config}

    def attention(module, query, key, value, attention_mask, **kwargs):
        return adasplash_attention_forward(module, query, key, value, attention_mask, **options, **kwargs)

    attention.__name__ = attention.__qualname__ = f"adasplash_attention_{name}"
    AttentionInterface.register(name, attention)
    _register_mask(name)
    log.info("registered transformers attention implementation %r (alpha=%s)", name, alpha)
    return name


def _register_mask(name: str) -> None:
    """Masks built like sdpa's (bool, or None when plain causal/bidirectional) where supported."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53: models build their own 4-D masks
        return
    AttentionMaskInterface.register(name, sdpa_mask)

