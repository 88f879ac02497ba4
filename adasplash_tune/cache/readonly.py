"""Reading a cache file through the standard library's sqlite3: read-only, guarded, no SQLAlchemy.

Used wherever a cache file is only read: call-time lookups (:mod:`.lookup`), imports of a file
(:mod:`.files`), and SQLAlchemy's read-only engines (:mod:`.database`) share :func:`uri`.

* :func:`uri` opens with ``mode=ro``, plus ``immutable=1`` when the caller promises that no one
  writes the file (shipped caches) or when the file's directory is not writable: a WAL database
  needs its ``-shm`` file, which SQLite cannot create there, so it is read as an immutable
  snapshot instead (logged once per file).
* :func:`check_layout` reads ``sqlite_master`` once: the cache's tables must be real tables (a
  view or a virtual table can generate any number of rows from a few bytes of file) and
  ``schema_version`` must name this application at a version this code reads.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from .errors import SchemaOutdatedError, StoreError
from .layout import APP_ID, SCHEMA_VERSION, TABLES

__all__ = ["SQLITE_MAGIC", "uri", "connect", "open_file", "check_layout", "columns_of"]

log = logging.getLogger("adasplash_tune")

SQLITE_MAGIC = b"SQLite format 3\x00"
_NOTED: set[str] = set()


def _directory_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def uri(path: Path, *, immutable: bool = False) -> str:
    """The read-only SQLite URI of ``path`` (see the module docstring)."""
    path = path.absolute()
    if not immutable and not _directory_writable(path.parent):
        immutable = True
        if str(path) not in _NOTED:
            _NOTED.add(str(path))
            log.info("config cache %s is in a read-only directory: reading it as an immutable "
                     "snapshot (no -wal/-shm files)", path)
    return f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")


def connect(path: Path, *, immutable: bool = False) -> sqlite3.Connection:
    """A read-only connection to the SQLite file ``path``; text that is not UTF-8 arrives with
    its bad bytes as lone surrogates (the row is then rejected, not the whole read)."""
    conn = sqlite3.connect(uri(path, immutable=immutable), uri=True, check_same_thread=False)
    conn.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA trusted_schema = OFF")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def open_file(path: Path, *, immutable: bool = False) -> sqlite3.Connection | None:
    """:func:`connect` to an existing SQLite file, checked first; None for a 0-byte file (an
    empty cache). Raises StoreError naming the file for a directory, a missing file, or one that
    is not an SQLite database."""
    name = str(path)
    if path.is_dir():
        raise StoreError(f"{name}: is a directory, not a cache file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        raise StoreError(f"{name}: no cache file there") from None
    except OSError as exc:
        raise StoreError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not head:
        return None
    if head != SQLITE_MAGIC:
        raise StoreError(f"{name}: not an adasplash-tune cache (not an SQLite database)")
    try:
        return connect(path, immutable=immutable)
    except sqlite3.Error as exc:
        raise StoreError(f"{name}: unreadable SQLite database ({exc})") from None


def _foreign(name: str, tables: list[str], detail: str = "") -> StoreError:
    shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
    return StoreError(f"{name}: not an adasplash-tune cache (a database of another application, "
                      f"tables: {shown}{detail})")


def check_layout(conn: sqlite3.Connection, name: str, *, accept_older: bool = False) -> int | None:
    """The schema version of the database behind ``conn``; None when it has no tables at all.

    Raises StoreError (one line starting with ``name``) for another application's database, a
    newer schema, or one of our tables that is not a plain table; SchemaOutdatedError for an
    older schema unless ``accept_older``.
    """
    objects = conn.execute(
        "SELECT name, type, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
    kinds = {row[0]: (row[1], row[2] or "") for row in objects}
    tables = [n for n, (kind, _) in kinds.items() if kind == "table"]
    if not objects:
        return None
    for table in TABLES:
        kind, sql = kinds.get(table, ("table", ""))
        if kind != "table":
            raise StoreError(f"{name}: not an adasplash-tune cache ({table} is a {kind}, not a table)")
        if sql.lstrip().upper().startswith("CREATE VIRTUAL"):
            raise StoreError(f"{name}: not an adasplash-tune cache ({table} is a virtual table)")
    if "schema_version" not in tables:
        raise _foreign(name, tables or list(kinds))
    try:
        row = conn.execute("SELECT version FROM schema_version WHERE app = ? LIMIT 1", (APP_ID,)).fetchone()
    except sqlite3.OperationalError:  # no such column: someone else's schema_version
        raise _foreign(name, tables) from None
    if row is None or not isinstance(row[0], int):
        raise _foreign(name, tables)
    version = row[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"{name}: cache schema version {version} is newer than this adasplash-tune "
                         f"supports ({SCHEMA_VERSION}); upgrade adasplash-tune to read it")
    missing = [t for t in TABLES if t not in tables]
    if missing:
        raise _foreign(name, tables, f"; no {', '.join(missing)}")
    if version < SCHEMA_VERSION and not accept_older:
        raise SchemaOutdatedError(
            f"{name}: cache schema version {version} needs an upgrade to {SCHEMA_VERSION}; open it "
            f"once for writing (e.g. `adasplash-tune show --cache ...`)")
    return version


def columns_of(conn: sqlite3.Connection, table: str) -> set[str]:
    """The column names of one of our tables (older layouts lack some)."""
    assert table in TABLES
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
