"""Call-time config selection: memo -> user cache -> shipped cache -> nearest -> declared default.

``resolve(spec, key, device)`` is called by the public API once per new call signature (the API
memoises on the raw signature). Here the answer is memoised per (device, kernel, key, cache
settings): after the first lookup for a key no database is touched again. Nothing is timed.

* ``ADASPLASH_TUNE_MODE``: ``cache`` (default), ``off`` (declared defaults only), ``online``
  (reserved: behaves as ``cache`` after a one-time warning).
* ``ADASPLASH_TUNE_CACHE``: the user cache (path or SQLAlchemy URL), opened read-only.
* Cache files (the user's and the shipped ones) are read through the standard library's sqlite3
  (:mod:`.lookup`: one indexed SELECT per lookup, no SQLAlchemy import on this path); a server
  URL goes through the SQLAlchemy store.
* Shipped caches: ``locations.shipped_dir()`` (monkeypatch ``locations.SHIPPED_DIR`` or set
  ``ADASPLASH_TUNE_SHIPPED_DIR``); the device's own file is ``locations.shipped_name(GPU name)``.
* ``ADASPLASH_TUNE_RECORD=FILE``: each new (device, key) is appended once as a JSON line with
  the call's shape, for ``tune --from-record`` (with ``ADASPLASH_TUNE_RECORD_SAMPLES`` the API also
  saves the call's inputs: :mod:`.samples`).

Entries whose kernel hash differs from ``spec.source_hash()`` are stale and never used; entries
flagged by ``verify`` are skipped. A missing or unreadable cache logs one warning and is skipped:
selection never breaks a forward pass. A 0-byte cache file is an empty cache.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from ..kernels.problem import key_to_json
from ..kernels.spec import Config, ConfigError, KernelSpec
from . import locations

__all__ = ["resolve", "clear_memo", "append_record", "ENV_MODE", "ENV_RECORD", "MODES"]

log = logging.getLogger("adasplash_tune")

ENV_MODE = "ADASPLASH_TUNE_MODE"
ENV_RECORD = "ADASPLASH_TUNE_RECORD"
MODES = ("cache", "off", "online")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

_LOCK = threading.RLock()
_MEMO: dict[tuple, tuple[Config, str]] = {}
_STORES: dict[tuple[str, bool], Any] = {}  # (location, shipped) -> FileLookup, ConfigStore or None
_STORES_PID = os.getpid()
_FORSAKEN: list[Any] = []  # a forked child's copies of its parent's connections, never used
_HASHES: dict[tuple[str, str], str] = {}
_RECORDED: set[tuple] = set()
_WARNED: set[str] = set()


def _warn_once(tag: str, message: str, *args: Any) -> None:
    if tag not in _WARNED:
        _WARNED.add(tag)
        log.warning(message, *args)


def _mode() -> str:
    mode = os.environ.get(ENV_MODE, "cache").strip().lower() or "cache"
    if mode == "online":
        _warn_once("mode-online", "%s=online is reserved (no online tuning yet); using 'cache'", ENV_MODE)
        return "cache"
    if mode not in MODES:
        _warn_once(f"mode-{mode}", "unknown %s=%r; using 'cache' (choose one of %s)", ENV_MODE, mode,
                   list(MODES))
        return "cache"
    return mode


def _source_hash(spec: KernelSpec) -> str:
    ident = (spec.kernel, spec.backend)
    digest = _HASHES.get(ident)
    if digest is None:
        digest = _HASHES[ident] = spec.source_hash()
    return digest


def clear_memo() -> None:
    """Forget memoised selections and close the stores (after the cache changed; in tests)."""
    with _LOCK:
        _MEMO.clear()
        _HASHES.clear()
        _RECORDED.clear()
        _WARNED.clear()
        _drop_stores()


# --------------------------------------------------------------------------- stores


def _open_user(location: str) -> Any:
    """The user cache: a file through sqlite3 (:class:`.lookup.FileLookup`), a server through
    the SQLAlchemy store; None when the file does not exist. An older file is upgraded first."""
    from .errors import SchemaOutdatedError
    from .lookup import FileLookup

    path = locations.sqlite_file(location)
    if path is None:
        return _open_server(location)
    if not path.exists():
        if os.environ.get(locations.ENV_CACHE):
            _warn_once(f"open-{location}", "config cache %s does not exist; using shipped caches "
                       "and defaults", location)
        else:
            log.debug("no user config cache at %s yet", location)
        return None
    try:
        return FileLookup.open(path)
    except SchemaOutdatedError:
        from .store import open_store

        log.info("upgrading the config cache %s to the current schema", location)
        open_store(location).close()
        return FileLookup.open(path)


def _open_server(location: str) -> Any:
    from .store import SchemaOutdatedError, open_store

    try:
        return open_store(location, readonly=True)
    except SchemaOutdatedError:
        log.info("upgrading the config cache %s to the current schema",
                 locations.display_location(location))
        open_store(location).close()
        return open_store(location, readonly=True)


def _drop_stores() -> None:
    """Close the open caches; in a forked child only forget the parent's connections (kept
    referenced, so that not even garbage collection closes them here)."""
    global _STORES_PID
    forked = _STORES_PID != os.getpid()
    for store in _STORES.values():
        if store is None:
            continue
        if forked:
            _FORSAKEN.append(store)
        else:
            store.close()
    _STORES.clear()
    _STORES_PID = os.getpid()


def _store(location: str, *, user: bool) -> Any:
    """The open cache at ``location`` (None if missing or unreadable: warned once)."""
    if _STORES_PID != os.getpid():  # a forked child must not reuse the parent's connections
        _drop_stores()
    ident = (location, not user)
    if ident in _STORES:
        return _STORES[ident]
    store = None
    try:
        if user:
            store = _open_user(location)
        else:
            from .lookup import FileLookup

            store = FileLookup.open(Path(location), immutable=True)
    except Exception as exc:  # noqa: BLE001 - a broken cache must not break the forward pass
        _warn_once(f"open-{location}", "cannot use config cache (%s); falling back", exc)
    _STORES[ident] = store
    return store


def _query(store: Any, method: str, *args: Any) -> Any:
    try:
        return getattr(store, method)(*args)
    except Exception as exc:  # noqa: BLE001 - same rule as opening
        _warn_once(f"query-{store.location}", "config cache %s failed (%s); falling back",
                   locations.display_location(store.location), exc)
        return None


def _usable(spec: KernelSpec, entry: Any, context: Mapping[str, Any]) -> Config | None:
    if entry is None or entry.failed_verify:
        return None
    try:
        return spec.validate(entry.config, context, partial=False)
    except ConfigError as exc:
        _warn_once(f"invalid-{entry.key}", "ignoring cached config for %s: %s", entry.key, exc)
        return None


# --------------------------------------------------------------------------- record file


def _record(path: str, spec: KernelSpec, key: Mapping[str, Any], device_id: str,
            shape: Mapping[str, Any] | None) -> None:
    append_record(path, {"kernel": spec.kernel, "backend": spec.backend, "key": dict(key), "device": device_id,
                         "shape": dict(shape) if shape else None})


def append_record(path: str, fields: Mapping[str, Any]) -> None:
    """Append one JSON line (``fields`` plus the time) to the record file; failures are logged once."""
    line = json.dumps({**fields, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                      sort_keys=True) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write per line: O_APPEND keeps lines whole
        finally:
            os.close(fd)
    except OSError as exc:
        _warn_once(f"record-{path}", "cannot append to %s=%s (%s)", ENV_RECORD, path, exc)


# --------------------------------------------------------------------------- resolve


def resolve(
    spec: KernelSpec,
    key: dict[str, Any],
    device: torch.device,
    shape: Mapping[str, Any] | None = None,
) -> tuple[Config, str]:
    """The config for ``key`` on ``device`` and its source: "cache", "shipped", "nearest" or
    "default". ``shape`` (the call's raw sizes) only feeds the record file."""
    memo_key = (device, spec.kernel, spec.backend, tuple(sorted(key.items())),
                os.environ.get(ENV_MODE), os.environ.get(locations.ENV_CACHE),
                os.environ.get(locations.ENV_SHIPPED), locations.SHIPPED_DIR)
    hit = _MEMO.get(memo_key)
    if hit is not None:
        return hit
    from ..device import fingerprint

    with _LOCK:
        hit = _MEMO.get(memo_key)
        if hit is not None:
            return hit
        fp = fingerprint(device)
        key_json = key_to_json(key)
        mode = _mode()
        record = os.environ.get(ENV_RECORD)
        if record:
            seen = (record, fp.device_id, spec.kernel, spec.backend, key_json)
            if seen not in _RECORDED:
                _RECORDED.add(seen)
                _record(record, spec, key, fp.device_id, shape)
        result = (spec.default(), "default") if mode == "off" else _lookup(
            spec, key, fp, locations.user_cache_location())
        log.debug("selected %s config for %s %s: %s", result[1], spec.kernel, key_json,
                  result[0].as_dict())
        _MEMO[memo_key] = result
        return result


def _lookup(spec: KernelSpec, key: dict[str, Any], fp: Any, user_location: str) -> tuple[Config, str]:
    digest = _source_hash(spec)
    context = {"head_dim": key.get("head_dim"),
               "dtype_bytes": _DTYPE_BYTES.get(key.get("dtype", "")),
               "max_shared_mem": fp.shared_mem or None}
    context = {k: v for k, v in context.items() if v is not None}
    ident = (fp.device_id, spec.kernel, spec.backend, digest, key)

    user = _store(user_location, user=True)
    if user is not None:
        cfg = _usable(spec, _query(user, "get_exact", *ident), context)
        if cfg is not None:
            return cfg, "cache"

    # shipped caches: the device's own file first, then the others (same arch, for nearest)
    own_name = locations.shipped_name(fp.name)
    files = sorted(locations.shipped_files(), key=lambda f: f.name != own_name)
    shipped = [s for s in (_store(str(f), user=False) for f in files) if s is not None]
    for store in shipped:
        cfg = _usable(spec, _query(store, "get_exact", *ident), context)
        if cfg is not None:
            return cfg, "shipped"

    for store in ([user] if user is not None else []) + shipped:
        cfg = _usable(spec, _query(store, "nearest", *ident), context)
        if cfg is not None:
            return cfg, "nearest"
    return spec.default(), "default"
