"""Exhaustive search: every valid point of the (pruned) stage space, in declaration order."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from ._base import Strategy, point_key

__all__ = ["GridStrategy", "STRATEGY"]


class GridStrategy(Strategy):
    name = "grid"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._points: Iterator[dict[str, Any]] = self.space.iter_valid(self.free, self.fixed)
        self._done = False

    def sampler(self):
        from optuna.samplers import RandomSampler

        return RandomSampler(seed=self.seed)

    def propose(self, tried: Iterable[tuple]) -> dict[str, Any] | None:
        seen = set(tried)
        for values in self._points:
            if point_key(values, self.free) not in seen:
                return values
        self._done = True
        return None

    def finished(self, tried: Iterable[tuple]) -> bool:
        return self._done


STRATEGY = GridStrategy
