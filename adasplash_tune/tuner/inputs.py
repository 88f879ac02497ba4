"""Attention inputs the tuner times and gates configs on: a synthetic family or a recorded sample.

The sparsity of the inputs decides which config is fastest (how many tiles the tau sweeps and the
products visit), so the tuner can tune on more than white noise. An input spec is a string:

* ``randn`` or ``randn:S`` -- q = S * randn, k = randn (scores ~ N(0, S^2); S = 1 by default):
  unstructured, each row's largest scores in random key tiles;
* ``local:S`` -- sink + locality (the pattern of "attention sink + sliding window" models): unit
  directions w_i, smoothed along the sequence by a Gaussian window of N/64 tokens, orthogonal to a
  sink axis e; k_0 = e, k_j = w_j, q_i = S (e + w_i), both times D^(1/4), so large scores cluster on
  the diagonal band and the sink column (sparser as S grows);
* ``recorded:PATH`` -- a sample of a real call's q, k, v saved with ``ADASPLASH_TUNE_RECORD_SAMPLES``
  (:mod:`adasplash_tune.cache.samples`), tiled over batch and heads to the problem's shape;
* a mix of synthetic families joined by ``+`` (``randn+randn:16+local:2``): every trial is checked
  on each and timed on each, and its time is the geometric mean, so the winner is the config
  that is fast across sparsity, not only on one family.

v and the output gradient are randn in every family.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["FAMILIES", "MIX", "parse_inputs", "split_inputs", "inputs_label", "synthetic_inputs", "recorded_inputs", "smoothed_noise"]

#: The synthetic families; ``recorded:PATH`` is the other kind of spec.
FAMILIES = ("randn", "local")

#: Joins the synthetic families of a mix.
MIX = "+"


def split_inputs(spec: str) -> list[str]:
    """The single specs of ``spec``: the parts of a mix (``randn+local:2``), else ``[spec]``.
    Every part is checked; a mix takes synthetic families only, each once. ValueError otherwise."""
    if not isinstance(spec, str) or spec.startswith("recorded:") or MIX not in spec:
        parse_inputs(spec)  # one spec (a recorded path may hold a "+")
        return [spec]
    parts = spec.split(MIX)
    if any(parse_inputs(part)[0] == "recorded" for part in parts):
        raise ValueError(f"inputs {spec!r}: a mix takes synthetic families only, not a recorded sample")
    if len(set(parts)) != len(parts):
        raise ValueError(f"inputs {spec!r}: a family appears twice in the mix")
    return parts


def parse_inputs(spec: str) -> tuple[str, Any]:
    """(family, value): ("randn" | "local", scale float) or ("recorded", path str). ValueError on a bad spec."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"inputs must be a non-empty string such as 'randn', 'randn:8', 'local:2' or "
                         f"'recorded:FILE', got {spec!r}")
    family, sep, value = spec.partition(":")
    if family == "recorded":
        if not value:
            raise ValueError("inputs 'recorded:FILE' needs the sample file")
        return family, value
    if family not in FAMILIES:
        raise ValueError(f"unknown input family {family!r}; choose from {', '.join(FAMILIES)} or recorded:FILE")
    if not sep:
        if family == "local":
            raise ValueError("the local family needs its logit scale: local:S (e.g. local:2)")
        return family, 1.0
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"inputs {spec!r}: the scale must be a number") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"inputs {spec!r}: the scale must be a positive number")
    return family, scale


def inputs_label(spec: str) -> str:
    """A short name for tables and provenance: the spec, with a recorded sample's file name only."""
    if len(split_inputs(spec)) > 1:
        return spec
    family, value = parse_inputs(spec)
    return f"recorded:{Path(value).name}" if family == "recorded" else spec


def smoothed_noise(rows: int, n: int, d: int, corr_len: float, gen: Any, device: Any) -> Any:
    """(rows, n, d) white noise convolved along n with a Gaussian window of std ``corr_len``."""
    import torch

    half = int(math.ceil(4 * corr_len))
    noise = torch.randn(rows, n + 2 * half, d, generator=gen, device=device)
    t = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
    window = torch.exp(-0.5 * (t / corr_len) ** 2)
    size = noise.shape[1] + window.numel() - 1  # linear (not circular) convolution
    spec = torch.fft.rfft(noise, n=size, dim=1) * torch.fft.rfft(window, n=size).view(1, -1, 1)
    full = torch.fft.irfft(spec, n=size, dim=1)
    return full[:, 2 * half: 2 * half + n]  # outputs whose window lies inside the noise


def synthetic_inputs(family: str, scale: float, q_shape: Sequence[int], kv_heads: int, gen: Any,
                     device: Any, corr_len: float | None = None) -> tuple[Any, Any]:
    """(q, k) in float32 for a synthetic family; q (B, H, N, D), k (B, kv_heads, N, D).

    With grouped heads, each query head of a group is drawn around its kv head's directions
    (``local``) or independently (``randn``)."""
    import torch

    b, h, n, d = (int(x) for x in q_shape)
    if family == "randn":
        q = scale * torch.randn(b, h, n, d, generator=gen, device=device)
        k = torch.randn(b, kv_heads, n, d, generator=gen, device=device)
        return q, k
    if family != "local":
        raise ValueError(f"unknown input family {family!r}; choose from {', '.join(FAMILIES)}")
    corr = max(1.0, n / 64) if corr_len is None else float(corr_len)
    w = smoothed_noise(b * kv_heads, n, d, corr, gen, device).view(b, kv_heads, n, d)
    w[..., 0] = 0.0  # orthogonal to the sink axis e = first basis vector
    w = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    root = d ** 0.25
    k = root * w
    k[:, :, 0] = 0.0
    k[:, :, 0, 0] = root  # the sink key: k_0 = e
    q = (scale * root) * w.repeat_interleave(h // kv_heads, dim=1)
    q[..., 0] = scale * root  # q_i = s (e + w_i)
    return q, k


def recorded_inputs(path: str, q_shape: Sequence[int], kv_heads: int) -> tuple[Any, Any, Any, Any]:
    """(q, k, v, lengths or None) from a recorded sample, tiled to q (B, H, N, D) / kv_heads heads.

    Query heads are taken group by group with their kv head (GQA structure kept), cycling over
    the sample's groups; batch rows repeat the sample's one row. N, D and the group size must
    match the sample's: ValueError otherwise."""
    from ..cache.samples import load_attention_sample

    sample = load_attention_sample(path)
    q, k, v = sample["q"], sample["k"], sample["v"]
    b, h, n, d = (int(x) for x in q_shape)
    if (q.shape[2], q.shape[3]) != (n, d):
        raise ValueError(f"recorded sample {path}: N x D = {q.shape[2]} x {q.shape[3]}, the problem needs {n} x {d}")
    group = h // kv_heads
    have_group = q.shape[1] // k.shape[1]
    if have_group != group:
        raise ValueError(f"recorded sample {path}: {have_group} query heads per kv head, the problem has {group}")
    idx = [i % k.shape[1] for i in range(kv_heads)]
    k_t, v_t = k[:, idx], v[:, idx]
    q_t = q.view(1, k.shape[1], group, n, d)[:, idx].reshape(1, h, n, d)
    expand = (b, -1, -1, -1)
    lengths = sample.get("varlen")
    if lengths is not None:
        lengths = lengths.reshape(-1)[:1].repeat(b)
    return q_t.expand(expand), k_t.expand(expand), v_t.expand(expand), lengths
