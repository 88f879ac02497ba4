"""Reading a cache database through SQLAlchemy: exact and nearest lookups, listings, counts.

Each function takes an open :class:`~.database.Database` and runs in one read transaction;
database errors become one-line StoreErrors naming the cache. Call-time lookups in cache files
use :mod:`.lookup` instead (the same answers, without SQLAlchemy).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from sqlalchemy import false, func, select
from sqlalchemy.orm import contains_eager

from ..kernels.problem import key_to_json
from .database import Database
from .entry import SIZE_FIELDS, Entry, split_key
from .models import Device, FailedConfig, Kernel, TunedEntry
from .nearest import closest, fallback_arch

__all__ = ["entries_query", "get_exact", "nearest", "entries", "raw_rows", "devices", "count", "failures",
           "to_entry"]

log = logging.getLogger("adasplash_tune")


def entries_query(kernel: str, backend: str, kernel_hash: str):
    """Tuned entries of one kernel at one source hash, with their device and kernel rows."""
    return (
        select(TunedEntry)
        .join(TunedEntry.device).join(TunedEntry.kernel)
        .options(contains_eager(TunedEntry.device), contains_eager(TunedEntry.kernel))
        .where(Kernel.name == kernel, Kernel.backend == backend, Kernel.source_hash == kernel_hash)
    )


def _rows_of(model: Any, kernel: str | None, device_id: str | None):
    """Rows of ``model`` (TunedEntry or FailedConfig) with their device and kernel rows,
    optionally of one kernel and/or device."""
    stmt = (select(model).join(model.device).join(model.kernel)
            .options(contains_eager(model.device), contains_eager(model.kernel)))
    if kernel is not None:
        stmt = stmt.where(Kernel.name == kernel)
    if device_id is not None:
        stmt = stmt.where(Device.device_id == device_id)
    return stmt


def _listing(kernel: str | None, device_id: str | None):
    """Tuned entries in the order ``show`` and ``export`` list them."""
    return _rows_of(TunedEntry, kernel, device_id).order_by(
        Kernel.name, Kernel.backend, Device.device_id, TunedEntry.key_json)


def get_exact(db: Database, device_id: str, kernel: str, backend: str, kernel_hash: str,
              key: Mapping[str, Any]) -> Entry | None:
    """The entry for exactly this device, kernel, backend, source hash and key (or None)."""
    stmt = entries_query(kernel, backend, kernel_hash).where(
        Device.device_id == device_id, TunedEntry.key_json == key_to_json(key))
    with db.reading() as session:
        row = session.scalars(stmt).first()
        return to_entry(row) if row is not None else None


def nearest(db: Database, device_id: str, kernel: str, backend: str, kernel_hash: str,
            key: Mapping[str, Any], *, arch: str | None = None) -> Entry | None:
    """The closest entry whose key differs only in its size buckets (seq/cols nearest in log2
    first, then bh/rows): on this device, else on another device of the same arch (``arch``
    defaults to the one recorded for ``device_id``, or its ``name|arch|...`` part). Entries
    marked failed by ``verify`` are skipped."""
    if kernel not in SIZE_FIELDS:
        return None
    base, major, minor = split_key(kernel, key)
    # candidates as bare columns (cheap), then only the winner as a full entry
    stmt = (select(TunedEntry.id, TunedEntry.size_major, TunedEntry.size_minor, Device.device_id)
            .join(TunedEntry.device).join(TunedEntry.kernel)
            .where(Kernel.name == kernel, Kernel.backend == backend,
                   Kernel.source_hash == kernel_hash, TunedEntry.key_base == base,
                   TunedEntry.failed_verify == false()))
    with db.reading() as session:
        best = closest(session.execute(stmt.where(Device.device_id == device_id)), major, minor)
        if best is None:
            if arch is None:
                arch = fallback_arch(device_id, session.scalar(
                    select(Device.arch).where(Device.device_id == device_id)))
            if arch:
                rows = session.execute(stmt.where(Device.arch == arch, Device.device_id != device_id))
                best = closest(rows, major, minor)
        if best is None:
            return None
        return to_entry(session.get_one(TunedEntry, best[0]))


def entries(db: Database, kernel: str | None = None, device_id: str | None = None) -> list[Entry]:
    """Every entry (stale ones included), optionally of one kernel and/or device."""
    result: list[Entry] = []
    with db.reading() as session:
        for row in session.scalars(_listing(kernel, device_id)):
            try:
                result.append(to_entry(row))
            except ValueError as exc:
                log.warning("%s: skipping unreadable entry %s (%s)", db.location, row.id, exc)
    return result


def raw_rows(db: Database, kernel: str | None = None, device_id: str | None = None) -> list[dict[str, Any]]:
    """Entries as stored (JSON fields as text, unvalidated), in the order of :func:`entries`:
    what ``show`` validates on reading."""
    with db.reading() as session:
        return [_raw(row) for row in session.scalars(_listing(kernel, device_id))]


def devices(db: Database) -> list[dict[str, Any]]:
    """The device fingerprints known to this store."""
    with db.reading() as session:
        return [d.as_dict() for d in session.scalars(select(Device).order_by(Device.device_id))]


def count(db: Database, kernel: str | None = None) -> int:
    """Number of tuned entries (of one kernel)."""
    stmt = select(func.count(TunedEntry.id))
    if kernel is not None:
        stmt = stmt.join(TunedEntry.kernel).where(Kernel.name == kernel)
    with db.reading() as session:
        return int(session.scalar(stmt) or 0)


def failures(db: Database, kernel: str | None = None, device_id: str | None = None) -> list[dict[str, Any]]:
    """Recorded failed configs as plain dicts."""
    stmt = _rows_of(FailedConfig, kernel, device_id)
    with db.reading() as session:
        return [{
            "kernel": f.kernel.name, "backend": f.kernel.backend, "device": f.device.device_id,
            "kernel_hash": f.kernel.source_hash, "key": json.loads(f.key_json),
            "config": json.loads(f.config_json), "reason": f.reason, "detail": f.detail,
            "created_at": f.created_at,
        } for f in session.scalars(stmt.order_by(FailedConfig.id))]


def to_entry(row: TunedEntry) -> Entry:
    return Entry(
        kernel=row.kernel.name, backend=row.kernel.backend, device=row.device.as_dict(),
        kernel_hash=row.kernel.source_hash, key=json.loads(row.key_json),
        config=json.loads(row.config_json), time_ms=row.time_ms, spread_ms=row.spread_ms,
        error=row.error, trials=row.trials, strategy=row.strategy,
        provenance=json.loads(row.provenance_json or "{}"), created_at=row.created_at,
        updated_at=row.updated_at, failed_verify=bool(row.failed_verify),
    )


def _raw(row: TunedEntry) -> dict[str, Any]:
    return {
        "kernel": row.kernel.name, "backend": row.kernel.backend, "device": row.device.as_dict(),
        "kernel_hash": row.kernel.source_hash, "key": row.key_json, "config": row.config_json,
        "time_ms": row.time_ms, "spread_ms": row.spread_ms, "error": row.error,
        "trials": row.trials, "strategy": row.strategy, "provenance": row.provenance_json,
        "created_at": row.created_at, "updated_at": row.updated_at,
        "failed_verify": bool(row.failed_verify),
    }
