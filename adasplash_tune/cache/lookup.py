"""Call-time lookups in a cache file through the standard library's sqlite3.

The selection path reads one row per new problem key, so it skips everything the SQLAlchemy
store pays for: no engine, no ORM, no schema reflection — one read-only connection per file
(:mod:`.readonly`), one check of ``sqlite_master`` when it opens, then one indexed SELECT per
lookup. The answers are those of :meth:`ConfigStore.get_exact` and :meth:`ConfigStore.nearest`
(tests/cache/test_lookup.py compares both over the same files). Writes, the CLI, the tuner and
server URLs keep using the SQLAlchemy store.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from ..kernels.problem import key_to_json
from .entry import SIZE_FIELDS, Entry, split_key
from .errors import StoreError
from .layout import DEVICE_FIELDS
from .nearest import closest, fallback_arch
from .readonly import check_layout, open_file

__all__ = ["FileLookup"]

# every column of an entry, in the order _entry reads them
_COLUMNS = ", ".join(
    ["k.name", "k.backend", "k.source_hash", "d.device_id"] + [f"d.{f}" for f in DEVICE_FIELDS]
    + [f"t.{c}" for c in ("key_json", "config_json", "time_ms", "spread_ms", "error", "trials",
                           "strategy", "provenance_json", "created_at", "updated_at", "failed_verify")])
_FROM = ("FROM tuned_entries t JOIN kernels k ON k.id = t.kernel_pk JOIN devices d ON d.id = t.device_pk "
         "WHERE k.name = ? AND k.backend = ? AND k.source_hash = ?")
# the unique indexes on kernels (name, backend, source_hash), devices (device_id) and
# tuned_entries (device_pk, kernel_pk, key_json) serve this one
_EXACT = f"SELECT {_COLUMNS} {_FROM} AND d.device_id = ? AND t.key_json = ?"
# ix_tuned_entries_lookup (kernel_pk, key_base) serves this one; own_arch is the arch recorded
# for the asking device (NULL when it is unknown)
_NEAREST = (f"SELECT t.id, t.size_major, t.size_minor, d.device_id, d.arch, "
            f"(SELECT arch FROM devices WHERE device_id = ?), {_COLUMNS} "
            f"{_FROM} AND t.key_base = ? AND t.failed_verify = 0")


def _time(value: Any) -> datetime | None:
    """A timestamp as the store writes it (naive UTC text), as the store returns it."""
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)


def _entry(row: tuple) -> Entry:
    name, backend, source_hash, device_id = row[:4]
    rest = 4 + len(DEVICE_FIELDS)
    device = dict(zip(DEVICE_FIELDS, row[4:rest]), device_id=device_id)
    (key_json, config_json, time_ms, spread_ms, error, trials, strategy, provenance_json,
     created_at, updated_at, failed_verify) = row[rest:]
    return Entry(
        kernel=name, backend=backend, device=device, kernel_hash=source_hash,
        key=json.loads(key_json), config=json.loads(config_json), time_ms=time_ms,
        spread_ms=spread_ms, error=error, trials=trials, strategy=strategy,
        provenance=json.loads(provenance_json or "{}"), created_at=_time(created_at),
        updated_at=_time(updated_at), failed_verify=bool(failed_verify),
    )


class FileLookup:
    """Read-only lookups in one cache file (see the module docstring). A 0-byte file is an
    empty cache. Thread-safe for the loader, which holds its lock around every call."""

    def __init__(self, path: Path, conn: sqlite3.Connection | None) -> None:
        self.location = str(path)
        self._conn = conn

    @classmethod
    def open(cls, path: Path, *, immutable: bool = False) -> "FileLookup":
        """Open ``path`` read-only (``immutable``: no one writes it, e.g. a shipped cache).
        Raises StoreError for anything that is not a current adasplash-tune cache, and
        SchemaOutdatedError for an older one."""
        path = path.absolute()
        conn = open_file(path, immutable=immutable)
        if conn is not None:
            try:
                if check_layout(conn, str(path)) is None:
                    raise StoreError(f"{path}: an empty database, not an adasplash-tune cache")
            except StoreError:
                conn.close()
                raise
            except sqlite3.Error as exc:
                conn.close()
                raise StoreError(f"{path}: unreadable SQLite database ({exc})") from None
        return cls(path, conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"FileLookup({self.location!r})"

    def _rows(self, sql: str, args: tuple) -> list[tuple]:
        if self._conn is None:
            return []
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.location}: {exc}") from None

    def get_exact(self, device_id: str, kernel: str, backend: str, kernel_hash: str,
                  key: Mapping[str, Any]) -> Entry | None:
        """The entry for exactly this device, kernel, backend, source hash and key (or None)."""
        rows = self._rows(_EXACT, (kernel, backend, kernel_hash, device_id, key_to_json(key)))
        return _entry(rows[0]) if rows else None

    def nearest(self, device_id: str, kernel: str, backend: str, kernel_hash: str,
                key: Mapping[str, Any], *, arch: str | None = None) -> Entry | None:
        """The closest entry whose key differs only in its size buckets: on this device, else
        on another device of the same arch (the rule of :meth:`ConfigStore.nearest`)."""
        if kernel not in SIZE_FIELDS:
            return None
        base, major, minor = split_key(kernel, key)
        rows = self._rows(_NEAREST, (device_id, kernel, backend, kernel_hash, base))
        best = closest([r for r in rows if r[3] == device_id], major, minor)
        if best is None and rows:
            if arch is None:
                arch = fallback_arch(device_id, rows[0][5])  # [5]: the arch recorded for device_id
            if arch:
                best = closest([r for r in rows if r[4] == arch and r[3] != device_id], major, minor)
        return None if best is None else _entry(best[6:])
