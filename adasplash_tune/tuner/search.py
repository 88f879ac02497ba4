"""One search: one stage of one problem, driven through an Optuna study by ask/tell.

The study is the trial log: every finished trial is written to its storage at once (with the
config and measurements as user attributes), so a run killed mid-way loses only the trial in
flight and the next run resumes from what is stored. The harness here owns the loop: it asks the
study (or starts a trial holding the strategy's own proposal), checks the point against the space,
skips points already tried, hands new points to ``evaluate`` and tells the study the outcome.

A proposed point becomes a RUNNING trial in one insert (:meth:`StageSearch._start_fixed`), never
Optuna's ``enqueue_trial`` + ``ask``: that pair leaves a WAITING row between its two steps, and two
tuners on an SQLite file (which has no row locks behind ``SELECT ... FOR UPDATE``) could both pop
it, evaluate the same trial and fail on the second tell, or leave a WAITING row behind.

Several trials may be in flight at once: with ``submit`` (one evaluation worker per GPU) the
search keeps every worker busy and tells results as they complete, all from the calling thread.

Several tuners (processes, hosts) may share one study. Each run re-reads the study before it
asks, so trials finished elsewhere count towards the budget and are not repeated; a point
another tuner is evaluating is left to it (of two trials asking the same point, or the budget's
last one, the lower trial number keeps it); a stage ends only once the trials other tuners run
in it have finished, so every tuner sees the same best point and goes on to the same next
study. A RUNNING trial lost with its tuner is failed (``tuner.lost_trials``: Optuna's heartbeats,
and at once for a dead process of this host). A result whose trial another tuner failed meanwhile
is added as a new trial: no evaluated trial is lost. In Pareto mode the front is the study's
``best_trials``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import warnings
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from .lost_trials import OWNER, Heartbeats, fail_stale, left_behind, owner_record
from .outcome import Outcome, TraceRow
from .space import SearchSpace
from .strategies._base import Strategy, point_key

__all__ = ["StageResult", "StageSearch", "ATTR", "FAILURE_PENALTY"]

log = logging.getLogger("adasplash_tune")

#: Value told to single-objective samplers for a point that cannot win (failed, inaccurate,
#: invalid): samplers rank by value, so any value above every real time teaches them to avoid it.
FAILURE_PENALTY = 1e12

#: The one user attribute each trial stores: config, typed status and measurements.
ATTR = "adasplash_tune"

#: Consecutive invalid or repeated samples after which a random untried point is started.
MAX_MISSES = 12

#: Seconds between looks at the study while the rest of the budget is in other tuners' hands.
POLL_S = 0.5

#: Looks (20 ms apart) at another tuner's trial until its sampled parameters are stored.
SETTLE_TRIES = 250


@dataclass
class StageResult:
    best_values: dict[str, Any] | None
    best: Outcome | None
    counted: int
    failure_kinds: Counter[str]  # status of each trial that could not win -> count ("accuracy": gate)
    trace: list[TraceRow]
    front: list[tuple[dict[str, Any], Outcome]]
    exhausted: bool
    evaluated: int = 0  # trials this run evaluated (``counted`` includes other runs' trials)

    @property
    def failures(self) -> int:
        return sum(self.failure_kinds.values())


#: Compiles a batch: ``(index, None)`` (compiled) or ``(index, failure Outcome)`` per point, in the
#: order the points finish compiling.
PrepareFn = Callable[[Sequence[Mapping[str, Any]]], Iterable[tuple[int, "Outcome | None"]]]
SubmitFn = Callable[[Mapping[str, Any]], "Future[Outcome]"]


class StageSearch:
    """Run ``strategy`` on ``study`` until ``budget`` counted trials or ``deadline``.

    ``evaluate(values)`` measures one complete config. ``prepare(list_of_values)`` (optional)
    compiles a batch in parallel and returns, per point, None (compiled) or a failure Outcome;
    with it, up to ``batch`` points are asked at once. ``submit(values)`` (optional, instead of
    ``evaluate`` for the search loop) starts an evaluation and returns a Future of its Outcome;
    with it up to ``workers`` trials are in flight and each is told as soon as it completes
    (with ``prepare`` too: batches of ``max(batch, workers)``, compiled, then timed).
    ``on_trial(values, outcome, row)`` is called after every counted trial (persisting to the
    cache, progress), always in the calling thread. ``storage``: the study's storage; when it
    has heartbeats on (``tuner.studies.open_storage``), this run's trials beat while they run.
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
        submit: SubmitFn | None = None,
        workers: int = 1,
        storage: Any = None,
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
        self._failure_kinds: Counter[str] = Counter()
        self._trace: list[TraceRow] = []
        self._t0 = time.monotonic()
        self._queued = 0  # WAITING trials left by earlier versions' runs (asked first, before any proposal)
        self._start_point: dict[str, Any] | None = None  # the search's first point, started before any other
        self._study_storage = study._storage  # the study's own (cached) view, which ``ask`` writes through too
        self._study_id = self._study_storage.get_study_id_from_name(study.study_name)
        self.submit = submit
        self.workers = max(1, int(workers)) if submit is not None else 1
        self._heartbeats = Heartbeats(storage, study.study_name)
        self._run_id = uuid.uuid4().hex
        self._seen: set[int] = set()  # trial numbers already taken into account
        self._mine: dict[int, Any] = {}  # this run's trials not told yet, by number
        self._pending: dict[tuple, int] = {}  # this run's points in flight -> trial number
        self._others: dict[tuple, int] = {}  # points other tuners are evaluating -> lowest number
        self._running_elsewhere: set[int] = set()  # numbers of other tuners' trials in flight
        self._unsettled: set[int] = set()  # ... of those, the ones whose point is not stored yet
        self._evaluated = 0

    # ------------------------------------------------------------------ encoding

    def _encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {n: self.space.dim(n).encode(values[n]) for n in self.free}

    def _decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(self.fixed)
        for name in self.free:
            values[name] = self.space.dim(name).decode(params[name])
        return values

    # ------------------------------------------------------------------ state from storage

    def _sync(self, initial: bool = False, look_for_lost: bool = True) -> None:
        """Take in what the study holds that this run has not seen: counted trials (earlier
        runs, other tuners), points other tuners are evaluating, and RUNNING trials lost with
        their tuner, which are marked failed (not counted). ``initial``: also count the WAITING
        trials. ``look_for_lost``: also fail trials whose heartbeat stopped."""
        from optuna.trial import TrialState

        if look_for_lost:
            fail_stale(self.study)
        others: dict[tuple, int] = {}
        running: set[int] = set()
        unsettled: set[int] = set()
        for trial in self.study.get_trials(deepcopy=False):
            number = trial.number
            if number in self._seen or number in self._mine:
                continue
            if trial.state == TrialState.WAITING:
                if initial:
                    self._queued += 1  # enqueued by an earlier version: the next ask returns it
                continue
            if trial.state == TrialState.RUNNING:
                if left_behind(trial, self._run_id):
                    self._fail_lost(number)
                    self._seen.add(number)
                else:
                    running.add(number)
                    key = self._key_of(trial.params)
                    if key is None:
                        unsettled.add(number)
                    else:
                        others[key] = min(others.get(key, number), number)
                continue
            self._seen.add(number)
            data = trial.user_attrs.get(ATTR)
            if not isinstance(data, dict) or not data.get("counted") or data.get("run") == self._run_id:
                continue
            values = dict(data["config"])
            outcome = Outcome(ok=bool(data.get("ok")), objective=data.get("objective"),
                              error=data.get("error"), status=data.get("status", "ok"),
                              attrs=dict(data.get("measured") or {}))
            self._record(values, outcome, resumed=True)
        self._others, self._running_elsewhere, self._unsettled = others, running, unsettled

    def _sync_before(self, number: int) -> None:
        """Sync until every other tuner's trial numbered below ``number`` shows its point (a
        sampled trial is stored first and its parameters a moment later)."""
        self._sync(look_for_lost=False)
        for _ in range(SETTLE_TRIES):
            if not any(n < number for n in self._unsettled):
                return
            time.sleep(0.02)
            self._sync(look_for_lost=False)

    def _key_of(self, params: Mapping[str, Any]) -> tuple | None:
        try:
            return point_key(self.space.canonical(self._decode(params)), self.free)
        except (KeyError, IndexError, ValueError, TypeError):  # params not all set yet (another tuner's ask)
            return None

    def _fail_lost(self, number: int) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        except UpdateFinishedTrialError:  # its owner told it after all
            return
        log.info("trial %d of %s was lost with its tuner on this host; it is not counted", number,
                 self.study.study_name)

    def _record(self, values: Mapping[str, Any], outcome: Outcome, *, resumed: bool = False) -> TraceRow:
        key = point_key(values, self.free)
        self._tried[key] = (dict(values), outcome)
        if not outcome.ok:
            self._failure_kinds[outcome.status] += 1
        elif outcome.objective is not None and (
                self._best is None or (outcome.objective, repr(key)) <
                (self._best[1].objective, repr(point_key(self._best[0], self.free)))):
            self._best = (dict(values), outcome)  # ties go to the smaller point: every tuner agrees
        row = TraceRow(len(self._tried), time.monotonic() - self._t0, outcome.objective, outcome.ok,
                       self._best[1].objective if self._best else None, outcome.status)
        if not resumed:
            self._trace.append(row)
        return row

    # ------------------------------------------------------------------ telling

    def _verdict(self, outcome: Outcome) -> tuple[Any, Any]:
        """(value(s), state) the study is told for ``outcome``."""
        from optuna.trial import TrialState

        if self.strategy.multi_objective:
            if outcome.objective is not None and outcome.error is not None:
                return [outcome.objective, outcome.error], TrialState.COMPLETE
            return None, TrialState.FAIL
        if outcome.ok and outcome.objective is not None:
            return outcome.objective, TrialState.COMPLETE
        return FAILURE_PENALTY, TrialState.COMPLETE

    def _tell(self, trial: Any, values: Mapping[str, Any], outcome: Outcome, counted: bool) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        record = {
            "config": dict(values), "counted": counted, "ok": outcome.ok, "status": outcome.status,
            "objective": outcome.objective, "error": outcome.error, "measured": dict(outcome.attrs),
            "run": self._run_id,
        }
        told, state = self._verdict(outcome)
        try:
            trial.set_user_attr(ATTR, record)
            self.study.tell(trial, told, state=None if told is not None else state)
        except (UpdateFinishedTrialError, ValueError):
            if not self._finished_elsewhere(trial.number):
                raise
            # another tuner took this trial for lost (e.g. its heartbeats were late): keep the result
            log.warning("trial %d of %s was marked failed by another tuner while it ran; its result "
                        "is stored as a new trial", trial.number, self.study.study_name)
            self._add_trial(values, record, told, state)
        finally:
            self._release(trial)

    def _release(self, trial: Any) -> None:
        """``trial`` is told: no longer this run's (nor beating), and taken into account."""
        self._heartbeats.remove(trial.number)
        self._mine.pop(trial.number, None)
        self._seen.add(trial.number)

    def _finished_elsewhere(self, number: int) -> bool:
        return any(t.number == number and t.state.is_finished() for t in self.study.get_trials(deepcopy=False))

    def _add_trial(self, values: Mapping[str, Any], record: Mapping[str, Any], told: Any, state: Any) -> None:
        from optuna.trial import create_trial

        kwargs: dict[str, Any] = {}
        if told is not None:
            kwargs["values" if isinstance(told, list) else "value"] = told
        self.study.add_trial(create_trial(state=state, params=self._encode(values), distributions=self._dists,
                                          user_attrs={ATTR: dict(record), OWNER: owner_record(self._run_id)}, **kwargs))

    def _tell_miss(self, trial: Any, values: Mapping[str, Any], reason: str) -> None:
        """Tell a point that is not evaluated: invalid, already tried (same result again), taken
        by another tuner or beyond the budget (failed, so samplers ignore it)."""
        from optuna.trial import TrialState

        prior = self._tried.get(point_key(values, self.free))
        try:
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
            if self.strategy.multi_objective or reason in ("taken", "surplus"):
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, FAILURE_PENALTY)
        finally:
            self._release(trial)

    def outcome_of(self, values: Mapping[str, Any]) -> Outcome | None:
        """The stored outcome of a point already tried in this study (None if not tried)."""
        values = self.space.canonical(values)
        found = self._tried.get(point_key(values, self.free))
        return found[1] if found is not None and found[0] == values else None

    # ------------------------------------------------------------------ the loop

    def _time_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def _ask_batch(self, limit: int) -> tuple[list[tuple[Any, dict[str, Any]]], bool]:
        """Up to ``limit`` new valid untried points; fewer when the budget is spent (trials other
        tuners are running count as spent) or the space runs out.

        Returns (points, dry): ``dry`` when the space ran out."""
        picked: list[tuple[Any, dict[str, Any]]] = []
        misses = 0
        self._sync()
        while len(picked) < limit:
            if len(self._tried) + len(self._pending) + len(self._running_elsewhere) >= self.budget:
                return picked, False
            busy = set(self._pending) | set(self._others)
            tried = set(self._tried) | busy
            queued = self._queued or self._start_point is not None
            if not queued and self.strategy.finished(tried):
                return picked, True
            if self._start_point is not None:
                proposal, self._start_point = self._start_point, None
            else:
                proposal = None if self._queued else self.strategy.propose(tried)
            if proposal is None and misses >= MAX_MISSES and not self._queued:
                proposal = self.strategy.fallback(set(self._tried), busy)
                if proposal is None:
                    return picked, True
                misses = 0
            if proposal is None and not self._queued and self.strategy.finished(tried):
                return picked, True
            if proposal is not None:
                trial = self._start_fixed(proposal)
            else:
                with warnings.catch_warnings():  # this harness records the heartbeats Optuna's warning misses
                    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                    trial = self.study.ask(self._dists)
                self._queued = max(0, self._queued - 1)
            self._mine[trial.number] = trial
            self._heartbeats.add(trial.number)  # first its heartbeat, then its owner: see lost_trials
            trial.set_user_attr(OWNER, owner_record(self._run_id))
            values = self.space.canonical(self._decode(trial.params))  # inert knobs at their defaults
            key = point_key(values, self.free)
            if not self.space.is_valid(values):
                self._tell_miss(trial, values, "invalid")
                misses += 1
                continue
            if key not in self._tried and key not in self._pending:
                self._sync_before(trial.number)  # what finished or started elsewhere meanwhile
            if key in self._tried or key in self._pending:
                self._tell_miss(trial, values, "repeat")
                misses += 1
                continue
            if self._others.get(key, math.inf) < trial.number:  # another tuner asked it first
                self._tell_miss(trial, values, "taken")
                misses += 1
                continue
            ahead = sum(1 for number in self._running_elsewhere if number < trial.number)
            if len(self._tried) + len(self._pending) + ahead >= self.budget:
                self._tell_miss(trial, values, "surplus")  # other tuners asked the budget's last trials first
                return picked, False
            misses = 0
            self._pending[key] = trial.number
            picked.append((trial, values))
        return picked, False

    def _start_fixed(self, values: Mapping[str, Any]) -> Any:
        """A new RUNNING trial of the study holding ``values``' free knobs, created by one insert
        (so no other tuner can claim it), with the sampler's ``before_trial`` run as ``ask`` would."""
        import optuna
        from optuna.trial import TrialState, create_trial

        template = create_trial(state=TrialState.RUNNING, params=self._encode(values), distributions=self._dists)
        return optuna.Trial(self.study, self._study_storage.create_new_trial(self._study_id, template_trial=template))

    def _finish(self, trial: Any, values: Mapping[str, Any], outcome: Outcome) -> None:
        """Tell and record one evaluated trial (in the calling thread)."""
        self._tell(trial, values, outcome, counted=True)
        self._pending.pop(point_key(values, self.free), None)
        self._evaluated += 1
        row = self._record(values, outcome)
        if self.on_trial is not None:
            self.on_trial(values, outcome, row)

    def run(self) -> StageResult:
        self._sync(initial=True)
        if not self._tried and not self._queued and self.start is not None and self.budget > 0:
            start = self.space.canonical({**self.fixed, **self.start})
            if self.space.is_valid(start):
                self._start_point = start
        self._heartbeats.start()
        try:
            dry = self._run_concurrent() if self.submit is not None else self._run_serial()
        finally:
            self._heartbeats.stop()
        return StageResult(
            best_values=dict(self._best[0]) if self._best else None,
            best=self._best[1] if self._best else None,
            counted=len(self._tried),
            failure_kinds=Counter(self._failure_kinds),
            trace=list(self._trace),
            front=self._front(),
            exhausted=dry and len(self._tried) < self.budget,
            evaluated=self._evaluated,
        )

    def _run_serial(self) -> bool:
        """Ask a batch, compile it (``prepare``), evaluate its points one by one. True when the
        space ran dry."""
        while len(self._tried) < self.budget and self._time_left():
            picked, dry = self._ask_batch(self.batch)
            if not picked:
                if dry or not self._running_elsewhere:
                    return dry
                time.sleep(POLL_S)  # the rest of the budget is running elsewhere: wait for it
                continue
            pairs = iter(enumerate([None] * len(picked)) if self.prepare is None
                         else self.prepare([values for _, values in picked]))
            done: set[int] = set()
            try:
                for index, failure in pairs:  # timed as each finishes compiling
                    trial, values = picked[index]
                    done.add(index)
                    self._finish(trial, values, failure if failure is not None else self.evaluate(values))
            finally:
                getattr(pairs, "close", lambda: None)()
            for index in sorted(set(range(len(picked))) - done):  # a stream that gave out early
                trial, values = picked[index]
                self._finish(trial, values, self.evaluate(values))
        return False

    def _run_concurrent(self) -> bool:
        """Keep ``workers`` trials in flight and tell each as it completes. With ``prepare``, in
        rounds instead: ask a batch, compile it, time it on every worker, so that compiling never
        runs beside a timing. True when the space ran dry."""
        in_flight: dict[Future, tuple[Any, dict[str, Any]]] = {}
        dry = False
        while True:
            asked = False
            room = self.workers - len(in_flight) if self.prepare is None else (0 if in_flight else
                                                                               max(self.batch, self.workers))
            if not dry and room > 0 and self._time_left():
                picked, dry = self._ask_batch(room)
                asked = bool(picked)
                prepared: list[Outcome | None] = [None] * len(picked)
                if self.prepare is not None and picked:
                    for index, failure in self.prepare([values for _, values in picked]):
                        prepared[index] = failure
                for (trial, values), failure in zip(picked, prepared):
                    if failure is not None:
                        self._finish(trial, values, failure)
                    else:
                        in_flight[self.submit(values)] = (trial, values)
            if not in_flight:
                if asked:
                    continue
                if dry or not self._running_elsewhere or len(self._tried) >= self.budget or not self._time_left():
                    return dry
                time.sleep(POLL_S)  # the rest of the budget is running elsewhere: wait for it
                continue
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: in_flight[f][0].number):
                trial, values = in_flight.pop(future)
                self._finish(trial, values, future.result())

    def _front(self) -> list[tuple[dict[str, Any], Outcome]]:
        """The points no other dominates in (time, error), fastest first: the study's
        ``best_trials``, each point once (Pareto mode; empty otherwise)."""
        if not self.strategy.multi_objective:
            return []
        front: dict[tuple, tuple[dict[str, Any], Outcome]] = {}
        for trial in self.study.best_trials:
            key = self._key_of(trial.params)
            if key in self._tried:
                front[key] = self._tried[key]
        return sorted(front.values(), key=lambda item: item[1].objective)
