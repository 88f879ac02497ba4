"""One cache entry as plain data, and its validation against the kernel declarations.

Every entry that enters a store — tuned here or imported from a file — goes through
:func:`validate_entry`: the kernel and backend must be declared, the config must be complete and
valid for the declaration, the problem key must have exactly the fields the key builder makes.
Only data is read (JSON text or mappings); nothing is ever unpickled or executed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Mapping

from ..kernels.problem import DTYPE_NAMES, attention_key, entmax_key, key_to_json
from ..kernels.registry import get_spec
from .errors import EntryError

__all__ = [
    "Entry", "EntryError", "validate_entry", "entry_from_dict", "split_key", "SIZE_FIELDS", "MAX_DEPTH",
    "check_depth", "short_repr",
]

#: The size buckets of each kernel's key: (major, minor). The nearest lookup relaxes these,
#: the major one first.
SIZE_FIELDS: dict[str, tuple[str, str]] = {"adasplash": ("seq", "bh"), "entmax": ("cols", "rows")}
_ALPHA_CLASSES = ("1.5", "2", "4/3", "1.25", "generic")
#: How deeply an entry's JSON data (device, key, config, provenance) may nest; real entries
#: nest 2 levels. Deeper data is rejected before anything recurses through it.
MAX_DEPTH = 32


@dataclass
class Entry:
    """The best known config for one problem key on one device (and its measurements)."""

    kernel: str
    backend: str
    device: dict[str, Any]
    kernel_hash: str
    key: dict[str, Any]
    config: dict[str, Any]
    time_ms: float | None = None
    spread_ms: float | None = None
    error: float | None = None
    trials: int = 0
    strategy: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    failed_verify: bool = False

    @property
    def device_id(self) -> str:
        return str(self.device.get("device_id", ""))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``export`` writes and ``import`` reads back)."""
        return {
            "kernel": self.kernel,
            "backend": self.backend,
            "device": dict(self.device),
            "kernel_hash": self.kernel_hash,
            "key": dict(self.key),
            "config": dict(self.config),
            "time_ms": self.time_ms,
            "spread_ms": self.spread_ms,
            "error": self.error,
            "trials": self.trials,
            "strategy": self.strategy,
            "provenance": dict(self.provenance),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "failed_verify": self.failed_verify,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat()


@lru_cache(maxsize=None)
def _key_template(kernel: str) -> tuple[tuple[str, type], ...]:
    """Field names and types of ``kernel``'s problem key, taken from the key builder itself."""
    if kernel == "adasplash":
        sample = attention_key(backend="torch", dtype="float32", batch=1, q_heads=1, kv_heads=1,
                               seq_len=16, head_dim=64, alpha=1.5, causal=False, varlen=False)
    else:
        sample = entmax_key(backend="torch", dtype="float32", rows=1, cols=16, alpha=1.5)
    return tuple((name, type(value)) for name, value in sorted(sample.items()))


def _check_key(kernel: str, backend: str, key: Any) -> dict[str, Any]:
    if not isinstance(key, Mapping):
        raise EntryError(f"key must be an object, got {type(key).__name__}")
    template = _key_template(kernel)
    names = {name for name, _ in template}
    unknown, missing = sorted(set(key) - names), sorted(names - set(key))
    if unknown or missing:
        raise EntryError(f"key fields do not match {kernel}'s key: unknown {unknown}, missing {missing}")
    for name, kind in template:
        if type(key[name]) is not kind:
            raise EntryError(f"key field {name!r} must be {kind.__name__}, got {short_repr(key[name])}")
    if key["backend"] != backend:
        raise EntryError(f"key backend {key['backend']!r} differs from entry backend {backend!r}")
    if key["dtype"] not in DTYPE_NAMES:
        raise EntryError(f"key dtype {key['dtype']!r} is not one of {list(DTYPE_NAMES)}")
    if key["alpha"] not in _ALPHA_CLASSES:
        raise EntryError(f"key alpha {key['alpha']!r} is not one of {list(_ALPHA_CLASSES)}")
    for name in SIZE_FIELDS[kernel]:
        value = key[name]
        if value < 1 or value & (value - 1):
            raise EntryError(f"key field {name!r} must be a power of two, got {short_repr(value)}")
    return dict(key)


def split_key(kernel: str, key: Mapping[str, Any]) -> tuple[str, int, int]:
    """(canonical key without its size buckets, major bucket, minor bucket)."""
    major, minor = SIZE_FIELDS[kernel]
    base = {k: v for k, v in key.items() if k not in (major, minor)}
    return key_to_json(base), int(key[major]), int(key[minor])


def _number(name: str, value: Any, *, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = None
    if number is None or not math.isfinite(number):
        raise EntryError(f"{name} must be a finite number or null, got {short_repr(value)}")
    if number < 0:
        raise EntryError(f"{name} must not be negative, got {value!r}")
    return number


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 80 characters (a hostile row may hold a huge value)."""
    if isinstance(value, int) and value.bit_length() > 200:  # repr of a huge int may even fail
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_depth(name: str, value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise EntryError if ``value`` nests lists/objects deeper than ``limit`` (iterative: never
    recurses, whatever the depth)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= limit:
            raise EntryError(f"{name} is nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


def _spread(value: Any) -> float | None:
    """A spread that could not be measured (NaN, one rep) is stored as unknown."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return _number("spread_ms", value)


def _as_object(name: str, value: Any) -> Any:
    """Objects may arrive as JSON text (SQLite rows); parse it, naming the field if malformed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise EntryError(f"{name}: malformed JSON ({exc})") from None
        except RecursionError:
            raise EntryError(f"{name} is nested deeper than {MAX_DEPTH} levels") from None
    check_depth(name, value)
    return value


def _as_datetime(name: str, value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        result = value
    elif isinstance(value, str):
        try:
            result = datetime.fromisoformat(value)
        except ValueError:
            raise EntryError(f"{name} is not an ISO timestamp: {value!r}") from None
    else:
        raise EntryError(f"{name} must be an ISO timestamp, got {value!r}")
    if result is None:
        return None
    if result.tzinfo is None:
        return result.replace(tzinfo=timezone.utc)
    try:
        return result.astimezone(timezone.utc)
    except OverflowError:  # e.g. year 1 at +01:00
        raise EntryError(f"{name} {value!r} is out of the representable range") from None


def validate_entry(entry: Entry, context: Mapping[str, Any] | None = None) -> Entry:
    """A checked, normalised copy of ``entry``; raises :class:`EntryError` (a ValueError) naming
    what is wrong (unknown kernel or backend, unknown/missing config field, out-of-domain value,
    violated constraint, malformed key, device or metrics)."""
    if not isinstance(entry.kernel, str) or not isinstance(entry.backend, str):
        raise EntryError("kernel and backend must be strings")
    try:
        spec = get_spec(entry.kernel, entry.backend)
    except ValueError as exc:
        raise EntryError(str(exc)) from None
    device = _as_object("device", entry.device)
    if not isinstance(device, Mapping) or not isinstance(device.get("device_id"), str) \
            or not device.get("device_id"):
        raise EntryError("device must be an object with a non-empty 'device_id'")
    if not isinstance(entry.kernel_hash, str) or not entry.kernel_hash:
        raise EntryError("kernel_hash must be a non-empty string")
    key = _check_key(entry.kernel, entry.backend, _as_object("key", entry.key))
    config = _as_object("config", entry.config)
    if not isinstance(config, Mapping):
        raise EntryError(f"config must be an object, got {type(config).__name__}")
    try:
        checked = spec.validate(config, context, partial=False)
    except ValueError as exc:  # ConfigError is a ValueError
        raise EntryError(str(exc)) from None
    provenance = _as_object("provenance", entry.provenance)
    if provenance is None:
        provenance = {}
    if not isinstance(provenance, Mapping):
        raise EntryError("provenance must be an object")
    if isinstance(entry.trials, bool) or not isinstance(entry.trials, int) or entry.trials < 0:
        raise EntryError(f"trials must be a non-negative integer, got {short_repr(entry.trials)}")
    if not isinstance(entry.strategy, str):
        raise EntryError(f"strategy must be a string, got {short_repr(entry.strategy)}")
    if not isinstance(entry.failed_verify, bool):
        raise EntryError(f"failed_verify must be true or false, got {short_repr(entry.failed_verify)}")
    return Entry(
        kernel=entry.kernel, backend=entry.backend, device=dict(device),
        kernel_hash=entry.kernel_hash, key=key, config=checked.as_dict(),
        time_ms=_number("time_ms", entry.time_ms), spread_ms=_spread(entry.spread_ms),
        error=_number("error", entry.error), trials=entry.trials, strategy=entry.strategy,
        provenance=dict(provenance),
        created_at=_as_datetime("created_at", entry.created_at),
        updated_at=_as_datetime("updated_at", entry.updated_at),
        failed_verify=entry.failed_verify,
    )


_FIELDS = ("kernel", "backend", "device", "kernel_hash", "key", "config")


def entry_from_dict(data: Any) -> Entry:
    """Build and validate an entry from a mapping as written by :meth:`Entry.to_dict`."""
    if not isinstance(data, Mapping):
        raise EntryError(f"an entry must be an object, got {type(data).__name__}")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise EntryError(f"entry lacks fields {missing}")
    # fields this version does not know (written by a newer one) are ignored, not trusted
    values = {k: v for k, v in data.items() if k in Entry.__dataclass_fields__}
    values.setdefault("trials", 0)
    values.setdefault("strategy", "")
    values.setdefault("provenance", {})
    values.setdefault("failed_verify", False)
    if values["trials"] is None:
        values["trials"] = 0
    return validate_entry(Entry(**values))
