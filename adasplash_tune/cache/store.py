"""The config store: one SQLAlchemy database of tuned entries and failed configs.

``open_store(path_or_url)`` opens (creating or upgrading if needed) a cache: a plain path is an
SQLite file (WAL, busy timeout, ``BEGIN IMMEDIATE`` writes so concurrent tuners never lose rows);
any SQLAlchemy URL works (``sqlite://`` in memory, ``postgresql://...`` for a team cache).
Everything outside :func:`_sqlite_hooks` is dialect-neutral ORM code.

A file that is not one of our caches (random bytes, another application's database, a newer
schema) raises :class:`StoreError` with one line naming it, and is left byte-for-byte unchanged:
SQLite files are inspected through a read-only connection before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, false, func, inspect, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session, contains_eager, lazyload, sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

from ..kernels.problem import key_to_json
from .entry import SIZE_FIELDS, Entry, EntryError, entry_from_dict, split_key, validate_entry
from .locations import is_url, user_cache_location
from .migrations import upgrade
from .models import (
    APP_ID, SCHEMA_VERSION, Base, Device, FailedConfig, FailureReason, Kernel, SchemaVersion,
    TunedEntry, utcnow,
)

__all__ = [
    "open_store", "ConfigStore", "Entry", "EntryError", "ImportReport", "StoreError",
    "SchemaOutdatedError", "POLICIES",
]

log = logging.getLogger("adasplash_tune")

POLICIES = ("faster", "newer", "keep")
BUSY_TIMEOUT_S = 60.0
_SCHEMA_ATTEMPTS = 5  # opening a server database whose schema a concurrent opener is creating
_SQLITE_MAGIC = b"SQLite format 3\x00"
_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


class StoreError(RuntimeError):
    """A cache cannot be opened or used; the message is one line naming the file or URL."""


class SchemaOutdatedError(StoreError):
    """A cache has an older schema and was opened read-only, so it cannot be upgraded."""


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


# --------------------------------------------------------------------------- opening


def open_store(
    path_or_url: str | Path | None = None,
    *,
    readonly: bool = False,
    immutable: bool = False,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
) -> "ConfigStore":
    """Open the cache at ``path_or_url`` (None: ``$ADASPLASH_TUNE_CACHE`` or the default file).

    ``readonly`` never writes (nor creates, nor upgrades); ``immutable`` additionally promises
    that no one writes the SQLite file (shipped caches in a read-only install directory).
    Raises :class:`StoreError` for anything that is not an adasplash-tune cache.
    """
    location = user_cache_location(str(path_or_url) if path_or_url is not None else None)
    if not is_url(location):
        return _open_sqlite_file(Path(location).expanduser(), readonly, immutable, busy_timeout_s)
    try:
        url = make_url(location)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad location
        raise StoreError(f"{location}: not a valid database URL ({exc})") from None
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            engine = create_engine("sqlite+pysqlite://", poolclass=StaticPool,
                                   connect_args={"check_same_thread": False})
            _sqlite_hooks(engine, readonly=False, wal=False, busy_ms=int(busy_timeout_s * 1000))
            return ConfigStore._open(engine, location, readonly=readonly)
        return _open_sqlite_file(Path(database).expanduser(), readonly, immutable, busy_timeout_s)
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # noqa: BLE001 - missing driver, bad options
        raise StoreError(f"{url.render_as_string(hide_password=True)}: cannot connect ({exc})") from None
    return ConfigStore._open(engine, url.render_as_string(hide_password=True), readonly=readonly)


def _sqlite_hooks(engine: Engine, *, readonly: bool, wal: bool, busy_ms: int) -> None:
    """SQLite-only setup: busy timeout, WAL, foreign keys, and BEGIN IMMEDIATE for writers."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's begin hook below emits BEGIN
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if wal:
            _retry_locked(lambda: cursor.execute("PRAGMA journal_mode = WAL"), busy_ms)
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    begin = "BEGIN" if readonly else "BEGIN IMMEDIATE"

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)


def _retry_locked(action: Any, budget_ms: int) -> None:
    """Run ``action``, retrying while SQLite reports the database locked (switching a fresh file
    to WAL needs a moment of exclusive access, which a concurrent opener may hold)."""
    deadline = time.monotonic() + budget_ms / 1000
    delay = 0.005
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _sqlite_engine(path: Path, *, readonly: bool, immutable: bool, busy_timeout_s: float) -> Engine:
    timeout = busy_timeout_s
    if readonly:
        flags = "mode=ro" + ("&immutable=1" if immutable else "")
        uri = f"file:{quote(str(path))}?{flags}"

        def creator() -> sqlite3.Connection:
            return sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
    else:
        def creator() -> sqlite3.Connection:
            return sqlite3.connect(str(path), timeout=timeout, check_same_thread=False)

    engine = create_engine("sqlite+pysqlite://", creator=creator, poolclass=QueuePool)
    _sqlite_hooks(engine, readonly=readonly, wal=not readonly, busy_ms=int(timeout * 1000))
    return engine


def _open_sqlite_file(path: Path, readonly: bool, immutable: bool, busy_timeout_s: float) -> "ConfigStore":
    path = path.absolute()
    name = str(path)
    if path.is_dir():
        raise StoreError(f"{name}: is a directory, not a cache file")
    has_data = path.exists() and path.stat().st_size > 0
    if not path.exists() and readonly:
        raise StoreError(f"{name}: no cache file there")
    if has_data:
        with open(path, "rb") as handle:
            if handle.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise StoreError(f"{name}: not an adasplash-tune cache (not an SQLite database)")
    if has_data and not readonly:
        # Inspect through a read-only connection first: a foreign or newer file is never written.
        probe = _sqlite_engine(path, readonly=True, immutable=False, busy_timeout_s=busy_timeout_s)
        try:
            with probe.connect() as conn:
                _schema_state(conn, name)  # raises for foreign or newer files
        except SQLAlchemyError as exc:
            raise StoreError(f"{name}: unreadable SQLite database ({_orig(exc)})") from None
        finally:
            probe.dispose()
    elif not readonly:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{name}: cannot create the cache directory ({exc})") from None
    engine = _sqlite_engine(path, readonly=readonly, immutable=immutable, busy_timeout_s=busy_timeout_s)
    return ConfigStore._open(engine, name, readonly=readonly)


def _orig(exc: BaseException) -> str:
    """The driver's message of a SQLAlchemy error, on one line."""
    inner = getattr(exc, "orig", None) or exc
    return str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__


def _schema_state(conn: Connection, name: str) -> int | None:
    """The schema version of the database behind ``conn``; None when it has no tables at all.

    Raises StoreError for another application's database or a newer schema.
    """
    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    if not tables:
        return None
    foreign = StoreError(
        f"{name}: not an adasplash-tune cache (a database of another application, "
        f"tables: {', '.join(sorted(tables)[:5])}{', ...' if len(tables) > 5 else ''})"
    )
    if SchemaVersion.__tablename__ not in tables:
        raise foreign
    columns = {c["name"] for c in inspector.get_columns(SchemaVersion.__tablename__)}
    if not {"app", "version"} <= columns:
        raise foreign
    version = conn.execute(
        select(SchemaVersion.__table__.c.version).where(SchemaVersion.__table__.c.app == APP_ID)
    ).scalar()
    if version is None:
        raise foreign
    if int(version) > SCHEMA_VERSION:
        raise StoreError(
            f"{name}: cache schema version {version} is newer than this adasplash-tune supports "
            f"({SCHEMA_VERSION}); upgrade adasplash-tune to read it"
        )
    return int(version)


# --------------------------------------------------------------------------- the store


class ConfigStore:
    """Tuned entries and failed configs in one database (see the module docstring)."""

    def __init__(self, engine: Engine, location: str, *, readonly: bool) -> None:
        self.engine = engine
        self.location = location
        self.readonly = readonly
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._is_sqlite = engine.dialect.name == "sqlite"

    @classmethod
    def _open(cls, engine: Engine, location: str, *, readonly: bool) -> "ConfigStore":
        store = cls(engine, location, readonly=readonly)
        try:
            for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
                try:
                    store._prepare_schema()
                    break
                except (IntegrityError, ProgrammingError):
                    # a server database another process is creating at this moment (its tables
                    # or types "already exist"): its schema is complete once it commits
                    if store._is_sqlite or attempt == _SCHEMA_ATTEMPTS:
                        raise
                    time.sleep(0.05 * attempt)
        except StoreError:
            engine.dispose()
            raise
        except SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"{location}: cannot open the cache ({_orig(exc)})") from None
        return store

    def _prepare_schema(self) -> None:
        if self.readonly:
            with self.engine.connect() as conn:
                version = _schema_state(conn, self.location)
            if version is None:
                raise StoreError(f"{self.location}: an empty database, not an adasplash-tune cache")
            if version < SCHEMA_VERSION:
                raise SchemaOutdatedError(
                    f"{self.location}: cache schema version {version} needs an upgrade to "
                    f"{SCHEMA_VERSION}; open it once for writing (e.g. `adasplash-tune show --cache ...`)"
                )
            return
        with self.engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: one initialiser at a time
            version = _schema_state(conn, self.location)
            if version is None:
                Base.metadata.create_all(conn)
                conn.execute(SchemaVersion.__table__.insert().values(
                    app=APP_ID, version=SCHEMA_VERSION, updated_at=utcnow()))
            elif version < SCHEMA_VERSION:
                upgrade(conn, version)
                conn.execute(SchemaVersion.__table__.update()
                             .where(SchemaVersion.__table__.c.app == APP_ID)
                             .values(version=SCHEMA_VERSION, updated_at=utcnow()))

    # ---------------------------------------------------------------- plumbing

    def __enter__(self) -> "ConfigStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConfigStore({self.location!r}{', readonly' if self.readonly else ''})"

    def close(self) -> None:
        self.engine.dispose()

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.location}: opened read-only")

    def _read(self) -> Session:
        return self._sessions()

    def _entries_query(self, kernel: str, backend: str, kernel_hash: str):
        return (
            select(TunedEntry)
            .join(TunedEntry.device).join(TunedEntry.kernel)
            .options(contains_eager(TunedEntry.device), contains_eager(TunedEntry.kernel))
            .where(Kernel.name == kernel, Kernel.backend == backend, Kernel.source_hash == kernel_hash)
        )

    # ---------------------------------------------------------------- queries

    def get_exact(self, device_id: str, kernel: str, backend: str, kernel_hash: str,
                  key: Mapping[str, Any]) -> Entry | None:
        """The entry for exactly this device, kernel, backend, source hash and key (or None)."""
        stmt = self._entries_query(kernel, backend, kernel_hash).where(
            Device.device_id == device_id, TunedEntry.key_json == key_to_json(key))
        with self._read() as session, session.begin():
            row = session.scalars(stmt).first()
            return _to_entry(row) if row is not None else None

    def nearest(self, device_id: str, kernel: str, backend: str, kernel_hash: str,
                key: Mapping[str, Any], *, arch: str | None = None) -> Entry | None:
        """The closest entry whose key differs only in its size buckets (seq/cols nearest in
        log2 first, then bh/rows): on this device, else on another device of the same arch
        (``arch`` defaults to the one recorded for ``device_id``, or its ``name|arch|...`` part).
        Entries marked failed by ``verify`` are skipped."""
        if kernel not in SIZE_FIELDS:
            return None
        base, major, minor = split_key(kernel, key)
        # candidates as bare columns (cheap), then only the winner as a full entry
        stmt = (select(TunedEntry.id, TunedEntry.size_major, TunedEntry.size_minor, Device.device_id)
                .join(TunedEntry.device).join(TunedEntry.kernel)
                .where(Kernel.name == kernel, Kernel.backend == backend,
                       Kernel.source_hash == kernel_hash, TunedEntry.key_base == base,
                       TunedEntry.failed_verify == false()))
        with self._read() as session, session.begin():
            best = _closest(session.execute(stmt.where(Device.device_id == device_id)), major, minor)
            if best is None:
                if arch is None:
                    arch = session.scalar(select(Device.arch).where(Device.device_id == device_id))
                if arch is None:
                    parts = device_id.split("|")
                    arch = parts[1] if len(parts) > 1 else ""
                if arch:
                    rows = session.execute(stmt.where(Device.arch == arch, Device.device_id != device_id))
                    best = _closest(rows, major, minor)
            if best is None:
                return None
            return _to_entry(session.get_one(TunedEntry, best))

    def entries(self, kernel: str | None = None, device_id: str | None = None) -> list[Entry]:
        """Every entry (stale ones included), optionally of one kernel and/or device."""
        stmt = (select(TunedEntry).join(TunedEntry.device).join(TunedEntry.kernel)
                .options(contains_eager(TunedEntry.device), contains_eager(TunedEntry.kernel)))
        if kernel is not None:
            stmt = stmt.where(Kernel.name == kernel)
        if device_id is not None:
            stmt = stmt.where(Device.device_id == device_id)
        stmt = stmt.order_by(Kernel.name, Kernel.backend, Device.device_id, TunedEntry.key_json)
        result: list[Entry] = []
        with self._read() as session, session.begin():
            for row in session.scalars(stmt):
                try:
                    result.append(_to_entry(row))
                except ValueError as exc:
                    log.warning("%s: skipping unreadable entry %s (%s)", self.location, row.id, exc)
        return result

    def raw_rows(self) -> list[dict[str, Any]]:
        """Entries as stored (JSON fields as text, unvalidated): what an import re-validates."""
        stmt = (select(TunedEntry).join(TunedEntry.device).join(TunedEntry.kernel)
                .options(contains_eager(TunedEntry.device), contains_eager(TunedEntry.kernel))
                .order_by(TunedEntry.id))
        with self._read() as session, session.begin():
            return [_raw(row) for row in session.scalars(stmt)]

    def devices(self) -> list[dict[str, Any]]:
        """The device fingerprints known to this store."""
        with self._read() as session, session.begin():
            return [d.as_dict() for d in session.scalars(select(Device).order_by(Device.device_id))]

    def count(self, kernel: str | None = None) -> int:
        """Number of tuned entries (of one kernel)."""
        stmt = select(func.count(TunedEntry.id))
        if kernel is not None:
            stmt = stmt.join(TunedEntry.kernel).where(Kernel.name == kernel)
        with self._read() as session, session.begin():
            return int(session.scalar(stmt) or 0)

    def failures(self, kernel: str | None = None, device_id: str | None = None) -> list[dict[str, Any]]:
        """Recorded failed configs as plain dicts."""
        stmt = (select(FailedConfig).join(FailedConfig.device).join(FailedConfig.kernel)
                .options(contains_eager(FailedConfig.device), contains_eager(FailedConfig.kernel)))
        if kernel is not None:
            stmt = stmt.where(Kernel.name == kernel)
        if device_id is not None:
            stmt = stmt.where(Device.device_id == device_id)
        with self._read() as session, session.begin():
            return [{
                "kernel": f.kernel.name, "backend": f.kernel.backend, "device": f.device.device_id,
                "kernel_hash": f.kernel.source_hash, "key": json.loads(f.key_json),
                "config": json.loads(f.config_json), "reason": f.reason, "detail": f.detail,
                "created_at": f.created_at,
            } for f in session.scalars(stmt.order_by(FailedConfig.id))]

    # ---------------------------------------------------------------- writes

    def upsert_best(self, entry: Entry) -> bool:
        """Insert ``entry``, or replace the stored one only if ``entry`` is faster (or the stored
        one failed verification). Returns True if ``entry`` was stored. Invalid entries raise
        :class:`~adasplash_tune.cache.entry.EntryError` (a ValueError). The provenance gains this
        host and tool version unless the entry names them."""
        report = self._store_local(entry, "faster")
        return report.added + report.replaced > 0

    def replace(self, entry: Entry) -> None:
        """Store ``entry`` whatever the stored one's time: a re-measured entry (the tuner's
        confirmation of its winner against the default) supersedes the search's reading."""
        self._store_local(entry, "replace")

    def _store_local(self, entry: Entry, policy: str) -> ImportReport:
        """Validate one entry made on this host, stamp its provenance and merge it."""
        self._writable()
        checked = validate_entry(entry)
        checked.provenance = {**_local_provenance(), **checked.provenance}
        return self._store_valid([checked], policy)

    def upsert_many(self, entries: Iterable[Entry], policy: str = "faster") -> ImportReport:
        """Merge many entries in one transaction; invalid ones are rejected and counted."""
        self._writable()
        _check_policy(policy)
        report = ImportReport()
        valid: list[Entry] = []
        for index, entry in enumerate(entries):
            try:
                valid.append(validate_entry(entry))
            except ValueError as exc:
                report.rejected += 1
                report.reasons.append(f"entry {index}: {exc}")
        return self._store_valid(valid, policy, report)

    def record_failure(self, device: Mapping[str, Any], kernel: str, backend: str, kernel_hash: str,
                       key: Mapping[str, Any], config: Mapping[str, Any], reason: str,
                       detail: str = "") -> None:
        """Remember that ``config`` failed for this problem (reason: invalid, compile, runtime,
        timeout, accuracy or crash)."""
        self._writable()
        try:
            reason = FailureReason(reason).value
        except ValueError:
            raise ValueError(f"unknown failure reason {reason!r}; choose one of "
                             f"{[r.value for r in FailureReason]}") from None
        if not isinstance(device, Mapping) or not device.get("device_id"):
            raise ValueError("device must be a fingerprint dict with a 'device_id'")
        config_json = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)
        with self._sessions.begin() as session:
            dev = self._device_row(session, device, {})
            ker = self._kernel_row(session, kernel, backend, kernel_hash, {})
            session.add(FailedConfig(device_pk=dev.id, kernel_pk=ker.id, key_json=key_to_json(key),
                                     config_json=config_json, reason=reason, detail=str(detail),
                                     created_at=utcnow()))

    def mark_failed(self, entry: Entry) -> None:
        """Flag ``entry`` as failed verification: the loader and ``nearest`` skip it from now on."""
        self._writable()
        stmt = self._entries_query(entry.kernel, entry.backend, entry.kernel_hash).where(
            Device.device_id == entry.device_id, TunedEntry.key_json == key_to_json(entry.key))
        with self._sessions.begin() as session:
            row = session.scalars(stmt).first()
            if row is None:
                log.debug("%s: mark_failed found no entry for %s", self.location, entry.key)
                return
            row.failed_verify = True
            row.updated_at = utcnow()

    # ---------------------------------------------------------------- files

    def export(self, path: str | Path, kernel: str | None = None,
               device_id: str | None = None) -> int:
        """Write entries to ``path`` (.json, .jsonl, or .sqlite/.db); returns how many."""
        from .files import write_entries

        entries = self.entries(kernel, device_id)
        write_entries(Path(path), entries)
        return len(entries)

    def import_file(self, path: str | Path, policy: str = "faster") -> ImportReport:
        """Merge a file written by :meth:`export` (or another cache file) into this store.

        Every row is validated against the kernel declarations; invalid rows are rejected with a
        reason and counted, never stored. An unreadable file raises StoreError.
        """
        from .files import read_rows

        self._writable()
        _check_policy(policy)
        report = ImportReport()
        valid: list[Entry] = []
        for label, row in read_rows(Path(path)):
            try:
                if isinstance(row, Exception):
                    raise row
                valid.append(entry_from_dict(row))
            except ValueError as exc:
                report.rejected += 1
                report.reasons.append(f"{label}: {exc}")
        return self._store_valid(valid, policy, report)

    # ---------------------------------------------------------------- internals

    def _store_valid(self, entries: list[Entry], policy: str,
                     report: ImportReport | None = None) -> ImportReport:
        report = report if report is not None else ImportReport()
        if not entries:
            return report
        batch = _Batch(now=utcnow(), prefetch=len(entries) >= _PREFETCH_FROM)
        try:
            with self._sessions.begin() as session:
                for entry in entries:
                    outcome = self._merge_one(session, entry, policy, batch)
                    setattr(report, outcome, getattr(report, outcome) + 1)
        except SQLAlchemyError as exc:
            raise StoreError(f"{self.location}: write failed ({_orig(exc)})") from None
        return report

    def _savepoint_insert(self, session: Session, row: Any) -> bool:
        """Add ``row``; on non-SQLite dialects inside a savepoint so a concurrent insert of the
        same unique row is detected (False) instead of failing the transaction."""
        if self._is_sqlite:  # BEGIN IMMEDIATE already serialises writers
            session.add(row)
            session.flush()
            return True
        try:
            with session.begin_nested():
                session.add(row)
            return True
        except IntegrityError:
            return False

    def _device_row(self, session: Session, device: Mapping[str, Any], memo: dict[str, Device]) -> Device:
        device_id = str(device["device_id"])
        row = memo.get(device_id)
        if row is None:
            row = session.scalars(select(Device).where(Device.device_id == device_id)).first()
        if row is None:
            values = {f: device.get(f) for f in Device.FIELDS if device.get(f) is not None}
            values = {f: (int(v) if f in ("sm_count", "shared_mem") else str(v)) for f, v in values.items()}
            row = Device(device_id=device_id, **values)
            if not self._savepoint_insert(session, row):
                row = session.scalars(select(Device).where(Device.device_id == device_id)).one()
        memo[device_id] = row
        return row

    def _kernel_row(self, session: Session, name: str, backend: str, source_hash: str,
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
            if not self._savepoint_insert(session, row):
                row = session.scalars(stmt).one()
        memo[ident] = row
        return row

    def _merge_one(self, session: Session, entry: Entry, policy: str, batch: "_Batch") -> str:
        dev = self._device_row(session, entry.device, batch.devices)
        ker = self._kernel_row(session, entry.kernel, entry.backend, entry.kernel_hash, batch.kernels)
        key_json = key_to_json(entry.key)
        ident = (dev.id, ker.id, key_json)

        def stored() -> Any:
            query = select(TunedEntry).where(TunedEntry.device_pk == dev.id,
                                             TunedEntry.kernel_pk == ker.id,
                                             TunedEntry.key_json == key_json)
            # Other dialects: lock the row until commit, so that compare-then-replace is atomic
            # against a concurrent writer (SQLite's BEGIN IMMEDIATE already serialises writers).
            return query if self._is_sqlite else query.options(lazyload("*")).with_for_update(of=TunedEntry)

        row = batch.rows.get(ident)
        if row is None and batch.prefetch and self._is_sqlite:
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
            if self._is_sqlite:  # BEGIN IMMEDIATE serialises writers: no concurrent insert
                session.add(row)
                batch.rows[ident] = row
                return "added"
            if self._savepoint_insert(session, row):
                batch.rows[ident] = row
                return "added"
            row = session.scalars(stored()).one()  # a concurrent writer inserted it first
        batch.rows[ident] = row
        if not _wins(entry, row, policy):
            return "kept"
        _fill(row, entry, batch.now)
        return "replaced"


# --------------------------------------------------------------------------- helpers

_PREFETCH_FROM = 64  # batches at least this large load existing rows per (device, kernel)


@dataclass
class _Batch:
    """State of one merge transaction: rows seen or loaded so far."""

    now: datetime
    prefetch: bool
    devices: dict[str, Device] = field(default_factory=dict)
    kernels: dict[tuple[str, str, str], Kernel] = field(default_factory=dict)
    rows: dict[tuple[int, int, str], TunedEntry] = field(default_factory=dict)
    loaded: set[tuple[int, int]] = field(default_factory=set)



def _local_provenance() -> dict[str, Any]:
    """Where an entry tuned in this process comes from: host and tool version."""
    import platform

    from .. import __version__

    return {"host": platform.node(), "tool": f"adasplash-tune {__version__}"}


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown merge policy {policy!r}; choose one of {list(POLICIES)}")


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


def _closest(rows: Iterable[Any], major: int, minor: int) -> int | None:
    """Id of the candidate (id, size_major, size_minor, device_id) nearest in log2 distance:
    the major size first, then the minor one; ties go to the larger sizes."""
    def distance(row: Any) -> tuple:
        _, size_major, size_minor, device_id = row
        return (abs(math.log2(size_major) - math.log2(major)),
                abs(math.log2(size_minor) - math.log2(minor)),
                -size_major, -size_minor, device_id)

    usable = [r for r in rows if r[1] > 0 and r[2] > 0]
    return min(usable, key=distance)[0] if usable else None


def _to_entry(row: TunedEntry) -> Entry:
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

