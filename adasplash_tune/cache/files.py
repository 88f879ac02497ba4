"""Portable cache files: what ``export`` writes and ``import`` reads.

Formats (chosen by content for reading, by suffix for writing):

* ``.json``  ``{"format": "adasplash-tune-cache", "schema_version": N, "entries": [...]}``
  (a bare list of entries is read too); each entry is :meth:`Entry.to_dict` output.
* ``.jsonl`` one entry object per line (a malformed line rejects only that line).
* ``.sqlite`` / ``.db`` a cache database (journal mode DELETE: one self-contained file).

Reading yields raw rows; the store validates each one. Writing goes to a temporary file in the
target directory and is renamed into place, so a failed export never leaves half a file.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from .entry import Entry, EntryError
from .models import SCHEMA_VERSION

__all__ = ["FORMAT", "SQLITE_SUFFIXES", "write_entries", "read_rows"]

FORMAT = "adasplash-tune-cache"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_JSON_SUFFIXES = (".json", ".jsonl")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _store_error(message: str) -> Exception:
    from .store import StoreError

    return StoreError(message)


# --------------------------------------------------------------------------- writing


def write_entries(path: Path, entries: Iterable[Entry]) -> None:
    """Write ``entries`` to ``path``; the suffix picks the format."""
    suffix = path.suffix.lower()
    if suffix not in SQLITE_SUFFIXES + _JSON_SUFFIXES:
        raise ValueError(f"{path}: unknown export format {suffix!r}; use .json, .jsonl, .sqlite or .db")
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if suffix in SQLITE_SUFFIXES:
            tmp.unlink()  # the store creates the database file itself
            _write_sqlite(tmp, list(entries))
        elif suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as handle:
                for entry in entries:
                    handle.write(json.dumps(entry.to_dict(), sort_keys=True) + "\n")
        else:
            document = {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "exported_at": datetime.now(timezone.utc).isoformat(),
                "entries": [entry.to_dict() for entry in entries],
            }
            tmp.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            if leftover.exists():
                leftover.unlink()


def _write_sqlite(path: Path, entries: list[Entry]) -> None:
    from .store import open_store

    store = open_store(path)
    try:
        store._store_valid(entries, "keep")
    finally:
        store.close()
    con = sqlite3.connect(str(path))
    try:
        con.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, readable read-only
    finally:
        con.close()


# --------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """``(label, row)`` pairs from a cache file; ``row`` is a mapping to validate, or an
    :class:`EntryError` for a row that could not even be parsed. Raises StoreError for a file
    that is not a cache export at all."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise _store_error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head == _SQLITE_MAGIC:
        return _read_sqlite(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _store_error(f"{path}: not a cache export (neither SQLite nor JSON text: {exc})") from None
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text)
    return _read_json(path, text)


def _read_json(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _store_error(f"{path}: not a cache export (malformed JSON: {exc})") from None
    if isinstance(data, dict):
        if data.get("format", FORMAT) != FORMAT:
            raise _store_error(f"{path}: not a cache export (format {data.get('format')!r})")
        entries = data.get("entries")
    else:
        entries = data
    if not isinstance(entries, list):
        raise _store_error(f"{path}: not a cache export (expected a list of entries)")
    return [(f"{path.name} entry {i}", row) for i, row in enumerate(entries)]


def _read_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label = f"{path.name} line {number}"
        try:
            rows.append((label, json.loads(line)))
        except ValueError as exc:
            rows.append((label, EntryError(f"malformed JSON ({exc})")))
    return rows


def _read_sqlite(path: Path) -> list[tuple[str, Any]]:
    from .store import SchemaOutdatedError, open_store

    try:
        store = open_store(path, readonly=True)
    except SchemaOutdatedError:
        # An older cache: upgrade a private copy (the file itself is left as it is).
        with tempfile.TemporaryDirectory(prefix="adasplash-tune-import-") as folder:
            copy = Path(folder) / "copy.sqlite"
            source = sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True)
            target = sqlite3.connect(str(copy))
            try:
                source.backup(target)
            finally:
                source.close()
                target.close()
            store = open_store(copy)
            try:
                rows = store.raw_rows()
            finally:
                store.close()
    else:
        try:
            rows = store.raw_rows()
        finally:
            store.close()
    return [(f"{path.name} row {i}", row) for i, row in enumerate(rows)]
