"""Where tuning studies live and what they are called.

Each (device, kernel, backend, kernel hash, problem key, stage, fixed knobs, objective) gets its
own Optuna study in one RDB storage: by default an SQLite file beside the user cache
(``studies.sqlite``), or any SQLAlchemy URL given with ``--storage`` (e.g. a PostgreSQL server
that tuners on several hosts share). Re-running the same command finds the same studies
(``load_if_exists``) and resumes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from ..cache.locations import display_location, hide_password, is_url, user_cache_location
from ..kernels.problem import key_to_json
from .lost_trials import heartbeat_options

__all__ = ["default_storage_url", "open_storage", "study_name", "STUDIES_FILE"]

STUDIES_FILE = "studies.sqlite"

#: Attempts at opening a storage whose schema another tuner is creating at the same moment.
OPEN_ATTEMPTS = 6

log = logging.getLogger("adasplash_tune")


def default_storage_url(cache: str | None = None) -> str:
    """``sqlite:///<folder of the user cache>/studies.sqlite`` (the platform cache dir when the
    cache is a non-SQLite URL)."""
    location = user_cache_location(cache)
    if is_url(location):
        if location.startswith("sqlite:///") and location != "sqlite:///:memory:":
            folder = Path(location[len("sqlite:///"):]).expanduser().parent
        else:
            import platformdirs

            folder = Path(platformdirs.user_cache_dir("adasplash-tune"))
    else:
        folder = Path(location).expanduser().parent
    return f"sqlite:///{(folder / STUDIES_FILE).resolve()}"


def open_storage(url: str):
    """An Optuna RDB storage for ``url`` (its folder created for SQLite files), with heartbeats
    on (``tuner.lost_trials``).

    Tuners started together on a fresh database race to create its tables; the loser's error
    (a duplicate row or table) is retried a few times, by which point the schema exists."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError; report as a value problem
        raise ValueError(f"--storage {url!r} is not a database URL ({exc})") from None
    kwargs: dict[str, Any] = heartbeat_options()
    sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if parsed.get_backend_name() == "sqlite":
        if sqlite_file:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, **kwargs)
            break
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if attempt == OPEN_ATTEMPTS:  # one line naming the storage (never its password)
                reason = hide_password(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                                       url)
                raise ValueError(f"study storage {display_location(url)}: cannot open ({reason})") from exc
            log.debug("opening the study storage (attempt %d): %s", attempt, exc)
            time.sleep(0.05 * attempt + random.random() * 0.1)
    if sqlite_file:
        _fast_commits(storage.engine)
    return storage


def _fast_commits(engine: Any) -> None:
    """WAL journal with synchronous=NORMAL: a commit no longer waits for fsync, and what was
    committed still survives the process being killed (only a power cut may lose the last ones)."""
    from sqlalchemy import event

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", on_connect)
    engine.dispose()  # connections opened while creating the schema reconnect with the pragmas


def study_name(
    *,
    device_id: str,
    kernel: str,
    backend: str,
    kernel_hash: str,
    key: Mapping[str, Any],
    stage: str,
    fixed: Mapping[str, Any],
    objective: str,
) -> str:
    """A readable, stable study name; ``fixed`` (the knobs held constant) enters as a short hash."""
    digest = hashlib.sha256(json.dumps(dict(fixed), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return "|".join([f"{kernel}/{backend}", device_id, kernel_hash, key_to_json(key), stage, objective, digest])
