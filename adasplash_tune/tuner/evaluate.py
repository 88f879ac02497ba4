"""Evaluation: compile candidates in parallel worker processes, time them serially on the device.

``EvaluatorPool`` runs one ``Evaluator`` per device (``tune --gpus 0,1``): trials are timed on
several devices at once, each device still serially.

Each trial runs in a worker process (``tuner.worker``), never in the tuner's own process: a
compile error or an exception comes back as a typed status; a timeout, a dead process (crash,
``os._exit``, segfault) or a CUDA error that poisons the context is turned into a typed result
here and the worker is replaced, so the run goes on.

Statuses: ``ok``, ``invalid``, ``compile``, ``runtime``, ``timeout``, ``accuracy``, ``crash``
(the reasons ``ConfigStore.record_failure`` takes).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from .problems import Problem
from .timing import TimingOptions
from .worker import FAULT_ENV, run_trial

__all__ = ["TrialRequest", "TrialResult", "Evaluator", "EvaluatorPool", "EvaluationError", "STATUSES"]

log = logging.getLogger("adasplash_tune")

STATUSES = ("ok", "invalid", "compile", "runtime", "timeout", "accuracy", "crash")


class EvaluationError(RuntimeError):
    """The evaluation machinery itself failed (e.g. a worker process could not start)."""


@dataclass(frozen=True)
class TrialRequest:
    """Everything a worker needs to run one config on one problem (plain data)."""

    problem: Problem
    backend: str
    config: Mapping[str, Any]
    extras: Mapping[str, Any] = field(default_factory=dict)
    backward: bool = False
    seed: int = 0
    time_if_inaccurate: bool = False
    timing: TimingOptions = TimingOptions()
    gate: float = 1.0  # fraction of the dtype's tolerance the errors must stay within

    def payload(self, device: str, fault: str | None, compile_only: bool = False,
                setup_only: bool = False) -> dict[str, Any]:
        """The worker's request: ``compile_only`` compiles (no check, no timing); ``setup_only``
        builds the problem's inputs and oracle ahead of its trials."""
        return {
            "problem": self.problem.to_dict(), "backend": self.backend, "config": dict(self.config),
            "extras": dict(self.extras), "backward": self.backward, "seed": self.seed,
            "time_if_inaccurate": self.time_if_inaccurate, "timing": self.timing.to_dict(), "gate": self.gate,
            "device": device, "fault": fault, "compile_only": compile_only, "setup_only": setup_only,
        }


@dataclass(frozen=True)
class TrialResult:
    """A typed trial outcome. Times in ms; errors are relative errors against the fp64 oracle."""

    status: str
    detail: str = ""
    fwd_ms: float | None = None
    fwd_spread_ms: float | None = None
    bwd_ms: float | None = None
    bwd_spread_ms: float | None = None
    error: float | None = None
    grad_error: float | None = None
    reps: int = 0
    wall_s: float = 0.0
    #: Seconds per step inside the worker (``tuner.worker.PHASES``); empty when it never ran.
    phases: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def time_ms(self) -> float | None:
        """Forward time, plus backward time when it was measured."""
        if self.fwd_ms is None:
            return None
        return self.fwd_ms + (self.bwd_ms or 0.0)

    @property
    def spread_ms(self) -> float | None:
        if self.fwd_spread_ms is None:
            return None
        return self.fwd_spread_ms + (self.bwd_spread_ms or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_payload(data: Mapping[str, Any]) -> "TrialResult":
        known = {k: data[k] for k in TrialResult.__dataclass_fields__ if k in data}
        return TrialResult(**known)


def _context():
    """Workers fork from a server process that has already imported torch and this package
    (fast to replace; CUDA is never touched before the fork); spawn where there is no fork."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["adasplash_tune.tuner.worker"])
        return ctx
    return mp.get_context("spawn")


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, device: str, threads: int | None, start_timeout: float) -> None:
        from .worker import worker_main

        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, device, threads, dict(os.environ)),
                                   daemon=True, name="adasplash-tune-worker")
        self.process.start()
        child.close()
        if not self.conn.poll(start_timeout):
            self.kill()
            raise EvaluationError(f"evaluation worker did not start within {start_timeout:.0f}s")
        try:
            self.conn.recv()
        except (EOFError, OSError):
            code = self.kill()
            raise EvaluationError(f"evaluation worker died while starting (exit code {code})") from None

    def call(self, payload: Mapping[str, Any], timeout: float) -> TrialResult:
        try:
            self.conn.send(dict(payload))
        except (BrokenPipeError, OSError):
            return TrialResult("crash", f"worker was gone (exit code {self.kill()})")
        if not self.conn.poll(timeout):
            self.kill()
            return TrialResult("timeout", f"no result within {timeout:.0f}s; worker killed")
        try:
            data = self.conn.recv()
        except (EOFError, OSError):
            return TrialResult("crash", f"worker died (exit code {self.kill()})")
        result = TrialResult.from_payload(data)
        if data.get("poisoned"):
            self.kill()
        return result

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(5)
        self.kill()

    def kill(self) -> int | None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
        return self.process.exitcode


class Evaluator:
    """Runs trials in worker processes on one device.

    ``device``: 'cpu' or 'cuda:N'. ``trial_timeout``: seconds a trial may take (compile and
    oracle included). ``compile_workers``: processes that compile a batch in parallel before it
    is timed (0: no separate compile step; useful for Triton on a GPU). ``threads``: torch threads
    of the timing worker (None: torch's default). ``fault``: fault injection
    rules (see ``tuner.worker``; default: $ADASPLASH_TUNE_FAULT). ``in_process``: run trials in
    this process (no isolation; for quick unit tests of the logic only).
    """

    def __init__(
        self,
        device: str = "cpu",
        *,
        trial_timeout: float = 300.0,
        start_timeout: float = 300.0,
        compile_workers: int = 0,
        threads: int | None = None,
        compile_threads: int = 1,
        fault: str | None = None,
        in_process: bool = False,
    ) -> None:
        if trial_timeout <= 0:
            raise ValueError(f"trial_timeout must be positive, got {trial_timeout}")
        if compile_workers < 0:
            raise ValueError(f"compile_workers must be >= 0, got {compile_workers}")
        self.device = device
        self.trial_timeout = float(trial_timeout)
        self.start_timeout = float(start_timeout)
        self.compile_workers = int(compile_workers)
        self.threads = threads
        self.compile_threads = compile_threads
        self.fault = os.environ.get(FAULT_ENV) if fault is None else fault
        self.in_process = in_process
        self.replaced = 0
        self._timer: _Worker | None = None
        self._pool: list[_Worker] = []
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._timer_lock = threading.Lock()  # one request at a time on the timing worker's pipe

    # ------------------------------------------------------------------ serial timing

    def evaluate(self, request: TrialRequest) -> TrialResult:
        """Check and time one config (serially, on the device)."""
        with self._timer_lock:
            return self._evaluate(request.payload(self.device, self.fault), request)

    def prepare_problem(self, request: TrialRequest) -> None:
        """Start building ``request``'s inputs and fp64 oracle in the timing worker, in the
        background (while the compile workers compile the first batch); the next ``evaluate``
        waits for it. Failures are left for that trial to report."""
        if self.in_process:
            return
        self._timer_lock.acquire()

        def build() -> None:
            try:
                self._evaluate(request.payload(self.device, self.fault, setup_only=True), request)
            except Exception as exc:  # noqa: BLE001 - the first real trial meets the same problem
                log.debug("building the problem ahead failed: %s", exc)
            finally:
                self._timer_lock.release()

        threading.Thread(target=build, name="adasplash-tune-setup", daemon=True).start()

    def _evaluate(self, payload: Mapping[str, Any], request: TrialRequest) -> TrialResult:
        if self.in_process:
            return TrialResult.from_payload(run_trial(payload, self._state))
        if self._timer is None or not self._timer.alive:
            if self._timer is not None:
                self.replaced += 1
            self._timer = _Worker(self.device, self.threads, self.start_timeout)
        result = self._timer.call(payload, self.trial_timeout)
        if result.status in ("timeout", "crash") or not self._timer.alive:
            log.warning("trial %s: %s (%s); starting a fresh worker", dict(request.config), result.status,
                        result.detail)
        return result

    # ------------------------------------------------------------------ parallel compile

    def compile(self, requests: Sequence[TrialRequest]) -> list[TrialResult]:
        """Compile (run once, no timing) each request in the compile pool, in parallel.

        Returns one result per request: ``ok`` when it compiled and ran, else the typed failure.
        Without compile workers every request is reported ``ok`` (compiled when timed).
        """
        results = dict(self.compile_stream(requests))
        return [results[i] for i in range(len(requests))]

    def compile_stream(self, requests: Sequence[TrialRequest]) -> Iterator[tuple[int, TrialResult]]:
        """Like :meth:`compile`, but yields ``(index, result)`` as each request finishes compiling,
        so that the caller times the first ones while the rest still compile (compile workers run
        no kernel: ``kernels.launch.compile_only``)."""
        if self.compile_workers == 0 or self.in_process or not requests:
            yield from ((i, TrialResult("ok", "not precompiled")) for i in range(len(requests)))
            return
        pool = ThreadPoolExecutor(max_workers=self.compile_workers)
        try:
            futures = {pool.submit(self._compile_one, r): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _compile_one(self, request: TrialRequest) -> TrialResult:
        with self._lock:
            worker = self._pool.pop() if self._pool else None
        if worker is None or not worker.alive:
            if worker is not None:
                self.replaced += 1
            worker = _Worker(self.device, self.compile_threads, self.start_timeout)
        result = worker.call(request.payload(self.device, self.fault, compile_only=True), self.trial_timeout)
        if worker.alive:
            with self._lock:
                self._pool.append(worker)
        else:
            self.replaced += 1
        return result

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        workers = ([self._timer] if self._timer is not None else []) + self._pool
        for worker in workers:
            worker.stop()
        self._timer = None
        self._pool = []

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EvaluatorPool:
    """Several evaluators (one per device) timing trials concurrently, each device serially.

    ``submit(request)`` returns a Future of the :class:`TrialResult`, timed on whichever device
    is free first; ``capacity`` is the number of devices. ``compile`` goes to the first
    evaluator's compile pool (kernels compiled once are in Triton's on-disk cache for every
    device of the host). ``usage[i]`` counts the trials timed on evaluator ``i``. Evaluators may
    be any objects with ``evaluate``, ``compile``, ``compile_workers`` and ``close`` (tests use
    table evaluators).
    """

    def __init__(self, evaluators: Sequence[Any]) -> None:
        if not evaluators:
            raise ValueError("an evaluator pool needs at least one evaluator")
        self.evaluators = list(evaluators)
        self.usage = [0] * len(self.evaluators)
        self._free: queue.Queue[int] = queue.Queue()
        for index in range(len(self.evaluators)):
            self._free.put(index)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def for_devices(cls, devices: Sequence[str], *, compile_workers: int = 0, **kwargs: Any) -> "EvaluatorPool":
        """One :class:`Evaluator` per device; only the first owns a compile pool."""
        return cls([Evaluator(device, compile_workers=compile_workers if i == 0 else 0, **kwargs)
                    for i, device in enumerate(devices)])

    @property
    def capacity(self) -> int:
        return len(self.evaluators)

    @property
    def compile_workers(self) -> int:
        return int(getattr(self.evaluators[0], "compile_workers", 0))

    def submit(self, request: TrialRequest) -> "Future[TrialResult]":
        """Time ``request`` on the first free device (in a pool thread)."""
        with self._lock:
            if self._closed:
                raise EvaluationError("the evaluator pool is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.capacity,
                                                    thread_name_prefix="adasplash-tune-device")
            return self._executor.submit(self._run, request)

    def evaluate(self, request: TrialRequest) -> TrialResult:
        """One trial, waiting for its result (baselines and fixed points)."""
        return self.submit(request).result()

    def compile(self, requests: Sequence[TrialRequest]) -> list[TrialResult]:
        return self.evaluators[0].compile(requests)

    def compile_stream(self, requests: Sequence[TrialRequest]) -> Iterator[tuple[int, TrialResult]]:
        first = self.evaluators[0]
        if hasattr(first, "compile_stream"):
            return first.compile_stream(requests)
        return iter(enumerate(first.compile(requests)))

    def _run(self, request: TrialRequest) -> TrialResult:
        index = self._free.get()
        try:
            if self._closed:  # closing while this trial waited for a device: start no worker
                return TrialResult("crash", "evaluation stopped (the pool was closed)")
            return self.evaluators[index].evaluate(request)
        finally:
            with self._lock:
                self.usage[index] += 1
            self._free.put(index)

    def close(self) -> None:
        """Cancel queued trials, stop every evaluator's workers (a trial still running comes back
        as a crash), then join the threads."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        for evaluator in self.evaluators:
            evaluator.close()
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> "EvaluatorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
