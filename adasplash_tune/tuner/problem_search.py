"""The search of one problem: its space searched stage by stage, then the final duel.

The space is built from the kernel's declaration (``tuner.space``) and searched stage by stage
(tau/mask, then forward, then backward; one stage for the torch backend), each stage leaving
only its own knobs free and holding the others at the best found so far. Each stage is one
Optuna study (``tuner.search``), so a re-run resumes it. The best valid reading is written to
the cache each time it improves (``tuner.cache_writer``); the duel's verdict (``tuner.duel``)
replaces it at the end.

The objective is the measured time of what the job tunes: the forward pass, or forward +
backward when the job tunes backward (by default: when the kernel declares backward knobs).
The Pareto mode (strategy ``nsga2``) instead explores the accuracy knobs for the time x error
front, with the launch knobs held at the cached (or default) config.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Mapping, Sequence

from .cache_writer import CacheWriter
from .duel import DUEL_SHARE, confirm_winner
from .evaluate import TrialRequest, TrialResult
from .options import JobSettings
from .outcome import Outcome, TraceRow, outcome_of
from .inputs import inputs_label
from .problems import Problem
from .results import ProblemResult, ProgressEvent
from .search import StageSearch
from .space import SearchSpace, build_space, device_context
from .studies import study_name

__all__ = ["ProblemSearch", "stage_budgets"]

log = logging.getLogger("adasplash_tune")

Point = tuple[dict[str, Any], Outcome]


def stage_budgets(total: int, stages: int) -> list[int]:
    """``total`` trials split evenly over ``stages`` (earlier stages take the remainder; >= 1 each)."""
    base, rest = divmod(total, stages)
    return [max(1, base + (1 if i < rest else 0)) for i in range(stages)]


class _Trials:
    """One problem's configs sent to an evaluator, their results turned into Outcomes."""

    def __init__(self, settings: JobSettings, problem: Problem, space: SearchSpace, backward: bool,
                 evaluator: Any) -> None:
        self.settings, self.problem, self.space, self.backward = settings, problem, space, backward
        self.evaluator = evaluator
        self.workers = int(getattr(evaluator, "capacity", 1))
        self.compile_workers = int(getattr(evaluator, "compile_workers", 0))
        self.phases: dict[str, float] = {}  # where the problem's trial time went (``ProblemResult.phases``)
        self._lock = threading.Lock()  # results of several devices arrive in pool threads
        self._set_up = False  # the timing worker was asked to build the problem's oracle ahead

    def _account(self, prefix: str, result: TrialResult, wall_s: float | None = None) -> TrialResult:
        with self._lock:
            for name, seconds in result.phases.items():
                self.phases[prefix + name] = self.phases.get(prefix + name, 0.0) + float(seconds)
            if wall_s is not None:
                self.phases[prefix + "wall"] = self.phases.get(prefix + "wall", 0.0) + wall_s
        return result

    def request(self, values: Mapping[str, Any]) -> TrialRequest:
        s = self.settings
        config, extras = self.space.split(values)
        defaults = self.space.default_values()
        lowered = any(values[n] != defaults[n] for n in self.space.accuracy_names)
        return TrialRequest(problem=self.problem, backend=s.backend, config=config, extras=extras,
                            backward=self.backward, seed=s.seed, time_if_inaccurate=s.pareto,
                            timing=s.options.timing, gate=s.options.accuracy_headroom if lowered else 1.0)

    def evaluate(self, values: Mapping[str, Any]) -> Outcome:
        start = time.perf_counter()
        result = self.evaluator.evaluate(self.request(values))
        return outcome_of(self._account("trial_", result, time.perf_counter() - start))

    def prepare(self, batch: Sequence[Mapping[str, Any]]) -> Iterator[tuple[int, Outcome | None]]:
        """Compile ``batch`` in the compile workers; yields ``(index, None)`` (compiled) or
        ``(index, failure)`` as each finishes, so its trials are timed while the rest compile.
        The first batch of a problem also has the timing worker build the inputs and the oracle
        meanwhile."""
        requests = [self.request(v) for v in batch]
        if not self._set_up and requests and hasattr(self.evaluator, "prepare_problem"):
            self.evaluator.prepare_problem(requests[0])
        self._set_up = True
        stream = getattr(self.evaluator, "compile_stream", None)
        pairs = stream(requests) if stream is not None else enumerate(self.evaluator.compile(requests))
        start = time.perf_counter()
        try:
            for index, result in pairs:
                self._account("compile_", result)
                with self._lock:
                    self.phases["compile_wall"] = self.phases.get("compile_wall", 0.0) + time.perf_counter() - start
                yield index, (None if result.ok else outcome_of(result))
                start = time.perf_counter()
        finally:
            close = getattr(pairs, "close", None)
            if close is not None:
                close()

    def submit(self, values: Mapping[str, Any]) -> "Future[Outcome]":
        return _then(self.evaluator.submit(self.request(values)), lambda r: outcome_of(self._account("trial_", r)))


def _then(future: "Future[TrialResult]", convert: Callable[[TrialResult], Outcome]) -> "Future[Outcome]":
    """A future of ``convert(result)`` (errors pass through)."""
    out: Future[Outcome] = Future()

    def done(source: "Future[TrialResult]") -> None:
        try:
            out.set_result(convert(source.result()))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on ``out``
            out.set_exception(exc)

    future.add_done_callback(done)
    return out


class ProblemSearch:
    """Tunes problems one at a time (``run``) for a job: ``problems`` is the job's count (for
    progress), ``storage`` the Optuna storage of its studies."""

    def __init__(self, settings: JobSettings, writer: CacheWriter, storage: Any, *, problems: int,
                 progress: Callable[[ProgressEvent], None] | None = None) -> None:
        self.settings = settings
        self.writer = writer
        self.storage = storage
        self.problems = problems
        self.progress = progress

    # ------------------------------------------------------------------ setup

    def space_for(self, problem: Problem) -> SearchSpace:
        s = self.settings
        context = {**problem.context(), **device_context(s.fingerprint)}
        space = build_space(s.kernel, s.backend, target=s.target, context=context)
        return space.restrict(s.options.restrict) if s.options.restrict else space

    def _backward(self, space: SearchSpace) -> bool:
        if self.settings.options.backward is not None:
            return self.settings.options.backward
        return "bwd" in space.stages

    def _plan(self, space: SearchSpace) -> list[tuple[str, tuple[str, ...]]]:
        """(stage name, free knobs) in order."""
        s = self.settings
        if s.pareto:
            free = space.free_names(space.accuracy_names)
            if not free:
                raise ValueError(f"{s.kernel} ({s.backend}) declares no accuracy knobs to explore")
            return [("pareto", free)]
        if not s.options.staged:
            return [("all", space.free_names(space.names))]
        plan = [(stage, space.free_names(space.stage_names(stage))) for stage in space.stages]
        return [(stage, free) for stage, free in plan if free]

    def _start_values(self, problem: Problem, space: SearchSpace) -> dict[str, Any]:
        """Defaults; in Pareto mode the launch knobs come from the cached entry when there is one."""
        values = space.default_values()
        if self.settings.pareto:
            entry = self.writer.cached(problem)
            if entry is not None and not entry.failed_verify:
                values = space.canonical(entry.config)
        return values

    # ------------------------------------------------------------------ one problem

    def run(self, problem: Problem, index: int, deadline: float | None, evaluator: Any) -> ProblemResult:
        """Tune ``problem`` (the job's ``index``-th, 0-based) on ``evaluator`` until ``deadline``."""
        s = self.settings
        t0 = time.monotonic()
        space = self.space_for(problem)
        backward = self._backward(space)
        result = ProblemResult(problem, problem.key(s.backend), "no-valid-config",
                               objective="fwd+bwd" if backward else "fwd")
        trials = _Trials(s, problem, space, backward, evaluator)
        plan = self._plan(space)
        budgets = stage_budgets(s.options.trials, len(plan)) if plan else []
        log.info("tuning %s (%s): %s", problem.label(), result.objective, space.describe().splitlines()[0])

        duel = bool(s.options.confirm) and not s.pareto
        search_end = deadline
        if deadline is not None and duel:  # the final duel's share of the problem's time
            search_end = deadline - DUEL_SHARE * max(0.0, deadline - time.monotonic())
        best, last_study = self._search(problem, index, space, plan, budgets, trials, result, search_end, t0)

        if result.default_ms is None and plan and not space.is_valid(space.default_values()):
            result.default_ms = self._baseline(space, trials)
        if best is not None and duel:
            if deadline is None or time.monotonic() < deadline:
                best = self._confirm(problem, space, best, trials, result, last_study, deadline)
            else:
                log.info("%s: no time left for the final duel; the search's winner stays unconfirmed",
                         problem.label())
        if best is None and not plan:
            best = self._fixed_point(problem, space, trials, result)
        if best is not None:
            values, outcome = best
            result.status = "tuned"
            result.config = space.split(values)[0]
            result.time_ms = outcome.objective
            result.spread_ms = outcome.attrs.get("spread_ms")
            result.error = outcome.error
            result.grad_error = outcome.attrs.get("grad_error")
            result.stored = self.writer.wrote(problem) and self.writer.holds(problem, space, best)
        result.wall_s = time.monotonic() - t0
        result.phases = {name: round(seconds, 4) for name, seconds in sorted(trials.phases.items())}
        if self.progress is not None:  # the problem's last event: its outcome
            self.progress(ProgressEvent(index + 1, self.problems, problem.label(), "done", result.trials,
                                        sum(budgets) if budgets else result.trials, result.time_ms, result.status))
        return result

    def _search(self, problem: Problem, index: int, space: SearchSpace, plan: list[tuple[str, tuple[str, ...]]],
                budgets: list[int], trials: _Trials, result: ProblemResult, search_end: float | None,
                t0: float) -> tuple[Point | None, Any]:
        """The stages in order; returns the best point found and the last stage's study."""
        import optuna

        s = self.settings
        key = result.key
        best_values = self._start_values(problem, space)
        default_values = space.default_values()
        best: Point | None = None
        counted_before = 0
        last_study: Any = None
        carry = 0  # trials a stage left unused because its space ran out go to the next stage
        for stage_index, ((stage, free), budget) in enumerate(zip(plan, budgets)):
            if search_end is not None and time.monotonic() >= search_end:
                break
            budget += carry
            stage_deadline = None
            if search_end is not None:
                stage_deadline = time.monotonic() + (search_end - time.monotonic()) / (len(plan) - stage_index)
            fixed = {n: v for n, v in best_values.items() if n not in free}
            name = study_name(device_id=s.device_id, kernel=s.kernel, backend=s.backend, kernel_hash=s.kernel_hash,
                              key=key, stage=stage, fixed=fixed,
                              objective=result.objective + ("|pareto" if s.pareto else "")
                              + _inputs_suffix(problem))
            strategy = s.strategy(space, free, best_values, seed=s.seed + stage_index, budget=budget)
            directions = ["minimize", "minimize"] if strategy.multi_objective else ["minimize"]
            study = optuna.create_study(storage=self.storage, study_name=name, sampler=strategy.sampler(),
                                        directions=directions, load_if_exists=True)
            last_study = study

            def on_trial(values: Mapping[str, Any], outcome: Outcome, row: TraceRow,
                         stage: str = stage, base: int = counted_before) -> None:
                nonlocal best
                if not outcome.ok:
                    self.writer.record_failure(problem, space, values, outcome)
                elif outcome.objective is not None and (best is None or outcome.objective < best[1].objective):
                    best = (dict(values), outcome)
                    self.writer.store_reading(problem, space, best, base + row.index)
                result.trace.append(TraceRow(base + row.index, time.monotonic() - t0, row.objective, row.ok,
                                             best[1].objective if best else None, row.status))
                if self.progress is not None:
                    self.progress(ProgressEvent(index + 1, self.problems, problem.label(), stage,
                                                base + row.index, sum(budgets), best[1].objective if best else None,
                                                outcome.status))

            search = StageSearch(
                study, strategy, space, budget=budget, evaluate=trials.evaluate, deadline=stage_deadline,
                prepare=trials.prepare if trials.compile_workers > 0 else None,
                batch=max(1, trials.compile_workers), start=best_values, on_trial=on_trial,
                submit=trials.submit if trials.workers > 1 else None, workers=trials.workers,
                storage=self.storage,
            )
            stage_result = search.run()
            counted_before += stage_result.counted
            result.evaluated += stage_result.evaluated
            carry = budget - stage_result.counted if stage_result.exhausted else 0
            result.failure_kinds.update(stage_result.failure_kinds)
            if stage_result.best is not None and (best is None or stage_result.best.objective <= best[1].objective):
                # found in an earlier run or by another tuner; on a tie the stage's choice, which
                # every tuner sharing the study makes alike
                best = (stage_result.best_values, stage_result.best)
                self.writer.store_reading(problem, space, best, counted_before)
            if best is not None:
                best_values = dict(best[0])
            default = search.outcome_of(default_values)
            if default is not None and default.ok and result.default_ms is None:
                result.default_ms = default.objective
            if stage_result.front:
                result.front = [_front_row(v, o, space) for v, o in stage_result.front]
        result.trials = counted_before
        return best, last_study

    def _confirm(self, problem: Problem, space: SearchSpace, best: Point, trials: _Trials,
                 result: ProblemResult, study: Any, deadline: float | None) -> Point:
        """The duel's verdict (saved or new), made what the cache holds; ``best`` when no contender ran."""
        verdict = confirm_winner(study, space, best, trials.evaluate, rounds=self.settings.options.confirm,
                                 label=problem.label(), default_ms=result.default_ms, deadline=deadline)
        if verdict is None:
            return best
        result.confirmed = True
        result.default_ms = verdict.default_ms
        if not self.writer.holds(problem, space, verdict.winner):
            self.writer.store_confirmed(problem, space, verdict.winner, result.trials)
        return verdict.winner

    def _baseline(self, space: SearchSpace, trials: _Trials) -> float | None:
        """Time of the declared default when it is not a point of the pruned space (e.g. a tile
        wider than the problem, which the kernel clamps): measured once, for the speed-up only."""
        outcome = trials.evaluate(space.default_values())
        return outcome.objective if outcome.ok else None

    def _fixed_point(self, problem: Problem, space: SearchSpace, trials: _Trials,
                     result: ProblemResult) -> Point | None:
        """A space with no free knob: measure its single config once."""
        values = space.default_values()
        outcome = trials.evaluate(values)
        result.trials = result.evaluated = 1
        if not outcome.ok:
            return None
        result.default_ms = outcome.objective
        self.writer.store_reading(problem, space, (values, outcome), 1)
        return values, outcome


def _inputs_suffix(problem: Problem) -> str:
    """A study name part for non-randn inputs: trials timed on other inputs are not resumed."""
    inputs = getattr(problem, "inputs", "randn")
    return "" if inputs == "randn" else f"|inputs={inputs_label(inputs)}"


def _front_row(values: Mapping[str, Any], outcome: Outcome, space: SearchSpace) -> dict[str, Any]:
    return {"config": space.split(values)[0], "time_ms": outcome.objective, "error": outcome.error,
            "ok": outcome.ok}
