"""Recorded input samples: a bounded slice of a real call's q, k, v, for ``tune --from-record``.

Opt-in, beside the record file: with ``ADASPLASH_TUNE_RECORD=FILE`` and
``ADASPLASH_TUNE_RECORD_SAMPLES=DIR`` set, the first eager ``adasplash`` call of each new problem
key in a process also saves batch row 0 of its q, k, v -- whole kv-head groups, as many as fit
``ADASPLASH_TUNE_RECORD_SAMPLE_MB`` (default 64) -- to ``DIR/adasplash-<key hash>.safetensors``
(replaced atomically: one file per key, so the folder stays bounded by the number of keys) and
appends a line naming it to the record file. safetensors files load without unpickling. A call
with a non-default ``scale`` is saved with q rescaled so that the default scale gives its scores.
Saving never fails the call: problems are logged once and the call goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ENV_SAMPLES", "ENV_SAMPLE_MB", "DEFAULT_SAMPLE_MB", "FORMAT", "sample_path", "record_attention_sample",
           "save_attention_sample", "load_attention_sample", "clear_memo"]

log = logging.getLogger("adasplash_tune")

ENV_SAMPLES = "ADASPLASH_TUNE_RECORD_SAMPLES"
ENV_SAMPLE_MB = "ADASPLASH_TUNE_RECORD_SAMPLE_MB"
DEFAULT_SAMPLE_MB = 64.0
FORMAT = "adasplash-tune-sample/1"

_SAVED: set[tuple[str, str]] = set()
_WARNED: set[str] = set()
_LOCK = threading.Lock()


def clear_memo() -> None:
    """Forget which keys this process has sampled (tests)."""
    with _LOCK:
        _SAVED.clear()
        _WARNED.clear()


def _warn_once(tag: str, msg: str, *args: Any) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        log.warning(msg, *args)


def sample_path(directory: str | Path, kernel: str, key: Mapping[str, Any]) -> Path:
    """Where the sample of ``key`` lives in ``directory``."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:20]
    return Path(directory) / f"{kernel}-{digest}.safetensors"


def _cap_bytes() -> float:
    text = os.environ.get(ENV_SAMPLE_MB)
    if not text:
        return DEFAULT_SAMPLE_MB * 2 ** 20
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        _warn_once(f"mb-{text}", "%s=%r is not a positive number of MiB; using %g", ENV_SAMPLE_MB, text,
                   DEFAULT_SAMPLE_MB)
        return DEFAULT_SAMPLE_MB * 2 ** 20
    return value * 2 ** 20


def record_attention_sample(record: str | None, directory: str, key: Mapping[str, Any], device_id: str, q: Any,
                            k: Any, v: Any, varlen: Any, alpha: float, is_causal: bool, scale: float) -> Path | None:
    """Save the call's sample once per (directory, key) in this process and append its line to the
    ``record`` file (None: no record file, nothing saved; warned once)."""
    from .loader import ENV_RECORD, append_record

    if not record:
        _warn_once("no-record", "%s is set but %s is not: no input samples are saved (they are named in the "
                   "record file)", ENV_SAMPLES, ENV_RECORD)
        return None
    ident = (str(directory), json.dumps(dict(key), sort_keys=True))
    with _LOCK:
        if ident in _SAVED:
            return None
        _SAVED.add(ident)
    try:
        path = save_attention_sample(sample_path(directory, "adasplash", key), key, q, k, v, varlen, alpha,
                                     is_causal, scale, _cap_bytes())
    except (OSError, ImportError, RuntimeError, ValueError) as exc:
        _warn_once(f"save-{directory}", "cannot save an input sample to %s=%s (%s)", ENV_SAMPLES, directory, exc)
        return None
    if path is not None:
        append_record(record, {"kernel": "adasplash", "backend": key.get("backend"), "key": dict(key),
                               "device": device_id, "sample": str(path.resolve()),
                               "shape": {**_shape(q, k), "alpha": float(alpha), "causal": bool(is_causal),
                                         "varlen": varlen is not None, "dtype": str(q.dtype).removeprefix("torch.")},
                               "count": 0})
    return path


def _shape(q: Any, k: Any) -> dict[str, int]:
    return {"batch": int(q.shape[0]), "heads": int(q.shape[1]), "kv_heads": int(k.shape[1]),
            "seq_len": int(q.shape[2]), "head_dim": int(q.shape[3])}


def save_attention_sample(path: Path, key: Mapping[str, Any], q: Any, k: Any, v: Any, varlen: Any, alpha: float,
                          is_causal: bool, scale: float, cap_bytes: float) -> Path | None:
    """Write batch row 0 of q, k, v (whole kv-head groups within ``cap_bytes``) to ``path``.

    None (and a warning) when one group does not fit the cap."""
    from safetensors.torch import save_file

    hq, hkv, n, d = int(q.shape[1]), int(k.shape[1]), int(q.shape[2]), int(q.shape[3])
    group = hq // hkv
    per_group = (group + 2) * n * d * q.element_size()
    keep = min(hkv, int(cap_bytes // per_group))
    if keep < 1:
        _warn_once(f"cap-{n}-{d}-{group}", "an input sample of N=%d, D=%d needs %.1f MiB per kv head; "
                   "%s is %.1f MiB: not saved", n, d, per_group / 2 ** 20, ENV_SAMPLE_MB, cap_bytes / 2 ** 20)
        return None
    qs = q.detach()[:1, : keep * group]
    default = d ** -0.5
    if not math.isclose(scale, default, rel_tol=1e-6):
        qs = (qs.float() * (scale / default)).to(q.dtype)
    tensors = {"q": qs, "k": k.detach()[:1, :keep], "v": v.detach()[:1, :keep]}
    if varlen is not None:
        tensors["varlen"] = varlen.detach()[:1].to("cpu").long()
    tensors = {name: t.to("cpu").contiguous() for name, t in tensors.items()}
    meta = {"format": FORMAT, "kernel": "adasplash", "key": json.dumps(dict(key), sort_keys=True),
            "alpha": repr(float(alpha)), "causal": json.dumps(bool(is_causal)),
            "shape": json.dumps(_shape(q, k)), "heads_kept": str(keep * group)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sample-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("saved an input sample of %s (%d of %d heads) to %s", meta["key"], keep * group, hq, path)
    return path


def load_attention_sample(path: str | Path) -> dict[str, Any]:
    """{"q", "k", "v", optional "varlen", "meta"} from a sample file; ValueError naming the file if malformed.

    Any safetensors file with 4-d ``q``, ``k``, ``v`` (B, H, N, D) reads, e.g. the per-layer
    captures of ``examples/train_lm.py --capture``; batch row 0 is used."""
    from safetensors import SafetensorError  # type: ignore[attr-defined]
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recorded sample {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"recorded sample {path} cannot be read: {exc}") from None
    if meta.get("format", FORMAT) != FORMAT:  # files without one (examples/train_lm.py --capture) are read
        raise ValueError(f"recorded sample {path} is not an adasplash-tune sample (format {meta.get('format')!r})")
    q, k, v = (tensors.get(name) for name in ("q", "k", "v"))
    if q is None or k is None or v is None or q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"recorded sample {path} lacks 4-d q, k, v tensors")
    if (q.shape[0], q.shape[2:]) != (k.shape[0], k.shape[2:]) or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"recorded sample {path}: q {tuple(q.shape)} and k {tuple(k.shape)} do not pair")
    out: dict[str, Any] = {"q": q[:1], "k": k[:1], "v": v[:1], "meta": meta}
    if "varlen" in tensors:
        out["varlen"] = tensors["varlen"]
    return out
