"""Writing to a cache database: merging entries under a policy, failed configs, verify flags.

Policies decide which entry a key keeps when one is already stored: ``faster`` (the lower time;
an entry that failed verification always loses), ``newer`` (the later ``updated_at``), ``keep``
(the stored one). Internally ``replace`` always takes the incoming entry (the tuner's confirmed
winner). Every entry written here has passed :func:`.validation.storable`; a batch is written in
one transaction, so an import stores all its valid rows or none.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, lazyload

from ..kernels.problem import key_to_json
from .database import Database
from .entry import Entry, split_key
from .models import Device, FailedConfig, FailureReason, Kernel, TunedEntry, utcnow
from .queries import entries_query
from .validation import device_values

__all__ = ["POLICIES", "ImportReport", "check_policy", "store_entries", "record_failure", "mark_failed",
           "local_provenance"]

log = logging.getLogger("adasplash_tune")

POLICIES = ("faster", "newer", "keep")
_OLDEST = datetime.min.replace(tzinfo=timezone.utc)
_PREFETCH_FROM = 64  # batches at least this large load existing rows per (device, kernel)


@dataclass
class ImportReport:
    """What an import or merge did: rows added, replaced, kept (existing row won), rejected."""

    added: int = 0
    replaced: int = 0
    kept: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "replaced": self.replaced, "kept": self.kept,
                "rejected": self.rejected, "reasons": list(self.reasons)}


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown merge policy {policy!r}; choose one of {list(POLICIES)}")


def local_provenance() -> dict[str, Any]:
    """Where an entry tuned in this process comes from: host and tool version."""
    import platform

    from .. import __version__

    return {"host": platform.node(), "tool": f"adasplash-tune {__version__}"}


# --------------------------------------------------------------------------- entries


@dataclass
class _Batch:
    """State of one merge transaction: rows seen or loaded so far."""

    now: datetime
    prefetch: bool
    devices: dict[str, Device] = field(default_factory=dict)
    kernels: dict[tuple[str, str, str], Kernel] = field(default_factory=dict)
    rows: dict[tuple[int, int, str], TunedEntry] = field(default_factory=dict)
    loaded: set[tuple[int, int]] = field(default_factory=set)


def store_entries(db: Database, entries: list[Entry], policy: str,
                  report: ImportReport | None = None) -> ImportReport:
    """Merge checked ``entries`` into ``db`` in one transaction; counts go to ``report``."""
    report = report if report is not None else ImportReport()
    if not entries:
        return report
    batch = _Batch(now=utcnow(), prefetch=len(entries) >= _PREFETCH_FROM)
    with db.writing() as session:
        for entry in entries:
            outcome = _merge_one(db, session, entry, policy, batch)
            setattr(report, outcome, getattr(report, outcome) + 1)
    return report


def _savepoint_insert(db: Database, session: Session, row: Any) -> bool:
    """Add ``row``; on non-SQLite dialects inside a savepoint so a concurrent insert of the
    same unique row is detected (False) instead of failing the transaction."""
    if db.is_sqlite:  # BEGIN IMMEDIATE already serialises writers
        session.add(row)
        session.flush()
        return True
    try:
        with session.begin_nested():
            session.add(row)
        return True
    except IntegrityError:
        return False


def _device_row(db: Database, session: Session, device: Mapping[str, Any], memo: dict[str, Device]) -> Device:
    values = device_values(device)
    device_id = values.pop("device_id")
    row = memo.get(device_id)
    if row is None:
        row = session.scalars(select(Device).where(Device.device_id == device_id)).first()
    if row is None:
        row = Device(device_id=device_id, **values)
        if not _savepoint_insert(db, session, row):
            row = session.scalars(select(Device).where(Device.device_id == device_id)).one()
    memo[device_id] = row
    return row


def _kernel_row(db: Database, session: Session, name: str, backend: str, source_hash: str,
                memo: dict[tuple[str, str, str], Kernel]) -> Kernel:
    ident = (name, backend, source_hash)
    row = memo.get(ident)
    if row is not None:
        return row
    stmt = select(Kernel).where(Kernel.name == name, Kernel.backend == backend,
                                Kernel.source_hash == source_hash)
    row = session.scalars(stmt).first()
    if row is None:
        row = Kernel(name=name, backend=backend, source_hash=source_hash)
        if not _savepoint_insert(db, session, row):
            row = session.scalars(stmt).one()
    memo[ident] = row
    return row


def _merge_one(db: Database, session: Session, entry: Entry, policy: str, batch: _Batch) -> str:
    dev = _device_row(db, session, entry.device, batch.devices)
    ker = _kernel_row(db, session, entry.kernel, entry.backend, entry.kernel_hash, batch.kernels)
    key_json = key_to_json(entry.key)
    ident = (dev.id, ker.id, key_json)

    def stored() -> Any:
        query = select(TunedEntry).where(TunedEntry.device_pk == dev.id,
                                         TunedEntry.kernel_pk == ker.id,
                                         TunedEntry.key_json == key_json)
        # Other dialects: lock the row until commit, so that compare-then-replace is atomic
        # against a concurrent writer (SQLite's BEGIN IMMEDIATE already serialises writers).
        return query if db.is_sqlite else query.options(lazyload("*")).with_for_update(of=TunedEntry)

    row = batch.rows.get(ident)
    if row is None and batch.prefetch and db.is_sqlite:
        # large batches: one query per (device, kernel) instead of one per entry
        if (dev.id, ker.id) not in batch.loaded:
            batch.loaded.add((dev.id, ker.id))
            for found in session.scalars(
                    select(TunedEntry).options(lazyload("*"))
                    .where(TunedEntry.device_pk == dev.id, TunedEntry.kernel_pk == ker.id)):
                batch.rows[(found.device_pk, found.kernel_pk, found.key_json)] = found
            row = batch.rows.get(ident)
    elif row is None:
        row = session.scalars(stored()).first()
    if row is None:
        row = TunedEntry(device_pk=dev.id, kernel_pk=ker.id, key_json=key_json,
                         created_at=entry.created_at or batch.now)
        _fill(row, entry, batch.now)
        if db.is_sqlite:  # BEGIN IMMEDIATE serialises writers: no concurrent insert
            session.add(row)
            batch.rows[ident] = row
            return "added"
        if _savepoint_insert(db, session, row):
            batch.rows[ident] = row
            return "added"
        row = session.scalars(stored()).one()  # a concurrent writer inserted it first
    batch.rows[ident] = row
    if not _wins(entry, row, policy):
        return "kept"
    _fill(row, entry, batch.now)
    return "replaced"


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))


def _fill(row: TunedEntry, entry: Entry, now: datetime) -> None:
    base, major, minor = split_key(entry.kernel, entry.key)
    row.config_json = _dumps(entry.config)
    row.time_ms, row.spread_ms, row.error = entry.time_ms, entry.spread_ms, entry.error
    row.trials, row.strategy = entry.trials, entry.strategy
    row.provenance_json = _dumps(entry.provenance)
    row.updated_at = entry.updated_at or now
    row.key_base, row.size_major, row.size_minor = base, major, minor
    row.failed_verify = entry.failed_verify


def _wins(new: Entry, old: TunedEntry, policy: str) -> bool:
    """Does the incoming entry replace the stored row under ``policy``?"""
    if policy == "keep":
        return False
    if policy == "replace":  # internal: ConfigStore.replace
        return True
    if policy == "newer":
        return (new.updated_at or _OLDEST) > (old.updated_at or _OLDEST)
    if old.failed_verify != new.failed_verify:
        return old.failed_verify
    new_t = new.time_ms if new.time_ms is not None else math.inf
    old_t = old.time_ms if old.time_ms is not None else math.inf
    return new_t < old_t


# --------------------------------------------------------------------------- other writes


def record_failure(db: Database, device: Mapping[str, Any], kernel: str, backend: str, kernel_hash: str,
                   key: Mapping[str, Any], config: Mapping[str, Any], reason: str, detail: str = "") -> None:
    """Remember that ``config`` failed for this problem (reason: invalid, compile, runtime,
    timeout, accuracy or crash)."""
    db.check_writable()
    try:
        reason = FailureReason(reason).value
    except ValueError:
        raise ValueError(f"unknown failure reason {reason!r}; choose one of "
                         f"{[r.value for r in FailureReason]}") from None
    if not isinstance(device, Mapping) or not device.get("device_id"):
        raise ValueError("device must be a fingerprint dict with a 'device_id'")
    config_json = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)
    with db.writing() as session:
        dev = _device_row(db, session, device, {})
        ker = _kernel_row(db, session, kernel, backend, kernel_hash, {})
        session.add(FailedConfig(device_pk=dev.id, kernel_pk=ker.id, key_json=key_to_json(key),
                                 config_json=config_json, reason=reason, detail=str(detail),
                                 created_at=utcnow()))


def mark_failed(db: Database, entry: Entry) -> None:
    """Flag ``entry`` as failed verification: the loader and ``nearest`` skip it from now on."""
    stmt = entries_query(entry.kernel, entry.backend, entry.kernel_hash).where(
        Device.device_id == entry.device_id, TunedEntry.key_json == key_to_json(entry.key))
    with db.writing() as session:
        row = session.scalars(stmt).first()
        if row is None:
            log.debug("%s: mark_failed found no entry for %s", db.location, entry.key)
            return
        row.failed_verify = True
        row.updated_at = utcnow()
