"""What an entry must satisfy before it is written: the kernel declarations, and the real limits
of the schema's columns, so that a database never refuses a row half-way through a write.

:func:`storable` runs :func:`~adasplash_tune.cache.entry.validate_entry` and then checks, against
the column types declared in :mod:`adasplash_tune.cache.models`:

* strings fit their ``String(n)`` column (PostgreSQL refuses longer ones; SQLite would keep them);
* integers fit their ``Integer`` column: 32 bits. SQLite's INTEGER holds 64, but the declared
  type is PostgreSQL's ``integer``; one rule for every dialect keeps an exported file importable
  into a team server;
* every text is encodable as UTF-8 (no lone surrogates) and JSON data holds only JSON values
  (finite numbers, string keys), nested at most ``MAX_DEPTH`` levels.

Every failure is an :class:`~adasplash_tune.cache.errors.EntryError` naming the field.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

from sqlalchemy import BigInteger, Integer, SmallInteger, String, Table

from .entry import Entry, check_depth, entry_from_dict, short_repr, split_key, validate_entry
from .errors import EntryError
from .models import Device, Kernel, TunedEntry

__all__ = ["storable", "storable_row", "device_values"]

_BITS = ((BigInteger, 64), (SmallInteger, 16), (Integer, 32))  # subclasses before Integer


@lru_cache(maxsize=None)
def _limits(table: Table) -> dict[str, tuple[str, Any]]:
    """column name -> ("length", n) or ("range", (lo, hi)), read from the declared types."""
    limits: dict[str, tuple[str, Any]] = {}
    for column in table.columns:
        kind = column.type
        if isinstance(kind, String) and kind.length:
            limits[column.name] = ("length", kind.length)
            continue
        for integer, bits in _BITS:
            if isinstance(kind, integer):
                limits[column.name] = ("range", (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
                break
    return limits


def _text(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EntryError(f"{name} is not valid UTF-8 text ({exc.reason} at position {exc.start})") from None


def _fits(table: Table, column: str, name: str, value: Any) -> None:
    """``value`` (already of the right Python type) fits ``table.column``."""
    kind, limit = _limits(table).get(column, (None, None))
    if isinstance(value, str):
        _text(name, value)
        if kind == "length" and len(value) > limit:
            raise EntryError(f"{name} is {len(value)} characters long, longer than its column ({limit})")
    elif kind == "range" and not limit[0] <= value <= limit[1]:
        raise EntryError(f"{name} {short_repr(value)} is outside its column's range [{limit[0]}, {limit[1]}]")


def _json_data(name: str, value: Any) -> None:
    """``value`` is plain JSON data: dicts with string keys, lists, strings (UTF-8), finite
    numbers, booleans, null."""
    check_depth(name, value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _text(name, item)
        elif item is None or isinstance(item, (bool, int)):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise EntryError(f"{name} holds a non-finite number ({item!r})")
        elif isinstance(item, Mapping):
            for key in item:
                if not isinstance(key, str):
                    raise EntryError(f"{name} has a non-string key {key!r}")
                _text(name, key)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            raise EntryError(f"{name} holds a {type(item).__name__}, not JSON data")


def device_values(device: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of a device row, checked: strings are strings, counts are integers, each
    within its column."""
    values: dict[str, Any] = {}
    for field in ("device_id",) + Device.FIELDS:
        value = device.get(field)
        if value is None:
            continue
        integer = field in ("sm_count", "shared_mem")
        if integer and (isinstance(value, bool) or not isinstance(value, int)):
            raise EntryError(f"device.{field} must be an integer, got {short_repr(value)}")
        if not integer and not isinstance(value, str):
            raise EntryError(f"device.{field} must be a string, got {type(value).__name__}")
        _fits(Device.__table__, field, f"device.{field}", value)
        values[field] = value
    if not values.get("device_id"):
        raise EntryError("device must be an object with a non-empty 'device_id'")
    return values


def storable(entry: Entry) -> Entry:
    """A checked, normalised copy of ``entry`` that every dialect stores as it is."""
    return _within_limits(validate_entry(entry))


def storable_row(data: Any) -> Entry:
    """:func:`storable` for a row read from a file (a mapping as :meth:`Entry.to_dict` writes)."""
    return _within_limits(entry_from_dict(data))


def _within_limits(checked: Entry) -> Entry:
    device_values(checked.device)
    _fits(Kernel.__table__, "name", "kernel", checked.kernel)
    _fits(Kernel.__table__, "backend", "backend", checked.backend)
    _fits(Kernel.__table__, "source_hash", "kernel_hash", checked.kernel_hash)
    _fits(TunedEntry.__table__, "strategy", "strategy", checked.strategy)
    _fits(TunedEntry.__table__, "trials", "trials", checked.trials)
    _, major, minor = split_key(checked.kernel, checked.key)
    _fits(TunedEntry.__table__, "size_major", "the key's major size", major)
    _fits(TunedEntry.__table__, "size_minor", "the key's minor size", minor)
    for name in ("device", "key", "config", "provenance"):
        _json_data(name, getattr(checked, name))
    return checked
