"""Opening and guarding cache databases through SQLAlchemy.

:func:`open_database` opens (creating or upgrading if needed) a cache: a plain path is an SQLite
file (WAL, busy timeout, ``BEGIN IMMEDIATE`` writes so concurrent tuners never lose rows); any
SQLAlchemy URL works (``sqlite://`` in memory, ``postgresql://...`` for a team cache). Everything
outside :func:`_sqlite_hooks` is dialect-neutral.

A file that is not one of our caches (random bytes, another application's database, a newer
schema, a "table" that is a view) raises :class:`StoreError` with one line naming it, and is left
byte-for-byte unchanged: SQLite files are inspected through a read-only sqlite3 connection
(:mod:`.readonly`) before anything is written. A 0-byte file is an empty cache: opened read-only
it reads as one (and stays 0 bytes); opened for writing it is initialised. Read-only SQLite
engines follow :func:`.readonly.uri` (``immutable=1`` in a read-only directory). Every message
shows URLs through :func:`.locations.display_location` (password masked).
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

from .errors import SchemaOutdatedError, StoreError
from .locations import display_location, hide_password, is_url, user_cache_location
from .migrations import upgrade
from .models import APP_ID, SCHEMA_VERSION, Base, SchemaVersion, utcnow
from .readonly import check_layout, open_file, uri

__all__ = ["Database", "open_database", "BUSY_TIMEOUT_S"]

BUSY_TIMEOUT_S = 60.0
_SCHEMA_ATTEMPTS = 5  # opening a server database whose schema a concurrent opener is creating


@dataclass
class Database:
    """An open cache database: its engine, printable location, and the session factory."""

    engine: Engine
    location: str
    readonly: bool
    sessions: sessionmaker = field(init=False)
    is_sqlite: bool = field(init=False)

    def __post_init__(self) -> None:
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.is_sqlite = self.engine.dialect.name == "sqlite"

    def close(self) -> None:
        self.engine.dispose()

    def check_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.location}: opened read-only")

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session in a read transaction; database errors become StoreError naming the cache."""
        with self.guard():
            with self.sessions() as session, session.begin():
                yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A session in a write transaction (committed at the end, rolled back on error)."""
        self.check_writable()
        with self.guard("write failed"):
            with self.sessions.begin() as session:
                yield session

    @contextmanager
    def guard(self, what: str = "") -> Iterator[None]:
        """Turn database errors into one-line StoreErrors that start with the location."""
        try:
            yield
        except SQLAlchemyError as exc:
            detail = f"{what} ({_orig(exc)})" if what else _orig(exc)
            raise StoreError(f"{self.location}: {detail}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"{self.location}: {what + ': ' if what else ''}{exc}") from None


def open_database(
    path_or_url: str | Path | None = None,
    *,
    readonly: bool = False,
    immutable: bool = False,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
) -> Database:
    """Open the cache at ``path_or_url`` (None: ``$ADASPLASH_TUNE_CACHE`` or the default file).

    ``readonly`` never writes (nor creates, nor upgrades); ``immutable`` additionally promises
    that no one writes the SQLite file (shipped caches in a read-only install directory).
    Raises :class:`StoreError` for anything that is not an adasplash-tune cache.
    """
    location = user_cache_location(str(path_or_url) if path_or_url is not None else None)
    if not is_url(location):
        return _open_sqlite_file(Path(location).expanduser(), readonly, immutable, busy_timeout_s)
    shown = display_location(location)
    try:
        url = make_url(location)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad location
        raise StoreError(f"{shown}: not a valid database URL ({hide_password(str(exc), location)})") from None
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            return _in_memory(shown, readonly, busy_timeout_s)
        return _open_sqlite_file(Path(database).expanduser(), readonly, immutable, busy_timeout_s)
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # noqa: BLE001 - missing driver, bad options
        raise StoreError(f"{shown}: cannot connect ({hide_password(str(exc), location)})") from None
    return _prepared(engine, shown, readonly)


def _in_memory(location: str, readonly: bool, busy_timeout_s: float) -> Database:
    engine = create_engine("sqlite+pysqlite://", poolclass=StaticPool,
                           connect_args={"check_same_thread": False})
    _sqlite_hooks(engine, readonly=False, wal=False, busy_ms=int(busy_timeout_s * 1000))
    if readonly:  # an empty cache (a 0-byte file): create its tables, then only read
        _prepared(engine, location, False)
    return _prepared(engine, location, readonly)


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
        target = uri(path, immutable=immutable)

        def creator() -> sqlite3.Connection:
            return sqlite3.connect(target, uri=True, timeout=timeout, check_same_thread=False)
    else:
        def creator() -> sqlite3.Connection:
            return sqlite3.connect(str(path), timeout=timeout, check_same_thread=False)

    engine = create_engine("sqlite+pysqlite://", creator=creator, poolclass=QueuePool)
    _sqlite_hooks(engine, readonly=readonly, wal=not readonly, busy_ms=int(timeout * 1000))
    return engine


def _open_sqlite_file(path: Path, readonly: bool, immutable: bool, busy_timeout_s: float) -> Database:
    path = path.absolute()
    name = str(path)
    if path.is_dir():
        raise StoreError(f"{name}: is a directory, not a cache file")
    if not path.exists():
        if readonly:
            raise StoreError(f"{name}: no cache file there")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{name}: cannot create the cache directory ({exc})") from None
    else:
        # Inspect through a read-only connection first: a foreign or newer file is never written.
        probe = open_file(path, immutable=immutable)
        if probe is None:  # 0 bytes: an empty cache
            if readonly:
                return _in_memory(name, True, busy_timeout_s)
        else:
            try:
                check_layout(probe, name, accept_older=True)
            except sqlite3.Error as exc:
                raise StoreError(f"{name}: unreadable SQLite database ({exc})") from None
            finally:
                probe.close()
        if not readonly:
            _check_can_write(path)
    engine = _sqlite_engine(path, readonly=readonly, immutable=immutable, busy_timeout_s=busy_timeout_s)
    return _prepared(engine, name, readonly)


def _check_can_write(path: Path) -> None:
    """Refuse, before any work, a cache that this process could read but never write."""
    if not os.access(path, os.W_OK):
        raise StoreError(f"{path}: the cache file is read-only (open it read-only, or make it writable)")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"{path}: its directory is read-only (SQLite needs to create its journal there)")


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


def _prepared(engine: Engine, location: str, readonly: bool) -> Database:
    """The database behind ``engine``, its schema checked (and created or upgraded unless
    ``readonly``); the engine is disposed when that fails."""
    db = Database(engine, location, readonly)
    try:
        for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
            try:
                _prepare_schema(db)
                break
            except (IntegrityError, ProgrammingError):
                # a server database another process is creating at this moment (its tables
                # or types "already exist"): its schema is complete once it commits
                if db.is_sqlite or attempt == _SCHEMA_ATTEMPTS:
                    raise
                time.sleep(0.05 * attempt)
    except StoreError:
        engine.dispose()
        raise
    except (SQLAlchemyError, sqlite3.Error) as exc:
        engine.dispose()
        raise StoreError(f"{location}: cannot open the cache ({_orig(exc)})") from None
    return db


def _prepare_schema(db: Database) -> None:
    if db.readonly:
        with db.engine.connect() as conn:
            version = _schema_state(conn, db.location)
        if version is None:
            raise StoreError(f"{db.location}: an empty database, not an adasplash-tune cache")
        if version < SCHEMA_VERSION:
            raise SchemaOutdatedError(
                f"{db.location}: cache schema version {version} needs an upgrade to "
                f"{SCHEMA_VERSION}; open it once for writing (e.g. `adasplash-tune show --cache ...`)"
            )
        return
    with db.engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: one initialiser at a time
        version = _schema_state(conn, db.location)
        if version is None:
            Base.metadata.create_all(conn)
            conn.execute(SchemaVersion.__table__.insert().values(
                app=APP_ID, version=SCHEMA_VERSION, updated_at=utcnow()))
        elif version < SCHEMA_VERSION:
            upgrade(conn, version)
            conn.execute(SchemaVersion.__table__.update()
                         .where(SchemaVersion.__table__.c.app == APP_ID)
                         .values(version=SCHEMA_VERSION, updated_at=utcnow()))
