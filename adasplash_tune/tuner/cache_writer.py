"""The job's one writer of the config cache: search readings, confirmed winners, failed configs.

Two kinds of time reach the cache. A *reading* is the search's fastest measurement of a config,
stored as soon as it improves (so a killed run leaves its best so far) under the cache's
"faster" rule. A *confirmed* time is the median of the final duel (``tuner.duel``), stored
whatever the cached time, with ``confirmed_runs`` in its provenance. The two are not comparable
(a minimum of many noisy readings is biased low), so a reading never replaces a confirmed entry:
only another duel does. What a problem's result reports as stored is checked against the cache
(``holds``) when the problem is done.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Mapping

from ..cache.entry import Entry
from ..kernels.problem import key_to_json
from .options import JobSettings
from .outcome import Outcome
from .inputs import inputs_label
from .problems import Problem
from .space import SearchSpace

__all__ = ["CacheWriter", "TOOL"]

log = logging.getLogger("adasplash_tune")

TOOL = "adasplash-tune tune"

Point = tuple[Mapping[str, Any], Outcome]  # a config's values (every knob) and its outcome


class CacheWriter:
    """Writes one job's results to ``store`` (a ``ConfigStore``). ``lock`` (set while several
    device threads tune at once) serialises the store's use."""

    def __init__(self, store: Any, settings: JobSettings) -> None:
        self.store = store
        self.settings = settings
        self.lock: threading.Lock | None = None
        self._written: set[str] = set()  # the problem keys this job stored an entry for

    def guard(self) -> Any:
        """The store's lock while device threads share it, else a no-op context."""
        return self.lock if self.lock is not None else contextlib.nullcontext()

    def cached(self, problem: Problem) -> Entry | None:
        """The cache's entry for ``problem`` on this device and kernel code (None if there is none)."""
        with self.guard():
            return self._get(problem)

    def store_reading(self, problem: Problem, space: SearchSpace, point: Point, trials: int) -> bool:
        """Store a search reading if it beats the cached entry, unless that entry is confirmed.
        True when stored."""
        entry = self._entry(problem, space, point, trials)
        with self.guard():  # read and write under one hold of the lock
            current = self._get(problem)
            if current is not None and is_confirmed(current):
                log.debug("%s: a confirmed entry is cached; the search's %.4g ms is not stored over it",
                          problem.label(), point[1].objective)
                return False
            return self._write(entry, self.store.upsert_best)

    def store_confirmed(self, problem: Problem, space: SearchSpace, point: Point, trials: int) -> bool:
        """Store the duel's verdict whatever is cached (it supersedes readings). True when stored."""
        entry = self._entry(problem, space, point, trials)

        def replace(e: Entry) -> bool:
            self.store.replace(e)
            return True

        with self.guard():
            return self._write(entry, replace)

    def wrote(self, problem: Problem) -> bool:
        """Did this job store an entry for ``problem``?"""
        return key_to_json(problem.key(self.settings.backend)) in self._written

    def holds(self, problem: Problem, space: SearchSpace, point: Point) -> bool:
        """Does the cache hold exactly ``point`` for ``problem`` (config, time, confirmation)?"""
        current = self.cached(problem)
        if current is None or current.failed_verify:
            return False
        values, outcome = point
        return (current.config == space.split(values)[0] and current.time_ms == outcome.objective
                and current.provenance.get("confirmed_runs") == outcome.attrs.get("confirmed_runs"))

    def record_failure(self, problem: Problem, space: SearchSpace, values: Mapping[str, Any],
                       outcome: Outcome) -> None:
        s = self.settings
        config, _ = space.split(values)
        try:
            with self.guard():
                self.store.record_failure(dict(s.fingerprint), s.kernel, s.backend, s.kernel_hash,
                                          dict(problem.key(s.backend)), config, outcome.status,
                                          str(outcome.attrs.get("detail", "")))
        except ValueError as exc:
            log.warning("could not record failure %s for %s: %s", outcome.status, config, exc)

    # ------------------------------------------------------------------ pieces

    def _get(self, problem: Problem) -> Entry | None:
        s = self.settings
        return self.store.get_exact(s.device_id, s.kernel, s.backend, s.kernel_hash, dict(problem.key(s.backend)))

    def _entry(self, problem: Problem, space: SearchSpace, point: Point, trials: int) -> Entry:
        s = self.settings
        values, outcome = point
        config, extras = space.split(values)
        backward = outcome.attrs.get("bwd_ms") is not None
        provenance = {"tool": TOOL, "objective": "fwd+bwd" if backward else "fwd",
                      "fwd_ms": outcome.attrs.get("fwd_ms"), "bwd_ms": outcome.attrs.get("bwd_ms"),
                      "grad_error": outcome.attrs.get("grad_error"), "target": space.target,
                      "backward": backward, "problem": problem.to_dict(), "seed": s.seed,
                      "inputs": inputs_label(getattr(problem, "inputs", "randn"))}
        if extras:
            provenance["launch_extras"] = extras
        if outcome.attrs.get("confirmed_runs") is not None:
            provenance["confirmed_runs"] = outcome.attrs["confirmed_runs"]
        return Entry(kernel=s.kernel, backend=s.backend, device=dict(s.fingerprint), kernel_hash=s.kernel_hash,
                     key=dict(problem.key(s.backend)), config=config, time_ms=outcome.objective,
                     spread_ms=outcome.attrs.get("spread_ms"), error=outcome.error, trials=int(trials),
                     strategy=s.options.strategy, provenance=provenance)

    def _write(self, entry: Entry, write: Any) -> bool:
        try:
            stored = bool(write(entry))
        except ValueError as exc:  # an entry the cache rejects is a bug worth a loud log line
            log.warning("cache rejected the tuned entry for %s: %s", entry.key, exc)
            return False
        if stored:
            self._written.add(key_to_json(entry.key))
            log.info("stored %s for %s (%.4g ms)", entry.config, entry.key, entry.time_ms)
        return stored


def is_confirmed(entry: Entry) -> bool:
    """An entry holding a duel's median (and not failed since)."""
    return bool(entry.provenance.get("confirmed_runs")) and not entry.failed_verify
