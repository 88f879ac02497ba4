"""One search: one stage of one problem, driven through an Optuna study by ask/tell.

The study is the trial log: every finished trial is written to its storage at once (with the
config and measurements as user attributes), so a run killed mid-way loses only the trial in
flight and the next run resumes from what is stored. The harness here owns the loop: it asks the
study (or enqueues the strategy's own proposal), checks the point against the space, skips points
already tried, hands new points to ``evaluate`` and tells the study the outcome.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .space import SearchSpace
from .strategies._base import Strategy, point_key

__all__ = ["Outcome", "StageResult", "StageSearch", "TraceRow"]

log = logging.getLogger("adasplash_tune")

#: Value told to single-objective samplers for a point that cannot win (failed, inaccurate,
#: invalid): samplers rank by value, so any value above every real time teaches them to avoid it.
FAILURE_PENALTY = 1e12

#: The one user attribute each trial stores: config, typed status and measurements.
ATTR = "adasplash_tune"

#: Consecutive invalid or repeated samples after which a random untried point is enqueued.
MAX_MISSES = 12


@dataclass
class Outcome:
    """What one evaluation gives the search.

    ``ok``: it ran and passed the accuracy gate, so it may win. ``objective`` is the time to
    minimise (ms; may be set for a gate failure too, for the Pareto front); ``error`` the
    measured relative error; ``status`` the typed result; ``attrs`` extra facts to store.
    """

    ok: bool
    objective: float | None
    error: float | None = None
    status: str = "ok"
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceRow:
    """One counted trial as seen by the search (for progress and benchmark curves)."""

    index: int
    wall_s: float
    objective: float | None
    ok: bool
    best: float | None
    status: str


@dataclass
class StageResult:
    best_values: dict[str, Any] | None
    best: Outcome | None
    counted: int
    failures: int
    trace: list[TraceRow]
    front: list[tuple[dict[str, Any], Outcome]]
    exhausted: bool


PrepareFn = Callable[[Sequence[Mapping[str, Any]]], Sequence["Outcome | None"]]


class StageSearch:
    """Run ``strategy`` on ``study`` until ``budget`` counted trials or ``deadline``.

    ``evaluate(values)`` measures one complete config. ``prepare(list_of_values)`` (optional)
    compiles a batch in parallel and returns, per point, None (compiled) or a failure Outcome;
    with it, up to ``batch`` points are asked at once. ``on_trial(values, outcome, row)`` is
    called after every counted trial (persisting to the cache, progress).
    """

    def __init__(
        self,
        study: Any,
        strategy: Strategy,
        space: SearchSpace,
        *,
        budget: int,
        evaluate: Callable[[Mapping[str, Any]], Outcome],
        deadline: float | None = None,
        prepare: PrepareFn | None = None,
        batch: int = 1,
        start: Mapping[str, Any] | None = None,
        on_trial: Callable[[Mapping[str, Any], Outcome, TraceRow], None] | None = None,
    ) -> None:
        self.study = study
        self.strategy = strategy
        self.space = space
        self.free = strategy.free
        self.fixed = space.canonical(strategy.fixed)
        self.budget = budget
        self.evaluate = evaluate
        self.deadline = deadline
        self.prepare = prepare
        self.batch = max(1, batch if prepare is not None else 1)
        self.start = start
        self.on_trial = on_trial
        self._dists = {n: space.dim(n).distribution() for n in self.free}
        self._tried: dict[tuple, tuple[dict[str, Any], Outcome]] = {}
        self._best: tuple[dict[str, Any], Outcome] | None = None
        self._failures = 0
        self._trace: list[TraceRow] = []
        self._t0 = time.monotonic()
        self._queued = 0  # enqueued points not asked yet (asked first, before any new proposal)

    # ------------------------------------------------------------------ encoding

    def _encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {n: self.space.dim(n).encode(values[n]) for n in self.free}

    def _decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(self.fixed)
        for name in self.free:
            values[name] = self.space.dim(name).decode(params[name])
        return values

    # ------------------------------------------------------------------ state from storage

    def _load(self) -> None:
        """Rebuild what was tried from the study; fail trials left running by a killed run."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            if trial.state == TrialState.WAITING:
                self._queued += 1  # enqueued by an earlier run: the next ask returns it
                continue
            if trial.state == TrialState.RUNNING:
                self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                log.info("trial %d of %s was interrupted; it is not counted", trial.number,
                         self.study.study_name)
                continue
            data = attrs.get(ATTR)
            if not isinstance(data, dict) or not data.get("counted"):
                continue
            values = dict(data["config"])
            outcome = Outcome(ok=bool(data.get("ok")), objective=data.get("objective"),
                              error=data.get("error"), status=data.get("status", "ok"),
                              attrs=dict(data.get("measured") or {}))
            self._record(values, outcome, resumed=True)

    def _record(self, values: Mapping[str, Any], outcome: Outcome, *, resumed: bool = False) -> TraceRow:
        key = point_key(values, self.free)
        self._tried[key] = (dict(values), outcome)
        if not outcome.ok:
            self._failures += 1
        elif outcome.objective is not None and (self._best is None or outcome.objective < self._best[1].objective):
            self._best = (dict(values), outcome)
        row = TraceRow(len(self._tried), time.monotonic() - self._t0, outcome.objective, outcome.ok,
                       self._best[1].objective if self._best else None, outcome.status)
        if not resumed:
            self._trace.append(row)
        return row

    # ------------------------------------------------------------------ telling

    def _tell(self, trial: Any, values: Mapping[str, Any], outcome: Outcome, counted: bool) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr(ATTR, {
            "config": dict(values), "counted": counted, "ok": outcome.ok, "status": outcome.status,
            "objective": outcome.objective, "error": outcome.error, "measured": dict(outcome.attrs),
        })
        if self.strategy.multi_objective:
            if outcome.objective is not None and outcome.error is not None:
                self.study.tell(trial, [outcome.objective, outcome.error])
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        elif outcome.ok and outcome.objective is not None:
            self.study.tell(trial, outcome.objective)
        else:
            self.study.tell(trial, FAILURE_PENALTY)

    def _tell_miss(self, trial: Any, values: Mapping[str, Any], reason: str) -> None:
        """Tell a point that is not evaluated: invalid, or already tried (same result again)."""
        from optuna.trial import TrialState

        prior = self._tried.get(point_key(values, self.free))
        trial.set_user_attr(ATTR, {"config": dict(values), "counted": False, "status": reason})
        if prior is not None and reason == "repeat":
            outcome = prior[1]
            if self.strategy.multi_objective and outcome.objective is not None and outcome.error is not None:
                self.study.tell(trial, [outcome.objective, outcome.error])
                return
            if not self.strategy.multi_objective:
                self.study.tell(trial, outcome.objective if outcome.ok and outcome.objective is not None
                                else FAILURE_PENALTY)
                return
        if self.strategy.multi_objective:
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, FAILURE_PENALTY)

    def outcome_of(self, values: Mapping[str, Any]) -> Outcome | None:
        """The stored outcome of a point already tried in this study (None if not tried)."""
        values = self.space.canonical(values)
        found = self._tried.get(point_key(values, self.free))
        return found[1] if found is not None and found[0] == values else None

    # ------------------------------------------------------------------ the loop

    def _time_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def _ask_batch(self) -> list[tuple[Any, dict[str, Any]]]:
        """Up to ``batch`` new valid untried points (fewer when the space runs dry)."""
        picked: list[tuple[Any, dict[str, Any]]] = []
        pending: set[tuple] = set()
        misses = 0
        want = min(self.batch, self.budget - len(self._tried))
        while len(picked) < want:
            tried = set(self._tried) | pending
            if not self._queued and self.strategy.finished(tried):
                break
            proposal = None if self._queued else self.strategy.propose(tried)
            if proposal is None and misses >= MAX_MISSES and not self._queued:
                proposal = self.strategy.fallback(set(self._tried), pending)
                if proposal is None:
                    break
                misses = 0
            if proposal is not None:
                self.study.enqueue_trial(self._encode(proposal), skip_if_exists=False)
                self._queued += 1
            elif not self._queued and self.strategy.finished(tried):
                break
            trial = self.study.ask(self._dists)
            self._queued = max(0, self._queued - 1)
            values = self._decode(trial.params)
            key = point_key(values, self.free)
            if not self.space.is_valid(values):
                self._tell_miss(trial, values, "invalid")
                misses += 1
                continue
            if key in self._tried or key in pending:
                self._tell_miss(trial, values, "repeat")
                misses += 1
                continue
            misses = 0
            pending.add(key)
            picked.append((trial, values))
        return picked

    def run(self) -> StageResult:
        self._load()
        if not self._tried and not self._queued and self.start is not None and self.budget > 0:
            start = self.space.canonical({**self.fixed, **self.start})
            if self.space.is_valid(start):
                self.study.enqueue_trial(self._encode(start))
                self._queued += 1
        exhausted = False
        while len(self._tried) < self.budget and self._time_left():
            picked = self._ask_batch()
            if not picked:
                exhausted = True
                break
            prepared: Sequence[Outcome | None] = [None] * len(picked)
            if self.prepare is not None and len(picked) > 0:
                prepared = self.prepare([values for _, values in picked])
            for (trial, values), failure in zip(picked, prepared):
                outcome = failure if failure is not None else self.evaluate(values)
                self._tell(trial, values, outcome, counted=True)
                row = self._record(values, outcome)
                if self.on_trial is not None:
                    self.on_trial(values, outcome, row)
        return StageResult(
            best_values=dict(self._best[0]) if self._best else None,
            best=self._best[1] if self._best else None,
            counted=len(self._tried),
            failures=self._failures,
            trace=list(self._trace),
            front=self._front(),
            exhausted=exhausted,
        )

    def _front(self) -> list[tuple[dict[str, Any], Outcome]]:
        """Points not dominated in (time, error) (Pareto mode; empty otherwise)."""
        if not self.strategy.multi_objective:
            return []
        points = [(v, o) for v, o in self._tried.values() if o.objective is not None and o.error is not None]
        front = []
        for v, o in points:
            dominated = any(
                p.objective <= o.objective and p.error <= o.error and (p.objective < o.objective or p.error < o.error)
                for _, p in points
            )
            if not dominated:
                front.append((v, o))
        return sorted(front, key=lambda item: item[1].objective)
