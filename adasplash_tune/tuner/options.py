"""How a tuning job searches (``TuneOptions``) and the facts every part of one job shares
(``JobSettings``: kernel, backend, device, kernel source hash, seed, strategy)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .strategies import DEFAULT_STRATEGY, get_strategy
from .timing import TimingOptions

if TYPE_CHECKING:  # pragma: no cover
    from .strategies._base import Strategy

__all__ = ["TuneOptions", "JobSettings", "default_compile_workers", "MAX_DEFAULT_COMPILE_WORKERS"]

#: The most compile workers a GPU tuning job starts unless told otherwise. On the H200 host (16
#: cores, 2026-12-03, results/h200-tuner-workers.json) a (4,16,4096,64) fwd+bwd job ran 57 trials/min
#: with 8 workers and 62 with 12 or 16 (24 trials), 77 against 90 with 16 (48 trials).
MAX_DEFAULT_COMPILE_WORKERS = 16


def default_compile_workers() -> int:
    """Compile workers of a GPU tuning job by default: one per CPU core, at most
    :data:`MAX_DEFAULT_COMPILE_WORKERS` (each is a process that imports torch and Triton)."""
    return max(1, min(MAX_DEFAULT_COMPILE_WORKERS, os.cpu_count() or 1))


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


@dataclass(frozen=True)
class JobSettings:
    """What one job tunes and for which device: the same for each of its problems."""

    kernel: str
    backend: str
    fingerprint: Mapping[str, Any]  # the device the results are stored for
    target: str  # "cuda", "rocm" or "cpu" (``space.target_of``)
    kernel_hash: str  # the kernel source hash cache entries are stored under
    seed: int
    options: TuneOptions
    strategy: type["Strategy"]

    @property
    def device_id(self) -> str:
        return str(self.fingerprint["device_id"])

    @property
    def pareto(self) -> bool:
        """The multi-objective (time x error) mode of ``nsga2``."""
        return bool(self.strategy.multi_objective)
