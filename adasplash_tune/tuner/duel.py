"""The final duel against the winner's curse.

The search keeps the lowest of many noisy readings, so its winner's time is biased low. The
duel re-times the winner and the declared default alternately (``TuneOptions.confirm`` rounds
each) and keeps the winner only if its median beats the default's. The verdict is saved in the
last stage's study, so re-running a finished job does not duel again: it reads the verdict.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .outcome import Outcome
from .space import SearchSpace

__all__ = ["Verdict", "confirm_winner", "median_outcome", "CONFIRM_ATTR", "DUEL_SHARE"]

log = logging.getLogger("adasplash_tune")

#: Study user attribute holding the verdict of the final duel (winner vs default).
CONFIRM_ATTR = "adasplash_tune_confirmed"

#: Share of a problem's time (under a time budget) kept for the final duel.
DUEL_SHARE = 0.15


@dataclass
class Verdict:
    """The duel's winner (values, median outcome with ``confirmed_runs``) and the default's median."""

    winner: tuple[dict[str, Any], Outcome]
    default_ms: float | None
    saved: bool  # read from the study: an earlier run duelled


def median_outcome(outcomes: Sequence[Outcome]) -> Outcome:
    """The run at the median objective (its measurements), noting how many runs it stands for."""
    ranked = sorted(outcomes, key=lambda o: o.objective)
    middle = ranked[(len(ranked) - 1) // 2]
    return Outcome(ok=True, objective=middle.objective, error=middle.error, status="ok",
                   attrs={**middle.attrs, "confirmed_runs": len(ranked)})


def confirm_winner(study: Any, space: SearchSpace, best: tuple[Mapping[str, Any], Outcome],
                   evaluate: Callable[[Mapping[str, Any]], Outcome], *, rounds: int, label: str,
                   default_ms: float | None = None, deadline: float | None = None) -> Verdict | None:
    """The verdict on the search's ``best``: the one saved in ``study`` for this winner, else a
    new duel of ``rounds`` (saved in ``study``). Under a time budget the rounds after the first
    stop at ``deadline``. None when neither contender ran again (keep the search's result)."""
    winner_key = space.canonical(best[0])
    saved = study.user_attrs.get(CONFIRM_ATTR) if study is not None else None
    if isinstance(saved, dict) and saved.get("search_winner") == winner_key:
        outcome = Outcome(ok=True, objective=saved["objective"], error=saved.get("error"), status="ok",
                          attrs=dict(saved.get("attrs") or {}))
        return Verdict((dict(saved["config"]), outcome), saved.get("default_ms", default_ms), saved=True)
    verdict = _duel(space, dict(best[0]), evaluate, rounds, label, default_ms, deadline)
    if verdict is not None and study is not None:
        config, outcome = verdict.winner
        study.set_user_attr(CONFIRM_ATTR, {
            "search_winner": winner_key, "config": config, "objective": outcome.objective, "error": outcome.error,
            "attrs": outcome.attrs, "default_ms": verdict.default_ms})
    return verdict


def _duel(space: SearchSpace, values: dict[str, Any], evaluate: Callable[[Mapping[str, Any]], Outcome],
          rounds: int, label: str, default_ms: float | None, deadline: float | None) -> Verdict | None:
    default_values = space.default_values()
    contenders = {"best": values}
    if space.canonical(values) != space.canonical(default_values):
        contenders["default"] = default_values
    runs: dict[str, list[Outcome]] = {name: [] for name in contenders}
    for round_index in range(rounds):
        if round_index and deadline is not None and time.monotonic() >= deadline:
            break
        for name, candidate in contenders.items():
            outcome = evaluate(candidate)
            if outcome.ok and outcome.objective is not None:
                runs[name].append(outcome)
    medians = {name: median_outcome(found) for name, found in runs.items() if found}
    if not medians:
        log.warning("%s: neither the winner nor the default ran again; keeping the search's result", label)
        return None
    winner_name = "best"
    if "default" in medians and ("best" not in medians or medians["default"].objective <= medians["best"].objective):
        winner_name = "default"
        log.info("%s: the default (%.4g ms) matched the search's winner (%.4g ms) when re-timed; keeping it",
                 label, medians["default"].objective,
                 medians["best"].objective if "best" in medians else float("nan"))
    if "default" in medians:
        default_ms = medians["default"].objective
    elif "default" not in contenders:
        default_ms = medians["best"].objective  # the winner is the default
    return Verdict((dict(contenders[winner_name]), medians[winner_name]), default_ms, saved=False)
