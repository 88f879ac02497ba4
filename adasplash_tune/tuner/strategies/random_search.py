"""Random search without replacement over the valid points of the stage space."""

from __future__ import annotations

from typing import Any, Iterable

from ._base import Strategy, point_key

__all__ = ["RandomStrategy", "STRATEGY"]

#: Spaces up to this many raw points are enumerated and shuffled; larger ones are sampled.
ENUMERATE_LIMIT = 50000


class RandomStrategy(Strategy):
    name = "random"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._order: list[dict[str, Any]] | None = None
        if self.space.size(self.free) <= ENUMERATE_LIMIT:
            self._order = list(self.space.iter_valid(self.free, self.fixed))
            self.rng.shuffle(self._order)
        self._done = False

    def sampler(self):
        from optuna.samplers import RandomSampler

        return RandomSampler(seed=self.seed)

    def propose(self, tried: Iterable[tuple]) -> dict[str, Any] | None:
        seen = set(tried)
        if self._order is not None:
            while self._order:
                values = self._order.pop()
                if point_key(values, self.free) not in seen:
                    return values
            self._done = True
            return None
        values = self.fallback(seen)
        if values is None:
            self._done = True
        return values

    def finished(self, tried: Iterable[tuple]) -> bool:
        return self._done


STRATEGY = RandomStrategy
