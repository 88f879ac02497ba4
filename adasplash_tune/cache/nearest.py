"""The nearest-problem rule, shared by the SQLAlchemy store and the call-time file reader."""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = ["closest", "fallback_arch"]


def closest(rows: Iterable[Any], major: int, minor: int) -> Any | None:
    """The candidate ``(id, size_major, size_minor, device_id, ...)`` nearest in log2 distance:
    the major size first, then the minor one; ties go to the larger sizes, then the device id.
    Returns the whole candidate row (None when no candidate has sizes)."""
    def distance(row: Any) -> tuple:
        size_major, size_minor, device_id = row[1], row[2], row[3]
        return (abs(math.log2(size_major) - math.log2(major)),
                abs(math.log2(size_minor) - math.log2(minor)),
                -size_major, -size_minor, device_id)

    usable = [r for r in rows if r[1] > 0 and r[2] > 0]
    return min(usable, key=distance) if usable else None


def fallback_arch(device_id: str, recorded: str | None) -> str:
    """The arch whose other devices may lend an entry when ``device_id`` has none: the one
    recorded for it, else the ``arch`` part of a ``name|arch|...`` id ("" for none)."""
    if recorded is not None:
        return recorded
    parts = device_id.split("|")
    return parts[1] if len(parts) > 1 else ""
