"""Schema versions and the steps between them (a small versioned step list, no Alembic).

``STEPS[v]`` upgrades a database from version ``v`` to ``v + 1`` inside the caller's
transaction. Steps use dialect-neutral DDL (``ALTER TABLE ... ADD COLUMN``, ``CREATE INDEX``)
compiled for the connection's dialect, and plain UPDATEs for back-fills.

Version history
  1  first layout: devices, kernels, tuned_entries, failed_configs, schema_version
  2  tuned_entries gains key_base / size_major / size_minor (indexed nearest lookup) and
     failed_verify (set by ``verify``; the loader skips such entries)
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from sqlalchemy import Column, Connection, Index, MetaData, Table, false, select, update
from sqlalchemy.schema import CreateIndex

from .entry import SIZE_FIELDS, split_key
from .models import SCHEMA_VERSION, TunedEntry

__all__ = ["STEPS", "upgrade"]

log = logging.getLogger("adasplash_tune")


def _add_column(conn: Connection, table: str, column: Column, default_sql: str) -> None:
    """ALTER TABLE ... ADD COLUMN with the model's type compiled for this dialect."""
    ddl_type = column.type.compile(dialect=conn.dialect)
    name = conn.dialect.identifier_preparer.quote(column.name)
    conn.exec_driver_sql(
        f"ALTER TABLE {table} ADD COLUMN {name} {ddl_type} NOT NULL DEFAULT {default_sql}"
    )


def _v1_to_v2(conn: Connection) -> None:
    cols = TunedEntry.__table__.c
    _add_column(conn, "tuned_entries", cols.key_base, "''")
    _add_column(conn, "tuned_entries", cols.size_major, "0")
    _add_column(conn, "tuned_entries", cols.size_minor, "0")
    false_sql = str(false().compile(dialect=conn.dialect))
    _add_column(conn, "tuned_entries", cols.failed_verify, false_sql)
    meta = MetaData()
    entries = Table("tuned_entries", meta, autoload_with=conn)
    kernels = Table("kernels", meta, autoload_with=conn)
    conn.execute(CreateIndex(Index("ix_tuned_entries_lookup", entries.c.kernel_pk, entries.c.key_base)))
    rows = conn.execute(
        select(entries.c.id, entries.c.key_json, kernels.c.name)
        .join(kernels, kernels.c.id == entries.c.kernel_pk)
    ).all()
    for row_id, key_json, kernel in rows:
        try:
            key = json.loads(key_json)
            base, major, minor = split_key(kernel, key) if kernel in SIZE_FIELDS else ("", 0, 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("tuned entry %s has an unreadable key; it will not serve nearest lookups", row_id)
            continue
        conn.execute(update(entries).where(entries.c.id == row_id)
                     .values(key_base=base, size_major=major, size_minor=minor))


STEPS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2}


def upgrade(conn: Connection, from_version: int) -> None:
    """Run every step from ``from_version`` to :data:`SCHEMA_VERSION` on ``conn``."""
    for version in range(from_version, SCHEMA_VERSION):
        log.info("upgrading the config cache schema from version %d to %d", version, version + 1)
        STEPS[version](conn)
