"""The cache schema: SQLAlchemy 2 typed ORM models and the schema version.

Tables
------
``schema_version``  one row per application (``app = "adasplash-tune"``) holding the layout version
``devices``         device fingerprints (``device_id`` = GPU name | arch | triton major.minor)
``kernels``         a kernel on a backend at one source hash (the code that runs)
``tuned_entries``   the best known config per (device, kernel + hash, problem key) with its metrics
``failed_configs``  configs that failed, with a typed reason, so they are never re-run

Configs, keys and provenance are stored as canonical JSON text (sorted keys, compact): plain data
that every dialect compares and indexes the same way. A layout change bumps ``SCHEMA_VERSION``
(in :mod:`adasplash_tune.cache.layout`) and adds a step to :mod:`adasplash_tune.cache.migrations`.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from .layout import APP_ID, DEVICE_FIELDS, SCHEMA_VERSION

__all__ = [
    "APP_ID", "SCHEMA_VERSION", "Base", "SchemaVersion", "Device", "Kernel", "TunedEntry",
    "FailedConfig", "FailureReason", "UTCDateTime", "utcnow",
]

def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC on every dialect and returns timezone-aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class FailureReason(str, enum.Enum):
    """Why a config failed (stored as its value)."""

    INVALID = "invalid"
    COMPILE = "compile"
    RUNTIME = "runtime"
    TIMEOUT = "timeout"
    ACCURACY = "accuracy"
    CRASH = "crash"


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "schema_version"

    app: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(256), unique=True)
    backend: Mapped[str] = mapped_column(String(16), default="")
    vendor: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(128), default="")
    arch: Mapped[str] = mapped_column(String(64), default="", index=True)
    sm_count: Mapped[int] = mapped_column(Integer, default=0)
    shared_mem: Mapped[int] = mapped_column(Integer, default=0)
    torch_version: Mapped[str] = mapped_column(String(64), default="")
    triton_version: Mapped[str] = mapped_column(String(64), default="")
    runtime_version: Mapped[str] = mapped_column(String(64), default="")

    FIELDS = DEVICE_FIELDS

    def as_dict(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.FIELDS}
        data["device_id"] = self.device_id
        return data


class Kernel(Base):
    __tablename__ = "kernels"
    __table_args__ = (UniqueConstraint("name", "backend", "source_hash", name="uq_kernels"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(32))
    source_hash: Mapped[str] = mapped_column(String(64))


class TunedEntry(Base):
    __tablename__ = "tuned_entries"
    __table_args__ = (
        UniqueConstraint("device_pk", "kernel_pk", "key_json", name="uq_tuned_entries"),
        Index("ix_tuned_entries_lookup", "kernel_pk", "key_base"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    kernel_pk: Mapped[int] = mapped_column(ForeignKey("kernels.id"))
    key_json: Mapped[str] = mapped_column(Text)
    config_json: Mapped[str] = mapped_column(Text)
    time_ms: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    spread_ms: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    error: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    trials: Mapped[int] = mapped_column(Integer, default=0)
    strategy: Mapped[str] = mapped_column(String(32), default="")
    provenance_json: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # version 2: the key without its size buckets, and the buckets, for the nearest lookup
    key_base: Mapped[str] = mapped_column(Text, default="", server_default="")
    size_major: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    size_minor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed_verify: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    device: Mapped[Device] = relationship(lazy="joined")
    kernel: Mapped[Kernel] = relationship(lazy="joined")


class FailedConfig(Base):
    __tablename__ = "failed_configs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_pk: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    kernel_pk: Mapped[int] = mapped_column(ForeignKey("kernels.id"))
    key_json: Mapped[str] = mapped_column(Text)
    config_json: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    device: Mapped[Device] = relationship(lazy="joined")
    kernel: Mapped[Kernel] = relationship(lazy="joined")
