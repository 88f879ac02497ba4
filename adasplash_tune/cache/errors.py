"""The cache's errors, in a module of their own so that every cache module can raise them."""

from __future__ import annotations

__all__ = ["StoreError", "SchemaOutdatedError", "EntryError"]


class StoreError(RuntimeError):
    """A cache cannot be opened or used; the message is one line naming the file or URL."""


class SchemaOutdatedError(StoreError):
    """A cache has an older schema and was opened read-only, so it cannot be upgraded."""


class EntryError(ValueError):
    """An entry (or a row of an imported file) is not valid cache data."""
