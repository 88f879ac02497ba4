"""Trials lost with their tuner: the process killed, or its host gone, while a trial ran.

Optuna's RDB storage heartbeats find them: while a tuner runs a trial it records a beat in the
storage every ``HEARTBEAT_S`` seconds (``Heartbeats``), and a RUNNING trial whose last beat is
more than ``GRACE_S`` seconds old, by the database's own clock, is failed by the next tuner that
looks (``fail_stale``; the storage's stale-trial callback logs it). Storages opened by
``tuner.studies.open_storage`` have heartbeats on (``heartbeat_options``).

On this host a lost trial is found at once instead of after the grace period: each trial names
its owner (host and boot, process, run: ``owner_record``), and a trial whose owner process here
is gone (``kill -9``, then a re-run) is lost (``left_behind``). A lost trial is failed and not
counted; its point may be tried again.
"""

from __future__ import annotations

import inspect
import logging
import os
import platform
import threading
import time
import warnings
from datetime import datetime
from functools import lru_cache
from typing import Any

__all__ = ["HEARTBEAT_S", "GRACE_S", "OWNER", "Heartbeats", "fail_stale", "heartbeat_options", "host_id",
           "left_behind", "owner_record"]

log = logging.getLogger("adasplash_tune")

#: Seconds between two heartbeats of a running trial (Optuna takes whole seconds).
HEARTBEAT_S = 20

#: Seconds without a heartbeat after which a running trial counts as lost with its host.
GRACE_S = 90

#: The user attribute naming the tuner that asked a trial (host, process, run).
OWNER = "adasplash_tune_owner"

#: A RUNNING trial that names no owner (asked a moment ago, or by a tuner killed right after it
#: asked) is lost once it started this many seconds ago.
UNOWNED_GRACE_S = 120.0


def heartbeat_options() -> dict[str, Any]:
    """Keyword arguments of ``optuna.storages.RDBStorage`` that turn its heartbeats on."""
    import optuna

    options: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
    # Optuna 4.9 renamed failed_trial_callback (kept, deprecated, until 6.0)
    names = inspect.signature(optuna.storages.RDBStorage).parameters
    renamed = "heartbeat_stale_trial_callback"
    options[renamed if renamed in names else "failed_trial_callback"] = _log_lost
    return options


def _log_lost(study: Any, trial: Any) -> None:
    log.info("trial %d of %s was lost with its tuner (no heartbeat for %d s); it is not counted",
             trial.number, study.study_name, GRACE_S)


def fail_stale(study: Any) -> None:
    """Fail the study's RUNNING trials whose heartbeat stopped (no-op without heartbeats)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class Heartbeats:
    """A thread recording a heartbeat of every trial registered with ``add`` until ``remove``
    (or ``stop``). Without a heartbeat storage it does nothing."""

    def __init__(self, storage: Any, study_name: str) -> None:
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.storage = storage if interval else None
        self.interval = float(interval or 0)
        self.study_name = study_name
        self._study_id: int | None = None
        self._ids: dict[int, int] = {}  # trial number -> storage trial id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, number: int) -> None:
        """Start beating for trial ``number`` (its first beat is recorded now)."""
        if self.storage is None:
            return
        if self._study_id is None:
            self._study_id = self.storage.get_study_id_from_name(self.study_name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        self.storage.record_heartbeat(trial_id)
        with self._lock:
            self._ids[number] = trial_id

    def remove(self, number: int) -> None:
        with self._lock:
            self._ids.pop(number, None)

    def start(self) -> None:
        if self.storage is None:
            return
        self._thread = threading.Thread(target=self._beat, daemon=True, name="adasplash-tune-heartbeat")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._ids.values())
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - told meanwhile, or the database was busy
                    log.debug("heartbeat of trial id %d not recorded (the next round retries): %s", trial_id, exc)


@lru_cache(maxsize=1)
def host_id() -> str:
    """This machine as owners are compared: host name plus boot id (process ids restart at boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = ""
    return f"{platform.node()}|{boot}"


def owner_record(run: str) -> dict[str, Any]:
    """What a trial stores about the tuner that asked it (``run``: the search's id)."""
    return {"host": host_id(), "pid": os.getpid(), "run": run}


def left_behind(trial: Any, run: str) -> bool:
    """Is this RUNNING trial (not run ``run``'s) lost with a tuner of this host, or unowned for
    long? Trials of other hosts are left to the heartbeats (but for a lease that an older
    version wrote and that has passed)."""
    owner = trial.user_attrs.get(OWNER)
    if not isinstance(owner, dict):
        start = trial.datetime_start
        return start is None or (datetime.now() - start).total_seconds() > UNOWNED_GRACE_S
    if owner.get("host") != host_id():
        expires = owner.get("expires")  # a lease of a version before heartbeats, which never beats
        return isinstance(expires, (int, float)) and time.time() > expires
    if owner.get("pid") == os.getpid():
        return owner.get("run") != run  # an earlier search in this process
    return not _pid_alive(owner.get("pid"))


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return False
    return True
