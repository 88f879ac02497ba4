"""What a tuning job reports: one ``ProblemResult`` per problem and ``ProgressEvent`` s on the way."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .outcome import TraceRow
from .problems import Problem

__all__ = ["ProblemResult", "ProgressEvent"]


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
    #: This run wrote the cache entry for the problem, and the cache holds exactly this result
    #: (config, time, confirmation) when the problem is done.
    stored: bool = False
    #: The winner and the default were re-timed side by side (``TuneOptions.confirm``): time_ms and
    #: default_ms are those medians, and a winner that did not beat the default was replaced by it.
    confirmed: bool = False
    objective: str = "fwd"
    front: list[dict[str, Any]] = field(default_factory=list)
    trace: list[TraceRow] = field(default_factory=list)
    wall_s: float = 0.0
    #: Seconds this run spent, summed over the problem's trials: ``trial_<phase>`` inside the timing
    #: worker (``tuner.worker.PHASES``) and ``trial_wall`` around each serial trial (worker hops
    #: included), ``compile_<phase>`` inside compile workers and ``compile_wall`` waiting for them.
    #: ``wall_s`` minus these is the search's own time (Optuna, storage, cache writes).
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> int:
        """Trials that could not win: failed the accuracy gate, or crashed, timed out, ..."""
        return sum(self.failure_kinds.values())

    @property
    def speedup(self) -> float | None:
        if self.time_ms and self.default_ms:
            return self.default_ms / self.time_ms
        return None
