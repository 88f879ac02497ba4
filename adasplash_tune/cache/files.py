"""Portable cache files, as a codec of entries: what ``export`` writes and ``import`` reads.

Formats (chosen by content for reading, by suffix for writing):

* ``.json``  ``{"format": "adasplash-tune-cache", "schema_version": N, "entries": [...]}``
  (a bare list of entries is read too); each entry is :meth:`Entry.to_dict` output.
* ``.jsonl`` one entry object per line (a malformed line rejects only that line).
* ``.sqlite`` / ``.db`` a cache database; :mod:`.transfer` writes it through the store, this
  module reads it through sqlite3 (:mod:`.readonly`).

Reading yields raw rows, each labelled with the file and its place in it; the caller validates
them. A file is untrusted input, so reading it is bounded: at most :data:`MAX_FILE_ROWS` rows of
each kind, JSON nested at most a few levels beyond an entry's :data:`~.entry.MAX_DEPTH` (deeper
parts are cut before parsing, and their rows rejected), SQLite tables that are real tables, read
one row at a time. A 0-byte file is an empty cache.

Writing goes to a temporary file in the target directory, created with the process umask like any
new file, and renamed into place, so a failed export never leaves half a file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from .entry import MAX_DEPTH, Entry, EntryError, check_depth
from .errors import StoreError
from .layout import DEVICE_FIELDS, SCHEMA_VERSION
from .readonly import SQLITE_MAGIC, check_layout, columns_of, open_file

__all__ = [
    "FORMAT", "SQLITE_SUFFIXES", "MAX_FILE_ROWS", "export_format", "replacing", "write_json",
    "write_jsonl", "read_rows",
]

FORMAT = "adasplash-tune-cache"
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_JSON_SUFFIXES = (".json", ".jsonl")
#: The most rows read from one file (entries; for SQLite also devices and kernels): an import
#: of a larger file fails, naming it. Real caches hold hundreds to a few thousand entries.
MAX_FILE_ROWS = 100_000
# An entry sits at most 2 levels deep in a .json document ({"entries": [entry]}), so cutting
# the document at this depth only touches rows that check_depth rejects anyway.
_DOCUMENT_DEPTH = MAX_DEPTH + 3
# a string (an unterminated one runs to the end, so scanning stays linear) or a bracket
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]', re.S)


# --------------------------------------------------------------------------- writing


def export_format(path: Path) -> str:
    """``"json"``, ``"jsonl"`` or ``"sqlite"``, by the suffix of ``path``; ValueError otherwise."""
    suffix = path.suffix.lower()
    if suffix in SQLITE_SUFFIXES:
        return "sqlite"
    if suffix in _JSON_SUFFIXES:
        return suffix[1:]
    raise ValueError(f"{path}: unknown export format {suffix!r}; use .json, .jsonl, .sqlite or .db")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A new empty file beside ``path`` (mode 0666 less the umask, as any new file) that
    replaces ``path`` when the block succeeds and is removed when it fails."""
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            if leftover.exists():
                leftover.unlink()


def write_jsonl(path: Path, entries: Iterable[Entry]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry.to_dict(), sort_keys=True) + "\n")


def write_json(path: Path, entries: Iterable[Entry]) -> None:
    document = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "entries": [entry.to_dict() for entry in entries],
    }
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- reading

Row = tuple[str, Any]  # (label, mapping to validate, or the EntryError of an unparsable row)


def read_rows(path: Path) -> list[Row]:
    """``(label, row)`` pairs from a cache file; ``row`` is a mapping to validate, or an
    :class:`EntryError` for a row that could not even be parsed. Raises StoreError (one line
    naming the file) for a file that is not a cache export at all, or that holds more than
    :data:`MAX_FILE_ROWS` rows."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
            data = b"" if head == SQLITE_MAGIC else head + handle.read()
    except OSError as exc:
        raise StoreError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head == SQLITE_MAGIC:
        return _read_sqlite(path)
    if not data:
        return []
    if path.suffix.lower() == ".jsonl":
        rows = _read_jsonl(path, data)
    else:
        rows = _read_json(path, data)
    _check_count(path, len(rows), "entries")
    return rows


def _check_count(path: Path, count: int, what: str) -> None:
    if count > MAX_FILE_ROWS:
        raise StoreError(f"{path}: more than {MAX_FILE_ROWS} {what}; split the file (an import reads "
                         f"at most {MAX_FILE_ROWS} rows of a kind from one file)")


def _cut_deep(text: str, depth_limit: int) -> str:
    """``text`` with every array/object that opens deeper than ``depth_limit`` replaced by
    ``null``, so that parsing never recurses deeper (strings are skipped whole)."""
    depth, cut_from, pieces, kept = 0, -1, [], 0
    for token in _TOKENS.finditer(text):
        char = token.group()[0]
        if char == '"':
            continue
        if char in "[{":
            depth += 1
            if depth == depth_limit + 1:
                cut_from = token.start()
        else:
            if depth == depth_limit + 1 and cut_from >= 0:
                pieces += [text[kept:cut_from], "null"]
                kept, cut_from = token.end(), -1
            depth -= 1
    if cut_from >= 0:  # unbalanced: cut to the end (the parse then fails, naming the file)
        return "".join(pieces) + text[kept:cut_from] + "null"
    return "".join(pieces) + text[kept:] if pieces else text


def _depth_over(text: str, limit: int) -> bool:
    depth = 0
    for token in _TOKENS.finditer(text):
        char = token.group()[0]
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _parse_int(text: str) -> Any:
    """JSON integers: ones beyond 64 bits (no column holds them, and huge ones would fail the
    whole parse) become a value that validation rejects for this row only."""
    return int(text) if len(text.lstrip("-")) <= 19 else _TooLong(len(text))


class _TooLong:
    """A JSON integer with too many digits to keep (see :func:`_parse_int`)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_int=_parse_int)
    except RecursionError:  # not expected after the depth cut; never let it escape
        raise ValueError("nested too deeply") from None


def _decode(data: bytes) -> str:
    """UTF-8 text; bytes that are not UTF-8 become lone surrogates, which validation rejects in
    the row that holds them (instead of failing the whole file)."""
    return data.decode("utf-8", "surrogateescape")


def _row(label: str, value: Any) -> Row:
    try:
        check_depth("entry", value)
    except EntryError as exc:
        return label, exc
    return label, value


def _read_json(path: Path, data: bytes) -> list[Row]:
    text = _cut_deep(_decode(data), _DOCUMENT_DEPTH)
    try:
        document = _loads(text)
    except ValueError as exc:
        raise StoreError(f"{path}: not a cache export (malformed JSON: {exc})") from None
    if isinstance(document, dict):
        if document.get("format", FORMAT) != FORMAT:
            raise StoreError(f"{path}: not a cache export (format {str(document.get('format'))[:60]!r})")
        entries = document.get("entries")
    else:
        entries = document
    if not isinstance(entries, list):
        raise StoreError(f"{path}: not a cache export (expected a list of entries)")
    return [_row(f"{path.name} entry {i}", row) for i, row in enumerate(entries)]


def _read_jsonl(path: Path, data: bytes) -> list[Row]:
    rows: list[Row] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        line = _decode(raw)
        if not line.strip():
            continue
        label = f"{path.name} line {number}"
        if _depth_over(line, MAX_DEPTH + 1):
            rows.append((label, EntryError(f"nested deeper than {MAX_DEPTH} levels")))
            continue
        try:
            rows.append(_row(label, _loads(line)))
        except ValueError as exc:
            rows.append((label, EntryError(f"malformed JSON ({exc})")))
    return rows


# --------------------------------------------------------------------------- reading SQLite

_ENTRY_COLUMNS = ("id", "device_pk", "kernel_pk", "key_json", "config_json", "time_ms", "spread_ms",
                  "error", "trials", "strategy", "provenance_json", "created_at", "updated_at")


def _read_sqlite(path: Path) -> list[Row]:
    """Rows of a cache database, any schema version this code knows, read without SQLAlchemy:
    the tables are checked to be tables, each is scanned on its own (no join that a crafted
    file could multiply) and at most :data:`MAX_FILE_ROWS` rows of each are read."""
    conn = open_file(path)
    if conn is None:
        return []
    try:
        if check_layout(conn, str(path), accept_older=True) is None:
            raise StoreError(f"{path}: an empty database, not an adasplash-tune cache")
        devices = {pk: dict(zip(("device_id",) + DEVICE_FIELDS, values))
                   for pk, *values in _scan(conn, path, "devices", ("id", "device_id") + DEVICE_FIELDS)}
        kernels = {pk: values for pk, *values in _scan(conn, path, "kernels", ("id", "name", "backend", "source_hash"))}
        columns = _ENTRY_COLUMNS + (("failed_verify",) if "failed_verify" in columns_of(conn, "tuned_entries") else ())
        rows = [_sqlite_row(path, index, values, devices, kernels)
                for index, values in enumerate(_scan(conn, path, "tuned_entries", columns))]
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: unreadable SQLite database ({exc})") from None
    finally:
        conn.close()
    return rows


def _scan(conn: sqlite3.Connection, path: Path, table: str, columns: tuple[str, ...]) -> list[tuple]:
    cursor = conn.execute(f"SELECT {', '.join(columns)} FROM {table}")
    rows = cursor.fetchmany(MAX_FILE_ROWS + 1)
    cursor.close()
    _check_count(path, len(rows), f"rows in {table}")
    return rows


def _sqlite_row(path: Path, index: int, values: tuple, devices: dict, kernels: dict) -> Row:
    label = f"{path.name} row {index}"
    row = dict(zip(_ENTRY_COLUMNS + ("failed_verify",), values))
    device, kernel = devices.get(row["device_pk"]), kernels.get(row["kernel_pk"])
    if device is None or kernel is None:
        missing = "device" if device is None else "kernel"
        return label, EntryError(f"its {missing} is not in the file's {missing}s table")
    flag = row.get("failed_verify", 0)
    return label, {
        "kernel": kernel[0], "backend": kernel[1], "kernel_hash": kernel[2], "device": dict(device),
        "key": row["key_json"], "config": row["config_json"], "time_ms": row["time_ms"],
        "spread_ms": row["spread_ms"], "error": row["error"], "trials": row["trials"],
        "strategy": row["strategy"], "provenance": row["provenance_json"],
        "created_at": row["created_at"], "updated_at": row["updated_at"],
        "failed_verify": bool(flag) if flag in (0, 1) else flag,
    }
