"""A tuning job: problems x search space x budget -> the config cache.

Each problem is searched by ``tuner.problem_search`` (stages, then the final duel of
``tuner.duel``); every trial is checked against the fp64 oracle in a worker process and written
to the study storage as soon as it finishes, and the cache is written by ``tuner.cache_writer``.
Re-running the same job resumes its studies instead of starting over.

Several devices (``TuneOptions.devices``, ``tune --gpus 0,1``) each get an evaluation worker
(``tuner.devices``): several problems are spread over the devices; one problem's trials are timed
on all of them at once. Either way there is one study storage and one cache writer (this
process). Several jobs (processes, hosts) may share one study storage and one cache: see
``tuner.search`` for how they cooperate.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Sequence

from ..kernels.registry import get_spec
from .cache_writer import CacheWriter
from .devices import make_evaluator, spread_problems
from .evaluate import Evaluator, EvaluatorPool
from .options import JobSettings, TuneOptions
from .problem_search import ProblemSearch, stage_budgets
from .problems import Problem
from .results import ProblemResult, ProgressEvent
from .space import target_of
from .strategies import get_strategy
from .studies import default_storage_url, open_storage

__all__ = ["TuneOptions", "ProblemResult", "ProgressEvent", "TuneJob", "run_job", "stage_budgets"]


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
        spec = get_spec(kernel, backend)
        self.options = options or TuneOptions()
        self.progress = progress
        if fingerprint is None:
            from ..device import fingerprint as device_fingerprint

            fingerprint = device_fingerprint(self.options.device)
        fingerprint = fingerprint.as_dict() if hasattr(fingerprint, "as_dict") else dict(fingerprint)
        seed = self.options.seed if self.options.seed is not None else random.randrange(1, 2**31)
        self.settings = JobSettings(kernel=kernel, backend=backend, fingerprint=fingerprint,
                                    target=target_of(backend, fingerprint), kernel_hash=spec.source_hash(),
                                    seed=seed, options=self.options, strategy=get_strategy(self.options.strategy))
        self.writer = CacheWriter(store, self.settings)
        self._own_evaluator = evaluator is None
        self.evaluator = evaluator
        #: Trials timed per evaluator of a multi-device run (filled by ``run``).
        self.device_usage: list[int] = []

    @property
    def seed(self) -> int:
        return self.settings.seed

    def run(self) -> list[ProblemResult]:
        storage = open_storage(self.options.storage or default_storage_url(self.options.cache))
        deadline = None if self.options.time_budget is None else time.monotonic() + self.options.time_budget
        if self.evaluator is None and len(self.options.device_list) > 1 and len(self.problems) > 1:
            return self._run_spread(storage, deadline)
        search = ProblemSearch(self.settings, self.writer, storage, problems=len(self.problems),
                               progress=self.progress)
        if self.evaluator is None:
            self.evaluator = make_evaluator(self.options, self.settings.fingerprint)
        results: list[ProblemResult] = []
        try:
            for index, problem in enumerate(self.problems):
                if deadline is not None and time.monotonic() >= deadline:
                    results.append(self._skipped(index))
                    continue
                share = None
                if deadline is not None:
                    share = time.monotonic() + (deadline - time.monotonic()) / (len(self.problems) - index)
                results.append(search.run(problem, index, share, self.evaluator))
        finally:
            if isinstance(self.evaluator, EvaluatorPool):
                self.device_usage = list(self.evaluator.usage)
            else:
                self.device_usage = [sum(r.evaluated for r in results)]
            if self._own_evaluator and self.evaluator is not None:
                self.evaluator.close()
                self.evaluator = None
        return results

    def _run_spread(self, storage: Any, deadline: float | None) -> list[ProblemResult]:
        """Problems spread over the devices, the store and the progress shared under locks."""
        search = ProblemSearch(self.settings, self.writer, storage, problems=len(self.problems),
                               progress=_locked(self.progress))
        self.writer.lock = threading.Lock()
        try:
            results, self.device_usage = spread_problems(
                self.problems, self.options, self.settings.fingerprint, deadline=deadline, skip=self._skipped,
                tune=lambda index, share, evaluator: search.run(self.problems[index], index, share, evaluator))
        finally:
            self.writer.lock = None
        return results

    def _skipped(self, index: int) -> ProblemResult:
        problem = self.problems[index]
        return ProblemResult(problem, problem.key(self.settings.backend), "skipped")


def _locked(progress: Callable[[ProgressEvent], None] | None) -> Callable[[ProgressEvent], None] | None:
    """``progress`` called under a lock (device threads report at once), or None."""
    if progress is None:
        return None
    lock = threading.Lock()

    def locked(event: ProgressEvent) -> None:
        with lock:
            progress(event)

    return locked


def run_job(problems: Sequence[Problem], *, kernel: str, backend: str, store: Any,
            options: TuneOptions | None = None, **kwargs: Any) -> list[ProblemResult]:
    """Convenience wrapper: ``TuneJob(...).run()``."""
    return TuneJob(problems, kernel=kernel, backend=backend, store=store, options=options, **kwargs).run()
