"""Search strategies, one module each, loaded by name on first use (optional dependencies such
as ``cmaes`` are imported only when their strategy is chosen).

Every module exposes ``STRATEGY``, a :class:`~adasplash_tune.tuner.strategies._base.Strategy`
subclass. ``tpe`` is the default; ``nsga2`` is the multi-objective (time x error) Pareto mode.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ._base import Strategy

__all__ = ["STRATEGIES", "DEFAULT_STRATEGY", "get_strategy"]

#: Strategy name -> module (relative to this package).
STRATEGIES: dict[str, str] = {
    "tpe": ".tpe",
    "random": ".random_search",
    "grid": ".grid",
    "cmaes": ".cma_es",
    "nsga2": ".nsga2",
}
DEFAULT_STRATEGY = "tpe"


def get_strategy(name: str) -> type["Strategy"]:
    """The strategy class registered under ``name`` (ValueError for unknown names)."""
    try:
        module_name = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None
    module = importlib.import_module(module_name, __name__)
    return module.STRATEGY
