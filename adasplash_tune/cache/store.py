"""The config store: one database of tuned entries and failed configs, behind one class.

``open_store(path_or_url)`` opens (creating or upgrading if needed) a cache: a plain path is an
SQLite file, any SQLAlchemy URL works (``sqlite://`` in memory, ``postgresql://...`` for a team
cache). :class:`ConfigStore` is the one object the tuner, the CLI and the tests hold; each of its
jobs lives in a module of its own:

===================  ===========================================================================
:mod:`.database`     opening and guarding databases (SQLite setup, schema checks, upgrades)
:mod:`.queries`      reading: exact and nearest lookups, listings, counts
:mod:`.merge`        writing: merge policies, failed configs, verify flags
:mod:`.transfer`     import and export of portable files (:mod:`.files` is their codec)
:mod:`.validation`   what an entry must satisfy to be written (declarations, column limits)
:mod:`.lookup`       call-time reads of cache files through sqlite3 (used by :mod:`.loader`)
===================  ===========================================================================

The names other modules have always imported from here (``Entry``, ``EntryError``,
``StoreError``, ``SchemaOutdatedError``, ``ImportReport``, ``POLICIES``) are re-exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from sqlalchemy import Engine

from . import merge, queries, transfer
from .database import BUSY_TIMEOUT_S, Database, open_database
from .entry import Entry
from .errors import EntryError, SchemaOutdatedError, StoreError
from .merge import POLICIES, ImportReport, check_policy, local_provenance, store_entries
from .validation import storable

__all__ = [
    "open_store", "ConfigStore", "Entry", "EntryError", "ImportReport", "StoreError",
    "SchemaOutdatedError", "POLICIES",
]


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
    return ConfigStore(open_database(path_or_url, readonly=readonly, immutable=immutable,
                                     busy_timeout_s=busy_timeout_s))


class ConfigStore:
    """Tuned entries and failed configs in one database (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def engine(self) -> Engine:
        return self._db.engine

    @property
    def location(self) -> str:
        """The file or URL, printable (a URL's password is masked)."""
        return self._db.location

    @property
    def readonly(self) -> bool:
        return self._db.readonly

    def __enter__(self) -> "ConfigStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConfigStore({self.location!r}{', readonly' if self.readonly else ''})"

    def close(self) -> None:
        self._db.close()

    # ---------------------------------------------------------------- queries

    def get_exact(self, device_id: str, kernel: str, backend: str, kernel_hash: str,
                  key: Mapping[str, Any]) -> Entry | None:
        """The entry for exactly this device, kernel, backend, source hash and key (or None)."""
        return queries.get_exact(self._db, device_id, kernel, backend, kernel_hash, key)

    def nearest(self, device_id: str, kernel: str, backend: str, kernel_hash: str,
                key: Mapping[str, Any], *, arch: str | None = None) -> Entry | None:
        """The closest entry whose key differs only in its size buckets (see
        :func:`.queries.nearest`); entries marked failed by ``verify`` are skipped."""
        return queries.nearest(self._db, device_id, kernel, backend, kernel_hash, key, arch=arch)

    def entries(self, kernel: str | None = None, device_id: str | None = None) -> list[Entry]:
        """Every entry (stale ones included), optionally of one kernel and/or device."""
        return queries.entries(self._db, kernel, device_id)

    def raw_rows(self, kernel: str | None = None, device_id: str | None = None) -> list[dict[str, Any]]:
        """Entries as stored (JSON fields as text, unvalidated), in the order of :meth:`entries`."""
        return queries.raw_rows(self._db, kernel, device_id)

    def devices(self) -> list[dict[str, Any]]:
        """The device fingerprints known to this store."""
        return queries.devices(self._db)

    def count(self, kernel: str | None = None) -> int:
        """Number of tuned entries (of one kernel)."""
        return queries.count(self._db, kernel)

    def failures(self, kernel: str | None = None, device_id: str | None = None) -> list[dict[str, Any]]:
        """Recorded failed configs as plain dicts."""
        return queries.failures(self._db, kernel, device_id)

    # ---------------------------------------------------------------- writes

    def upsert_best(self, entry: Entry) -> bool:
        """Insert ``entry``, or replace the stored one only if ``entry`` is faster (or the stored
        one failed verification). Returns True if ``entry`` was stored. Invalid entries raise
        :class:`~adasplash_tune.cache.errors.EntryError` (a ValueError). The provenance gains this
        host and tool version unless the entry names them."""
        report = self._store_local(entry, "faster")
        return report.added + report.replaced > 0

    def replace(self, entry: Entry) -> None:
        """Store ``entry`` whatever the stored one's time: a re-measured entry (the tuner's
        confirmation of its winner against the default) supersedes the search's reading."""
        self._store_local(entry, "replace")

    def _store_local(self, entry: Entry, policy: str) -> ImportReport:
        """Validate one entry made on this host, stamp its provenance and merge it."""
        self._db.check_writable()
        checked = storable(entry)
        checked.provenance = {**local_provenance(), **checked.provenance}
        return store_entries(self._db, [checked], policy)

    def upsert_many(self, entries: Iterable[Entry], policy: str = "faster") -> ImportReport:
        """Merge many entries in one transaction; invalid ones are rejected and counted."""
        self._db.check_writable()
        check_policy(policy)
        report = ImportReport()
        valid: list[Entry] = []
        for index, entry in enumerate(entries):
            try:
                valid.append(storable(entry))
            except (ValueError, TypeError, OverflowError) as exc:
                report.rejected += 1
                report.reasons.append(f"entry {index}: {exc}")
        return store_entries(self._db, valid, policy, report)

    def record_failure(self, device: Mapping[str, Any], kernel: str, backend: str, kernel_hash: str,
                       key: Mapping[str, Any], config: Mapping[str, Any], reason: str,
                       detail: str = "") -> None:
        """Remember that ``config`` failed for this problem (reason: invalid, compile, runtime,
        timeout, accuracy or crash)."""
        merge.record_failure(self._db, device, kernel, backend, kernel_hash, key, config, reason, detail)

    def mark_failed(self, entry: Entry) -> None:
        """Flag ``entry`` as failed verification: the loader and ``nearest`` skip it from now on."""
        merge.mark_failed(self._db, entry)

    # ---------------------------------------------------------------- files

    def export(self, path: str | Path, kernel: str | None = None,
               device_id: str | None = None) -> int:
        """Write entries to ``path`` (.json, .jsonl, or .sqlite/.db); returns how many."""
        entries = self.entries(kernel, device_id)
        transfer.write_entries(Path(path), entries)
        return len(entries)

    def import_file(self, path: str | Path, policy: str = "faster") -> ImportReport:
        """Merge a file written by :meth:`export` (or another cache file) into this store.

        Every row is validated against the kernel declarations and the schema's limits;
        invalid rows are rejected with a reason naming the file and row, and counted, never
        stored. An unreadable file raises StoreError.
        """
        return transfer.import_file(self._db, Path(path), policy)
