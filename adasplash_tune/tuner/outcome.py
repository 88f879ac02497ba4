"""What one evaluated config gives the search (``Outcome``) and one row of a search's trace."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .evaluate import TrialResult

__all__ = ["Outcome", "TraceRow", "outcome_of"]


@dataclass
class Outcome:
    """What one evaluation gives the search.

    ``ok``: it ran and passed the accuracy gate, so it may win. ``objective`` is the time to
    minimise (ms; may be set for a gate failure too, for the Pareto front); ``error`` the
    measured relative error; ``status`` the typed result; ``attrs`` extra facts to store.
    """

    ok: bool
    objective: float | None
    error: float | None = None
    status: str = "ok"
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TraceRow:
    """One counted trial as seen by the search (for progress and benchmark curves)."""

    index: int
    wall_s: float
    objective: float | None
    ok: bool
    best: float | None
    status: str


def outcome_of(result: TrialResult) -> Outcome:
    """The search's view of a worker's result: its time (fwd, + bwd when measured) and facts."""
    attrs = {k: v for k, v in result.to_dict().items() if k != "status"}
    attrs["spread_ms"] = result.spread_ms
    return Outcome(ok=result.ok, objective=result.time_ms, error=result.error, status=result.status,
                   attrs=attrs)
