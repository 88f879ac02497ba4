"""The strategy interface shared by every search strategy.

A strategy decides *what* to try next; the harness (``tuner.search``) keeps the loop, the
device and the trial log (an Optuna study driven by ask/tell). A strategy either supplies an
Optuna sampler that picks the next point from the study's history, or proposes points itself
(``propose``), which the harness enqueues before asking.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from optuna.samplers import BaseSampler

    from ..space import SearchSpace

__all__ = ["Strategy", "point_key"]


def point_key(values: Mapping[str, Any], free: Sequence[str]) -> tuple:
    """Hashable identity of a point: its free knobs' values in order."""
    return tuple(values[name] for name in free)


class Strategy(ABC):
    """Base class: one stage of one problem, ``free`` knobs varying, the rest at ``fixed``."""

    name: ClassVar[str] = ""
    #: Pareto mode: the study minimises (time, error) instead of time alone.
    multi_objective: ClassVar[bool] = False

    def __init__(self, space: "SearchSpace", free: Sequence[str], fixed: Mapping[str, Any],
                 *, seed: int = 0, budget: int = 0) -> None:
        self.space = space
        self.free = tuple(free)
        self.fixed = dict(fixed)
        self.seed = seed
        self.budget = budget
        self.rng = random.Random(seed)

    @abstractmethod
    def sampler(self) -> "BaseSampler":
        """The Optuna sampler the study is created with."""

    def propose(self, tried: Iterable[tuple]) -> dict[str, Any] | None:
        """A complete config to evaluate next, or None to let the sampler choose."""
        return None

    def finished(self, tried: Iterable[tuple]) -> bool:
        """True when the strategy has nothing left to propose."""
        return False

    def fallback(self, tried: set[tuple], pending: set[tuple] = frozenset()) -> dict[str, Any] | None:
        """A random valid untried config (used when the sampler keeps repeating itself)."""
        exclude = set(tried) | set(pending)
        if self.space.size(self.free) <= 20000:
            points = [v for v in self.space.iter_valid(self.free, self.fixed)
                      if point_key(v, self.free) not in exclude]
            return self.rng.choice(points) if points else None
        for _ in range(200):
            values = self.space.sample(self.rng, self.free, self.fixed)
            if values is not None and point_key(values, self.free) not in exclude:
                return values
        return None
