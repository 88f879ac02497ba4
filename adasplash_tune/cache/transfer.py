"""Import and export: moving entries between a cache database and portable files.

An export writes through :mod:`.files` (JSON, JSON lines) or builds a fresh cache database in a
temporary file (``.sqlite``/``.db``, journal mode DELETE: one self-contained file readable
read-only), renamed into place when complete. An import reads a file's rows through :mod:`.files`
(bounded: untrusted input), checks each one with :func:`.validation.storable_row`, rejects the
bad ones with a reason naming the file and the row, and merges the valid ones in one transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable

from .database import Database, open_database
from .entry import Entry
from .files import export_format, read_rows, replacing, write_json, write_jsonl
from .merge import ImportReport, check_policy, store_entries
from .validation import storable_row

__all__ = ["write_entries", "import_file"]


def write_entries(path: Path, entries: Iterable[Entry]) -> None:
    """Write ``entries`` to ``path``; its suffix picks the format (ValueError for another)."""
    kind = export_format(path)
    with replacing(path) as tmp:  # SQLite makes its database in the empty file
        if kind == "jsonl":
            write_jsonl(tmp, entries)
        elif kind == "json":
            write_json(tmp, entries)
        else:
            _write_sqlite(tmp, list(entries))


def _write_sqlite(path: Path, entries: list[Entry]) -> None:
    db = open_database(path)
    try:
        store_entries(db, entries, "keep")
    finally:
        db.close()
    con = sqlite3.connect(str(path))
    try:
        con.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, readable read-only
    finally:
        con.close()


def import_file(db: Database, path: Path, policy: str = "faster") -> ImportReport:
    """Merge the entries of ``path`` into ``db``. Every row is validated; invalid rows are
    rejected with a reason and counted, never stored. An unreadable file raises StoreError."""
    db.check_writable()
    check_policy(policy)
    report = ImportReport()
    valid: list[Entry] = []
    for label, row in read_rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            valid.append(storable_row(row))
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # one bad row never cancels the import: it is rejected, naming the file and row
            report.rejected += 1
            report.reasons.append(f"{label}: {exc}")
    return store_entries(db, valid, policy, report)
