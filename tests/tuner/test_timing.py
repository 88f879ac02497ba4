"""Timing: early stop once the median is stable, rep rounds, and a trial's phase breakdown."""

from __future__ import annotations

import random

from adasplash_tune.tuner.evaluate import Evaluator, TrialRequest
from adasplash_tune.tuner.problems import AttentionProblem
from adasplash_tune.tuner.timing import ROUND_REPS, TimingOptions, _rounds, is_stable, measure
from adasplash_tune.tuner.worker import PHASES


def test_rounds_cover_the_reps_with_a_first_round_of_at_least_min_reps():
    for n, lo in [(1, 1), (5, 5), (19, 5), (20, 5), (37, 5), (500, 5), (64, 40)]:
        sizes = _rounds(n, lo)
        assert sum(sizes) == n and all(s > 0 for s in sizes)
        assert sizes[0] >= min(n, lo)
        assert all(s <= ROUND_REPS for s in sizes[1:])


def test_a_tight_reading_is_stable_and_a_noisy_or_short_one_is_not():
    rng = random.Random(3)
    tight = [1.0 + 0.001 * rng.random() for _ in range(2 * ROUND_REPS)]
    noisy = [1.0 + rng.random() for _ in range(2 * ROUND_REPS)]
    assert is_stable(tight, 0.005)
    assert not is_stable(noisy, 0.005)
    assert not is_stable(tight[: 2 * ROUND_REPS - 1], 0.005)  # too few reps to judge
    assert not is_stable(tight, 0.0)  # 0: never stop early


def test_measure_stops_early_only_when_allowed():
    calls = []

    def fn():
        calls.append(1)

    budget = TimingOptions(warmup_ms=0.0, rep_ms=1e6, min_reps=1, max_reps=200, stable=0.5)
    early = measure(fn, "cpu", budget)
    assert 2 * ROUND_REPS <= early.reps < 200
    full = measure(fn, "cpu", TimingOptions(warmup_ms=0.0, rep_ms=1e6, min_reps=1, max_reps=200, stable=0.0))
    assert full.reps == 200


def test_a_trial_reports_where_its_time_went():
    problem = AttentionProblem(batch=1, heads=2, kv_heads=2, seq_len=48, head_dim=16, alpha=1.5, causal=False)
    quick = TimingOptions(warmup_ms=1.0, rep_ms=5.0, min_reps=3, max_reps=10)
    with Evaluator("cpu", in_process=True) as ev:
        first = ev.evaluate(TrialRequest(problem, "torch", {}, backward=True, timing=quick))
        again = ev.evaluate(TrialRequest(problem, "torch", {"q_chunk": 16}, backward=True, timing=quick))
    assert first.ok and again.ok
    assert set(first.phases) == set(PHASES)
    assert all(v >= 0 for v in first.phases.values())
    assert sum(first.phases.values()) <= first.wall_s + 1e-6
    # the inputs and the oracle are built once per problem: the second trial builds nothing
    assert set(again.phases) == set(PHASES) - {"setup"}


def test_the_timing_worker_builds_the_oracle_ahead_and_the_first_trial_waits_for_it():
    problem = AttentionProblem(batch=1, heads=2, kv_heads=2, seq_len=64, head_dim=16, alpha=1.5, causal=True)
    quick = TimingOptions(warmup_ms=1.0, rep_ms=5.0, min_reps=3, max_reps=10)
    request = TrialRequest(problem, "torch", {}, backward=True, timing=quick)
    with Evaluator("cpu", threads=1) as ev:
        ev.prepare_problem(request)  # returns at once; the worker builds inputs and oracle
        result = ev.evaluate(request)
    assert result.ok
    assert "setup" not in result.phases and "first_call" in result.phases  # built ahead, not in the trial
