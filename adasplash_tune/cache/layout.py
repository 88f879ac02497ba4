"""The cache layout's identity and names, without SQLAlchemy: what the sqlite3 readers
(:mod:`.readonly`, :mod:`.lookup`, :mod:`.files`) share with the models (:mod:`.models`)."""

from __future__ import annotations

__all__ = ["APP_ID", "SCHEMA_VERSION", "TABLES", "DEVICE_FIELDS"]

#: Written into ``schema_version.app``; a database without it is not ours.
APP_ID = "adasplash-tune"
#: The layout the models describe. Version 1: first layout; 2: nearest-lookup columns
#: (key_base, size_major, size_minor) and the verify flag on tuned entries.
SCHEMA_VERSION = 2
#: The tables a reader needs (``failed_configs`` is the tuner's).
TABLES = ("schema_version", "devices", "kernels", "tuned_entries")
#: A device row's columns besides ``device_id``.
DEVICE_FIELDS = ("backend", "vendor", "name", "arch", "sm_count", "shared_mem", "torch_version",
                 "triton_version", "runtime_version")
