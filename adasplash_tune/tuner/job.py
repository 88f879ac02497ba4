"""A tuning job: problems x search space x budget -> the config cache.

For each problem the space is built from the kernel's declaration (``tuner.space``) and searched
stage by stage (tau/mask, then forward, then backward; one stage for the torch backend), each
stage leaving only its own knobs free and holding the others at the best found so far. Every
trial is checked against the fp64 oracle in a worker process and written to the study storage
as soon as it finishes; the best valid config is upserted into the cache each time it improves.
Re-running the same job resumes its studies instead of starting over.

Several devices (``TuneOptions.devices``, ``tune --gpus 0,1``) each get an evaluation worker.
With several problems, the problems are spread over the devices (largest first, each device
tuning one problem at a time with its own worker and compile pool), so compiling, the oracle and
timing all run in parallel. With one problem, its search times one trial per device at once
(batches compiled first when there is a compile pool) and tells results as they complete. Either
way there is one study storage and one cache writer (this process). Several jobs (processes, hosts) may share one study storage and one cache: see
``tuner.search`` for how they cooperate.

The objective is the measured time of what the job tunes: the forward pass, or forward +
backward when the job tunes backward (by default: when the kernel declares backward knobs).
The Pareto mode (strategy ``nsga2``) instead explores the accuracy knobs for the time x error
front, with the launch knobs held at the cached (or default) config.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..kernels.registry import get_spec
from .evaluate import Evaluator, EvaluatorPool, TrialRequest, TrialResult
from .problems import Problem
from .search import Outcome, StageSearch, TraceRow
from .space import SearchSpace, build_space, device_context, target_of
from .strategies import DEFAULT_STRATEGY, get_strategy
from .studies import default_storage_url, open_storage, study_name
from .timing import TimingOptions

__all__ = ["TuneOptions", "ProblemResult", "ProgressEvent", "TuneJob", "run_job", "stage_budgets"]

log = logging.getLogger("adasplash_tune")

TOOL = "adasplash-tune tune"

#: Study user attribute holding the verdict of the final duel (winner vs default).
CONFIRM_ATTR = "adasplash_tune_confirmed"

#: Share of a problem's time (under a time budget) kept for the final duel.
DUEL_SHARE = 0.15


@dataclass
class TuneOptions:
    """How a job searches. ``trials`` counts evaluated configs per problem (split over stages)."""

    strategy: str = DEFAULT_STRATEGY
    trials: int = 30
    time_budget: float | None = None  # seconds for the whole job
    seed: int | None = None  # None: a fresh seed per run
    backward: bool | None = None  # None: tune backward when the space has a backward stage
    storage: str | None = None  # Optuna storage URL; None: beside the user cache
    cache: str | None = None  # the cache location (only used to place the default storage)
    device: str = "cpu"
    #: Devices to time on, one evaluation worker each (None: ``device`` alone). The first one
    #: is the device the results are stored for; all must be the same model.
    devices: Sequence[str] | None = None
    compile_workers: int = 0
    threads: int | None = None  # torch threads in the timing worker (None: 1 on CPU)
    trial_timeout: float = 300.0
    timing: TimingOptions = field(default_factory=TimingOptions)
    staged: bool = True  # False: every knob free in one stage
    #: A config that moves an accuracy knob (iterations, init) off its default must reach this
    #: fraction of the tolerance: headroom, since the gate sees one input and users see others.
    accuracy_headroom: float = 0.5
    restrict: Mapping[str, Sequence[Any]] = field(default_factory=dict)  # bounded spaces
    #: Rounds of the final duel: the winner and the default re-timed alternately this many
    #: times each; the default is kept unless the winner's median beats it (0: no duel).
    confirm: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be a positive int, got {self.trials!r}")
        if not 0 < self.accuracy_headroom <= 1:
            raise ValueError(f"accuracy headroom must be in (0, 1], got {self.accuracy_headroom!r}")
        if isinstance(self.confirm, bool) or not isinstance(self.confirm, int) or self.confirm < 0:
            raise ValueError(f"confirm must be an int >= 0, got {self.confirm!r}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time budget must be positive seconds, got {self.time_budget!r}")
        if self.devices is not None:
            if isinstance(self.devices, str) or not self.devices or not all(
                    isinstance(d, str) and d for d in self.devices):
                raise ValueError(f"devices must be a non-empty list of device names, got {self.devices!r}")
            self.devices = tuple(self.devices)
            self.device = self.devices[0]
        get_strategy(self.strategy)  # unknown names fail here, before any work

    @property
    def device_list(self) -> tuple[str, ...]:
        """The devices trials are timed on."""
        return tuple(self.devices) if self.devices is not None else (self.device,)


@dataclass
class ProgressEvent:
    """A counted trial of one problem's stage, or (``stage == "done"``) the problem's outcome:
    ``best_ms`` its stored time and ``status`` the ProblemResult status."""

    problem_index: int  # 1-based
    problems: int
    label: str
    stage: str
    trial: int  # counted trials of this problem so far
    trials: int  # the problem's budget
    best_ms: float | None
    status: str


@dataclass
class ProblemResult:
    """The outcome for one problem (what the summary table shows)."""

    problem: Problem
    key: dict[str, Any]
    status: str  # "tuned", "no-valid-config", "skipped"
    config: dict[str, Any] | None = None
    time_ms: float | None = None
    spread_ms: float | None = None
    default_ms: float | None = None
    error: float | None = None
    grad_error: float | None = None
    trials: int = 0  # counted trials of the problem's studies (other runs' included)
    evaluated: int = 0  # trials this run evaluated
    failure_kinds: Counter[str] = field(default_factory=Counter)  # status -> count ("accuracy": gate)
    stored: bool = False
    #: The winner and the default were re-timed side by side (``TuneOptions.confirm``): time_ms and
    #: default_ms are those medians, and a winner that did not beat the default was replaced by it.
    confirmed: bool = False
    objective: str = "fwd"
    front: list[dict[str, Any]] = field(default_factory=list)
    trace: list[TraceRow] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failures(self) -> int:
        """Trials that could not win: failed the accuracy gate, or crashed, timed out, ..."""
        return sum(self.failure_kinds.values())

    @property
    def speedup(self) -> float | None:
        if self.time_ms and self.default_ms:
            return self.default_ms / self.time_ms
        return None


def stage_budgets(total: int, stages: int) -> list[int]:
    """``total`` trials split evenly over ``stages`` (earlier stages take the remainder; >= 1 each)."""
    base, rest = divmod(total, stages)
    return [max(1, base + (1 if i < rest else 0)) for i in range(stages)]


def _cost(problem: Problem) -> float:
    """Rough relative work of one trial (orders problems largest first across devices)."""
    if problem.kernel == "adasplash":
        work = problem.batch * problem.heads * problem.seq_len ** 2 * problem.head_dim
        return work / 2 if problem.causal else work
    return float(problem.rows * problem.cols)


def _median_outcome(outcomes: Sequence[Outcome]) -> Outcome:
    """The run at the median objective (its measurements), noting how many runs it stands for."""
    ranked = sorted(outcomes, key=lambda o: o.objective)
    middle = ranked[(len(ranked) - 1) // 2]
    return Outcome(ok=True, objective=middle.objective, error=middle.error, status="ok",
                   attrs={**middle.attrs, "confirmed_runs": len(ranked)})


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


def _outcome(result: TrialResult) -> Outcome:
    attrs = {k: v for k, v in result.to_dict().items() if k not in ("status",)}
    attrs["spread_ms"] = result.spread_ms
    return Outcome(ok=result.ok, objective=result.time_ms, error=result.error, status=result.status,
                   attrs=attrs)


class TuneJob:
    """Tune ``problems`` of ``kernel`` on ``backend`` and write the winners to ``store``."""

    def __init__(
        self,
        problems: Sequence[Problem],
        *,
        kernel: str,
        backend: str,
        store: Any,
        options: TuneOptions | None = None,
        evaluator: Evaluator | None = None,
        fingerprint: Any = None,
        progress: Callable[[ProgressEvent], None] | None = None,
    ) -> None:
        self.problems = list(problems)
        for problem in self.problems:
            if problem.kernel != kernel:
                raise ValueError(f"problem {problem.label()} is for {problem.kernel}, not {kernel}")
        self.kernel, self.backend = kernel, backend
        self.spec = get_spec(kernel, backend)
        self.store = store
        self.options = options or TuneOptions()
        self.progress = progress
        if fingerprint is None:
            from ..device import fingerprint as device_fingerprint

            fingerprint = device_fingerprint(self.options.device)
        self.fingerprint = fingerprint.as_dict() if hasattr(fingerprint, "as_dict") else dict(fingerprint)
        self.target = target_of(backend, self.fingerprint)
        self.kernel_hash = self.spec.source_hash()
        self._own_evaluator = evaluator is None
        self.evaluator = evaluator
        self.seed = self.options.seed if self.options.seed is not None else random.randrange(1, 2**31)
        self.strategy_cls = get_strategy(self.options.strategy)
        #: Trials timed per evaluator of a multi-device run (filled by ``run``).
        self.device_usage: list[int] = []
        self._store_lock: threading.Lock | None = None  # set while device threads share the store

    # ------------------------------------------------------------------ setup

    def space_for(self, problem: Problem) -> SearchSpace:
        context = {**problem.context(), **device_context(self.fingerprint)}
        space = build_space(self.kernel, self.backend, target=self.target, context=context)
        return space.restrict(self.options.restrict) if self.options.restrict else space

    def _backward(self, space: SearchSpace) -> bool:
        if self.options.backward is not None:
            return self.options.backward
        return "bwd" in space.stages

    def _plan(self, space: SearchSpace) -> list[tuple[str, tuple[str, ...]]]:
        """(stage name, free knobs) in order."""
        if self.strategy_cls.multi_objective:
            free = space.free_names(space.accuracy_names)
            if not free:
                raise ValueError(f"{self.kernel} ({self.backend}) declares no accuracy knobs to explore")
            return [("pareto", free)]
        if not self.options.staged:
            return [("all", space.free_names(space.names))]
        plan = [(stage, space.free_names(space.stage_names(stage))) for stage in space.stages]
        return [(stage, free) for stage, free in plan if free]

    def _start_values(self, space: SearchSpace, key: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults; in Pareto mode the launch knobs come from the cached entry when there is one."""
        values = space.default_values()
        if self.strategy_cls.multi_objective:
            with self._guard():
                entry = self.store.get_exact(self.fingerprint["device_id"], self.kernel, self.backend,
                                             self.kernel_hash, dict(key))
            if entry is not None and not entry.failed_verify:
                values = space.canonical(entry.config)
        return values

    # ------------------------------------------------------------------ running

    def run(self) -> list[ProblemResult]:
        import optuna

        storage = open_storage(self.options.storage or default_storage_url(self.options.cache))
        deadline = None if self.options.time_budget is None else time.monotonic() + self.options.time_budget
        if self.evaluator is None and len(self.options.device_list) > 1 and len(self.problems) > 1:
            return self._run_spread(storage, deadline, optuna)
        if self.evaluator is None:
            self.evaluator = self._make_evaluator()
        results: list[ProblemResult] = []
        try:
            for index, problem in enumerate(self.problems):
                if deadline is not None and time.monotonic() >= deadline:
                    results.append(ProblemResult(problem, problem.key(self.backend), "skipped"))
                    continue
                share = None
                if deadline is not None:
                    share = time.monotonic() + (deadline - time.monotonic()) / (len(self.problems) - index)
                results.append(self._tune(problem, index, storage, share, optuna))
        finally:
            if isinstance(self.evaluator, EvaluatorPool):
                self.device_usage = list(self.evaluator.usage)
            else:
                self.device_usage = [sum(r.evaluated for r in results)]
            if self._own_evaluator and self.evaluator is not None:
                self.evaluator.close()
                self.evaluator = None
        return results

    def _run_spread(self, storage: Any, deadline: float | None, optuna: Any) -> list[ProblemResult]:
        """Problems spread over the devices: one thread per device takes the largest problem not
        started yet and tunes it with that device's own evaluator (worker and compile pool)."""
        devices = self.options.device_list
        self._check_same_model(devices)
        workers_each = self.options.compile_workers // len(devices)
        kwargs = self._evaluator_kwargs(devices)
        todo: queue.Queue[int] = queue.Queue()
        for index in sorted(range(len(self.problems)), key=lambda i: -_cost(self.problems[i])):
            todo.put(index)
        results: dict[int, ProblemResult] = {}
        errors: list[BaseException] = []
        self.device_usage = [0] * len(devices)
        self._store_lock = threading.Lock()
        progress, progress_lock = self.progress, threading.Lock()
        if progress is not None:
            def locked_progress(event: ProgressEvent) -> None:
                with progress_lock:
                    progress(event)

            self.progress = locked_progress

        def device_loop(slot: int, device: str) -> None:
            evaluator = Evaluator(device, compile_workers=workers_each, **kwargs)
            try:
                while not errors:
                    try:
                        index = todo.get_nowait()
                    except queue.Empty:
                        return
                    problem = self.problems[index]
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        results[index] = ProblemResult(problem, problem.key(self.backend), "skipped")
                        continue
                    share = None
                    if deadline is not None:  # this problem's fair part of what is left on all devices
                        left = todo.qsize() + 1
                        share = min(deadline, now + (deadline - now) * len(devices) / left)
                    log.info("%s: tuning %s", device, problem.label())
                    results[index] = self._tune(problem, index, storage, share, optuna, evaluator)
                    self.device_usage[slot] += results[index].evaluated
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)
            finally:
                evaluator.close()

        threads = [threading.Thread(target=device_loop, args=(slot, device), daemon=True,
                                    name=f"adasplash-tune-{device}") for slot, device in enumerate(devices)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            self.progress = progress
            self._store_lock = None
        if errors:
            raise errors[0]
        return [results[i] for i in range(len(self.problems))]

    def _evaluator_kwargs(self, devices: Sequence[str]) -> dict[str, Any]:
        threads = self.options.threads
        if threads is None and not str(devices[0]).startswith("cuda"):
            threads = 1  # one thread times small CPU problems far more steadily
        return {"trial_timeout": self.options.trial_timeout, "threads": threads}

    def _check_same_model(self, devices: Sequence[str]) -> None:
        if not any(str(d).startswith("cuda") for d in devices):
            return
        from ..device import fingerprint as device_fingerprint

        for device in devices[1:]:
            other = device_fingerprint(device).as_dict()
            if other.get("device_id") != self.fingerprint.get("device_id"):
                raise ValueError(f"{device} is a {other.get('name')}, {devices[0]} a "
                                 f"{self.fingerprint.get('name')}: tune different GPU models in separate runs")

    def _make_evaluator(self) -> Evaluator | EvaluatorPool:
        """One evaluator, or a pool of one per device (all of the fingerprinted model)."""
        devices = self.options.device_list
        kwargs = self._evaluator_kwargs(devices)
        if len(devices) == 1:
            return Evaluator(devices[0], compile_workers=self.options.compile_workers, **kwargs)
        self._check_same_model(devices)
        return EvaluatorPool.for_devices(devices, compile_workers=self.options.compile_workers, **kwargs)

    def _tune(self, problem: Problem, index: int, storage: Any, deadline: float | None, optuna: Any,
              evaluator: Any = None) -> ProblemResult:
        evaluator = self.evaluator if evaluator is None else evaluator
        t0 = time.monotonic()
        key = problem.key(self.backend)
        space = self.space_for(problem)
        backward = self._backward(space)
        objective = "fwd+bwd" if backward else "fwd"
        result = ProblemResult(problem, key, "no-valid-config", objective=objective)
        best_values = self._start_values(space, key)
        default_values = space.default_values()
        plan = self._plan(space)
        budgets = stage_budgets(self.options.trials, len(plan)) if plan else []
        best: tuple[dict[str, Any], Outcome] | None = None
        counted_before = 0
        last_study: Any = None
        log.info("tuning %s (%s): %s", problem.label(), objective, space.describe().splitlines()[0])

        def evaluate(values: Mapping[str, Any]) -> Outcome:
            return _outcome(evaluator.evaluate(self._request(problem, space, values, backward)))

        def prepare(batch: Sequence[Mapping[str, Any]]) -> list[Outcome | None]:
            reqs = [self._request(problem, space, v, backward) for v in batch]
            compiled = evaluator.compile(reqs)
            return [None if r.ok else _outcome(r) for r in compiled]

        workers = int(getattr(evaluator, "capacity", 1))

        def submit(values: Mapping[str, Any]) -> "Future[Outcome]":
            return _then(evaluator.submit(self._request(problem, space, values, backward)), _outcome)

        duel = bool(self.options.confirm) and not self.strategy_cls.multi_objective
        search_end = deadline
        if deadline is not None and duel:  # the final duel's share of the problem's time
            search_end = deadline - DUEL_SHARE * max(0.0, deadline - time.monotonic())
        carry = 0  # trials a stage left unused because its space ran out go to the next stage
        for stage_index, ((stage, free), budget) in enumerate(zip(plan, budgets)):
            if search_end is not None and time.monotonic() >= search_end:
                break
            budget += carry
            stage_deadline = None
            if search_end is not None:
                stage_deadline = time.monotonic() + (search_end - time.monotonic()) / (len(plan) - stage_index)
            fixed = {n: v for n, v in best_values.items() if n not in free}
            name = study_name(device_id=self.fingerprint["device_id"], kernel=self.kernel, backend=self.backend,
                              kernel_hash=self.kernel_hash, key=key, stage=stage, fixed=fixed,
                              objective=objective + ("|pareto" if self.strategy_cls.multi_objective else ""))
            strategy = self.strategy_cls(space, free, best_values, seed=self.seed + stage_index, budget=budget)
            directions = ["minimize", "minimize"] if strategy.multi_objective else ["minimize"]
            study = optuna.create_study(storage=storage, study_name=name, sampler=strategy.sampler(),
                                        directions=directions, load_if_exists=True)
            last_study = study

            def on_trial(values: Mapping[str, Any], outcome: Outcome, row: TraceRow,
                         stage: str = stage, base: int = counted_before) -> None:
                nonlocal best
                if not outcome.ok:
                    self._record_failure(key, space, values, outcome)
                elif outcome.objective is not None and (best is None or outcome.objective < best[1].objective):
                    best = (dict(values), outcome)
                    result.stored = self._upsert(problem, space, best, base + row.index) or result.stored
                result.trace.append(TraceRow(base + row.index, time.monotonic() - t0, row.objective, row.ok,
                                             best[1].objective if best else None, row.status))
                if self.progress is not None:
                    self.progress(ProgressEvent(index + 1, len(self.problems), problem.label(), stage,
                                                base + row.index, sum(budgets), best[1].objective if best else None,
                                                outcome.status))

            concurrent = workers > 1
            search = StageSearch(
                study, strategy, space, budget=budget, evaluate=evaluate, deadline=stage_deadline,
                prepare=prepare if evaluator.compile_workers > 0 else None,
                batch=max(1, evaluator.compile_workers), start=best_values, on_trial=on_trial,
                submit=submit if concurrent else None, workers=workers,
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
                result.stored = self._upsert(problem, space, best, counted_before) or result.stored
            if best is not None:
                best_values = dict(best[0])
            default = search.outcome_of(default_values)
            if default is not None and default.ok and result.default_ms is None:
                result.default_ms = default.objective
            if stage_result.front:
                result.front = [self._front_row(v, o, space) for v, o in stage_result.front]

        if result.default_ms is None and plan and not space.is_valid(default_values):
            result.default_ms = self._baseline(problem, space, backward, evaluator)
        if best is not None and duel:
            if deadline is None or time.monotonic() < deadline:
                best = self._confirm(problem, space, backward, best, evaluator, result, counted_before, last_study,
                                     deadline)
            else:
                log.info("%s: no time left for the final duel; the search's winner is stored unconfirmed",
                         problem.label())
        result.trials = counted_before
        result.wall_s = time.monotonic() - t0
        if best is not None:
            values, outcome = best
            result.status = "tuned"
            result.config = space.split(values)[0]
            result.time_ms = outcome.objective
            result.spread_ms = outcome.attrs.get("spread_ms")
            result.error = outcome.error
            result.grad_error = outcome.attrs.get("grad_error")
        elif not plan:
            result.status = "tuned" if self._fixed_point(problem, space, backward, result, evaluator) else "no-valid-config"
        if self.progress is not None:  # the problem's last event: its outcome
            self.progress(ProgressEvent(index + 1, len(self.problems), problem.label(), "done", result.trials,
                                        sum(budgets) if budgets else result.trials, result.time_ms, result.status))
        return result

    def _confirm(self, problem: Problem, space: SearchSpace, backward: bool, best: tuple[dict[str, Any], Outcome],
                 evaluator: Any, result: ProblemResult, trials: int, study: Any,
                 deadline: float | None = None) -> tuple[dict[str, Any], Outcome]:
        """The duel against the winner's curse: the search keeps the lowest of many noisy readings,
        so its winner's time is biased low. Re-time the winner and the declared default alternately
        (``confirm`` rounds each); keep the winner only if its median beats the default's, and
        store the confirmed median (replacing the search's reading). The verdict is kept in the
        last stage's study, so re-running a finished job does not duel again. Under a time budget
        the rounds after the first stop at ``deadline``."""
        values, _ = best
        default_values = space.default_values()
        done = study.user_attrs.get(CONFIRM_ATTR) if study is not None else None
        if isinstance(done, dict) and done.get("search_winner") == space.canonical(values):
            result.confirmed = True
            result.default_ms = done.get("default_ms", result.default_ms)
            outcome = Outcome(ok=True, objective=done["objective"], error=done.get("error"), status="ok",
                              attrs=dict(done.get("attrs") or {}))
            return dict(done["config"]), outcome
        contenders = {"best": values}
        if space.canonical(values) != space.canonical(default_values):
            contenders["default"] = default_values
        runs: dict[str, list[Outcome]] = {name: [] for name in contenders}
        for round_index in range(self.options.confirm):
            if round_index and deadline is not None and time.monotonic() >= deadline:
                break
            for name, candidate in contenders.items():
                outcome = _outcome(evaluator.evaluate(self._request(problem, space, candidate, backward)))
                if outcome.ok and outcome.objective is not None:
                    runs[name].append(outcome)
        medians = {name: _median_outcome(found) for name, found in runs.items() if found}
        if "best" not in medians and "default" not in medians:
            log.warning("%s: neither the winner nor the default ran again; keeping the search's result",
                        problem.label())
            return best
        winner_name = "best"
        if "default" in medians and ("best" not in medians or
                                     medians["default"].objective <= medians["best"].objective):
            winner_name = "default"
        if "default" in medians:
            result.default_ms = medians["default"].objective
        elif winner_name == "best" and "default" not in contenders:
            result.default_ms = medians["best"].objective  # the winner is the default
        winner = (dict(contenders[winner_name]), medians[winner_name])
        if winner_name == "default":
            log.info("%s: the default (%.4g ms) matched the search's winner (%.4g ms) when re-timed; keeping it",
                     problem.label(), medians["default"].objective,
                     medians["best"].objective if "best" in medians else float("nan"))
        result.confirmed = True
        result.stored = self._upsert(problem, space, winner, trials, replace=True) or result.stored
        if study is not None:
            study.set_user_attr(CONFIRM_ATTR, {
                "search_winner": space.canonical(values), "config": winner[0], "objective": winner[1].objective,
                "error": winner[1].error, "attrs": winner[1].attrs, "default_ms": result.default_ms})
        return winner

    def _baseline(self, problem: Problem, space: SearchSpace, backward: bool, evaluator: Any) -> float | None:
        """Time of the declared default when it is not a point of the pruned space (e.g. a tile
        wider than the problem, which the kernel clamps): measured once, for the speed-up only."""
        values = space.default_values()
        outcome = _outcome(evaluator.evaluate(self._request(problem, space, values, backward)))
        return outcome.objective if outcome.ok else None

    def _fixed_point(self, problem: Problem, space: SearchSpace, backward: bool, result: ProblemResult,
                     evaluator: Any) -> bool:
        """A space with no free knob: measure its single config once."""
        values = space.default_values()
        outcome = _outcome(evaluator.evaluate(self._request(problem, space, values, backward)))
        result.trials = result.evaluated = 1
        if not outcome.ok:
            return False
        result.config = space.split(values)[0]
        result.time_ms = result.default_ms = outcome.objective
        result.error = outcome.error
        result.stored = self._upsert(problem, space, (values, outcome), 1)
        return True

    # ------------------------------------------------------------------ pieces

    def _guard(self) -> Any:
        """The store's lock while device threads share it, else a no-op context."""
        return self._store_lock if self._store_lock is not None else contextlib.nullcontext()

    def _request(self, problem: Problem, space: SearchSpace, values: Mapping[str, Any], backward: bool) -> TrialRequest:
        config, extras = space.split(values)
        defaults = space.default_values()
        lowered = any(values[n] != defaults[n] for n in space.accuracy_names)
        return TrialRequest(problem=problem, backend=self.backend, config=config, extras=extras,
                            backward=backward, seed=self.seed,
                            time_if_inaccurate=self.strategy_cls.multi_objective, timing=self.options.timing,
                            gate=self.options.accuracy_headroom if lowered else 1.0)

    def _front_row(self, values: Mapping[str, Any], outcome: Outcome, space: SearchSpace) -> dict[str, Any]:
        return {"config": space.split(values)[0], "time_ms": outcome.objective, "error": outcome.error,
                "ok": outcome.ok}

    def _upsert(self, problem: Problem, space: SearchSpace, best: tuple[dict[str, Any], Outcome],
                trials: int, replace: bool = False) -> bool:
        from ..cache.store import Entry

        values, outcome = best
        key = problem.key(self.backend)
        config, extras = space.split(values)
        provenance = {"tool": TOOL, "objective": "fwd+bwd" if outcome.attrs.get("bwd_ms") is not None else "fwd",
                      "fwd_ms": outcome.attrs.get("fwd_ms"), "bwd_ms": outcome.attrs.get("bwd_ms"),
                      "grad_error": outcome.attrs.get("grad_error"), "target": space.target,
                      "backward": outcome.attrs.get("bwd_ms") is not None, "problem": problem.to_dict(),
                      "seed": self.seed}
        if extras:
            provenance["launch_extras"] = extras
        if replace:
            provenance["confirmed_runs"] = outcome.attrs.get("confirmed_runs")
        entry = Entry(kernel=self.kernel, backend=self.backend, device=dict(self.fingerprint),
                      kernel_hash=self.kernel_hash, key=dict(key), config=config, time_ms=outcome.objective,
                      spread_ms=outcome.attrs.get("spread_ms"), error=outcome.error, trials=int(trials),
                      strategy=self.options.strategy, provenance=provenance)
        try:
            with self._guard():
                if replace:
                    self.store.replace(entry)
                    stored = True
                else:
                    stored = bool(self.store.upsert_best(entry))
        except ValueError as exc:  # an entry the cache rejects is a bug worth a loud log line
            log.warning("cache rejected the tuned entry for %s: %s", dict(key), exc)
            return False
        if stored:
            log.info("stored %s for %s (%.4g ms)", config, dict(key), outcome.objective)
        return stored

    def _record_failure(self, key: Mapping[str, Any], space: SearchSpace, values: Mapping[str, Any],
                        outcome: Outcome) -> None:
        config, _ = space.split(values)
        try:
            with self._guard():
                self.store.record_failure(dict(self.fingerprint), self.kernel, self.backend, self.kernel_hash,
                                          dict(key), config, outcome.status, str(outcome.attrs.get("detail", "")))
        except ValueError as exc:
            log.warning("could not record failure %s for %s: %s", outcome.status, config, exc)


def run_job(problems: Sequence[Problem], *, kernel: str, backend: str, store: Any,
            options: TuneOptions | None = None, **kwargs: Any) -> list[ProblemResult]:
    """Convenience wrapper: ``TuneJob(...).run()``."""
    return TuneJob(problems, kernel=kernel, backend=backend, store=store, options=options, **kwargs).run()
