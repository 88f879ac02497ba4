"""Tuning jobs with a table evaluator: staging, resume, caching, budgets (no kernel runs)."""

from __future__ import annotations

import optuna
import pytest

from adasplash_tune.kernels.registry import get_spec
from adasplash_tune.tuner.job import TuneJob, TuneOptions, stage_budgets
from adasplash_tune.tuner.problems import AttentionProblem, EntmaxProblem

from .conftest import FAKE_GPU, TableEvaluator, log2_bowl

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROBLEM = AttentionProblem(batch=2, heads=4, kv_heads=2, seq_len=1000, head_dim=80, alpha=1.5, causal=True,
                           dtype="bfloat16")
#: The separable optimum of the synthetic table below (tau/mask, forward and backward knobs).
CENTRE = {"tau_block_m": 32, "tau_block_n": 128, "mask_m": 32, "mask_n": 64, "fwd_block_m": 64,
          "fwd_block_n": 128, "fwd_warps": 8, "bwd_block_m": 32, "bwd_block_n": 64, "bwd_warps": 4}


def _triton_job(store, storage_url, evaluator, *, trials=150, strategy="grid", **options):
    default = get_spec("adasplash", "triton").default().as_dict()
    fixed = ("tau_warps", "tau_stages", "niter", "fwd_stages", "bwd_stages", "tau_init", "tau_tol", "mask_source",
             "bwd_q_warps", "bwd_q_stages")
    bounded = {**{name: (default[name],) for name in fixed},
               "tau_block_m": (32, 64), "tau_block_n": (64, 128), "mask_m": (32, 64), "mask_n": (32, 64),
               "fwd_block_m": (64, 128), "fwd_block_n": (64, 128), "fwd_warps": (4, 8),
               "bwd_block_m": (32, 64), "bwd_block_n": (64, 128), "bwd_warps": (4, 8),
               # knobs the synthetic table ignores: held at one value
               "bwd_q_block_m": (64,), "bwd_q_block_n": (64,)}
    opts = TuneOptions(strategy=strategy, trials=trials, storage=storage_url, seed=5, restrict=bounded, **options)
    events = []
    job = TuneJob([PROBLEM], kernel="adasplash", backend="triton", store=store, options=opts, evaluator=evaluator,
                  fingerprint=FAKE_GPU, progress=events.append)
    return job, events


def test_staged_search_tunes_tau_then_forward_then_backward_and_caches_the_winner(store, storage_url):
    evaluator = TableEvaluator(log2_bowl(CENTRE))
    job, events = _triton_job(store, storage_url, evaluator)
    [result] = job.run()
    assert result.status == "tuned" and result.objective == "fwd+bwd"
    assert {k: result.config[k] for k in CENTRE} == CENTRE
    assert result.time_ms == pytest.approx(1.0) and result.speedup > 1.0
    # stages ran in order, each with only its own knobs free
    stages = [e.stage for e in events if e.stage != "done"]
    assert events[-1].stage == "done" and events[-1].status == "tuned" and events[-1].best_ms == result.time_ms
    assert stages == sorted(stages, key=["tau", "fwd", "bwd"].index) and set(stages) == {"tau", "fwd", "bwd"}
    spec = get_spec("adasplash", "triton")
    # the winner is in the cache under the key api.py builds, for this device and kernel source
    entry = store.get_exact(FAKE_GPU["device_id"], "adasplash", "triton", spec.source_hash(), PROBLEM.key("triton"))
    assert entry is not None and entry.config == result.config
    assert entry.time_ms == pytest.approx(1.0) and entry.strategy == "grid" and entry.spread_ms == pytest.approx(0.01)
    assert entry.provenance["problem"] == PROBLEM.to_dict() and entry.provenance["backward"] is True
    # the first trial of the job measured the declared default: the speed-up baseline
    assert evaluator.calls[0] == {k: v for k, v in spec.default().as_dict().items()}
    assert result.default_ms == pytest.approx(log2_bowl(CENTRE)(spec.default().as_dict())[0])


def test_rerunning_a_finished_job_resumes_and_evaluates_nothing_new(store, storage_url):
    first = TableEvaluator(log2_bowl(CENTRE))
    [r1] = _triton_job(store, storage_url, first, trials=30)[0].run()
    again = TableEvaluator(log2_bowl(CENTRE))
    [r2] = _triton_job(store, storage_url, again, trials=30)[0].run()
    assert again.calls == []  # every stage found its trials in the study storage
    assert r2.config == r1.config and r2.trials == r1.trials and r2.time_ms == r1.time_ms
    # a larger budget continues where the first run stopped
    more = TableEvaluator(log2_bowl(CENTRE))
    [r3] = _triton_job(store, storage_url, more, trials=45)[0].run()
    assert more.calls and r3.time_ms <= r1.time_ms and r3.trials > r1.trials


def test_failures_are_recorded_typed_and_never_win(store, storage_url):
    def fail(config):
        if config["fwd_warps"] == 8 and config["fwd_block_n"] == 128:
            return "runtime"
        if config["bwd_block_m"] == 32:
            return "accuracy"
        return None

    evaluator = TableEvaluator(log2_bowl(CENTRE), fail=fail, compile_workers=2,
                               compile_fail=lambda c: c["tau_block_m"] == 32 and c["tau_block_n"] == 128)
    job, _ = _triton_job(store, storage_url, evaluator)
    [result] = job.run()
    assert result.status == "tuned" and result.failures > 0
    assert not (result.config["tau_block_m"] == 32 and result.config["tau_block_n"] == 128)
    assert not (result.config["fwd_warps"] == 8 and result.config["fwd_block_n"] == 128)
    assert result.config["bwd_block_m"] != 32
    reasons = {f["reason"] for f in store.failures(kernel="adasplash")}
    assert reasons == {"compile", "runtime", "accuracy"}
    # configs that failed to compile were never timed
    assert not any(c["tau_block_m"] == 32 and c["tau_block_n"] == 128 for c in evaluator.calls)
    assert evaluator.compiled  # the batch went through the parallel compile step


def test_pareto_mode_reports_the_front_and_caches_the_fastest_accurate_point(store, storage_url):
    problem = EntmaxProblem(rows=64, cols=300, alpha=1.5)

    def table(config):
        return 1.0 + 0.1 * config["niter"], 10.0 ** (-config["niter"])

    evaluator = TableEvaluator(table, fail=lambda c: "accuracy" if c["niter"] < 5 else None)
    opts = TuneOptions(strategy="nsga2", trials=13, storage=storage_url, seed=1)
    [result] = TuneJob([problem], kernel="entmax", backend="torch", store=store, options=opts,
                       evaluator=evaluator, fingerprint=FAKE_GPU).run()
    assert result.config["niter"] == 5
    assert result.front and all(p["time_ms"] is not None for p in result.front)


def test_time_budget_and_trial_budget_split():
    assert stage_budgets(10, 3) == [4, 3, 3]
    assert stage_budgets(2, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="trials must be a positive int"):
        TuneOptions(trials=0)
    with pytest.raises(ValueError, match="unknown strategy"):
        TuneOptions(strategy="hillclimb")
    with pytest.raises(ValueError, match="time budget"):
        TuneOptions(time_budget=-1)


def test_a_spent_time_budget_skips_the_remaining_problems(store, storage_url):
    problems = [EntmaxProblem(rows=8, cols=c) for c in (64, 128, 256)]
    opts = TuneOptions(strategy="random", trials=5, storage=storage_url, time_budget=1e-9, seed=2)
    results = TuneJob(problems, kernel="entmax", backend="torch", store=store, options=opts,
                      evaluator=TableEvaluator(lambda c: (1.0, 1e-6)), fingerprint=FAKE_GPU).run()
    assert [r.status for r in results] == ["skipped"] * 3


def test_moving_an_accuracy_knob_off_its_default_needs_headroom(store, storage_url):
    problem = EntmaxProblem(rows=16, cols=200, alpha=1.5)
    evaluator = TableEvaluator(lambda c: (1.0 + 0.01 * c["niter"], 1e-7))
    opts = TuneOptions(strategy="grid", trials=6, storage=storage_url, seed=1, accuracy_headroom=0.25)
    TuneJob([problem], kernel="entmax", backend="torch", store=store, options=opts, evaluator=evaluator,
            fingerprint=FAKE_GPU).run()
    default_niter = get_spec("entmax", "torch").param("niter").default
    gates = {r.config["niter"]: r.gate for r in evaluator.requests}
    assert gates[default_niter] == 1.0
    assert {g for n, g in gates.items() if n != default_niter} == {0.25}
    with pytest.raises(ValueError, match="headroom"):
        TuneOptions(accuracy_headroom=0)


class LuckyFirstReading(TableEvaluator):
    """A table whose configs ``lucky`` selects read 0.5 ms the first time they are timed and 3 ms
    ever after (a noisy reading the search keeps as its minimum)."""

    def __init__(self, table, lucky) -> None:
        super().__init__(table)
        self.lucky, self.seen = lucky, set()

    def evaluate(self, request):
        result = super().evaluate(request)
        config = {**request.config, **request.extras}
        if self.lucky(config):
            ident = tuple(sorted(config.items()))
            first = ident not in self.seen
            self.seen.add(ident)
            return type(result)("ok", fwd_ms=0.5 if first else 3.0, fwd_spread_ms=0.01, error=result.error,
                                bwd_ms=0.0, grad_error=result.grad_error)
        return result


def test_the_final_duel_keeps_the_default_when_the_winner_was_a_lucky_reading(store, storage_url):
    """The winner's curse: the search's winner read fast once; re-timed beside the default it is
    slower, so the default is stored (with its re-timed median) and reported as the result."""
    spec = get_spec("adasplash", "triton")
    default = spec.default().as_dict()
    evaluator = LuckyFirstReading(lambda c: (1.0, 1e-3), lambda c: c["fwd_warps"] != default["fwd_warps"])
    job, _ = _triton_job(store, storage_url, evaluator, trials=12, confirm=3)
    [result] = job.run()
    assert result.confirmed and result.status == "tuned"
    assert result.config == default and result.time_ms == pytest.approx(1.0) and result.default_ms == pytest.approx(1.0)
    entry = store.get_exact(FAKE_GPU["device_id"], "adasplash", "triton", spec.source_hash(), PROBLEM.key("triton"))
    assert entry.config == default and entry.time_ms == pytest.approx(1.0)
    assert entry.provenance["confirmed_runs"] == 3
    # the duel: 3 rounds of (winner, default), after the search's own 12 trials
    duel = evaluator.calls[-6:]
    assert [c == default for c in duel] == [False, True] * 3


def test_the_final_duel_keeps_a_real_winner_and_stores_its_median(store, storage_url):
    evaluator = TableEvaluator(log2_bowl(CENTRE))
    job, _ = _triton_job(store, storage_url, evaluator, trials=30, confirm=2)
    [result] = job.run()
    assert result.confirmed and result.config != get_spec("adasplash", "triton").default().as_dict()
    assert result.time_ms < result.default_ms and result.speedup > 1.0
    # re-running the finished job neither searches nor duels again
    again = TableEvaluator(log2_bowl(CENTRE))
    [r2] = _triton_job(store, storage_url, again, trials=30, confirm=2)[0].run()
    assert again.calls == [] and r2.config == result.config and r2.time_ms == result.time_ms and r2.confirmed


def _cached(store):
    spec = get_spec("adasplash", "triton")
    return store.get_exact(FAKE_GPU["device_id"], "adasplash", "triton", spec.source_hash(), PROBLEM.key("triton"))


def test_rerunning_a_finished_job_keeps_the_confirmed_entry(store, storage_url):
    """Issue 16, defect 1: the second run resumes the search (whose best is a lucky 0.5 ms reading)
    and finds the duel's saved verdict (the default, 1.0 ms median of 3 runs); the cache must still
    hold that verdict, which is what both summaries report."""
    default = get_spec("adasplash", "triton").default().as_dict()

    def lucky(config):
        return config["fwd_warps"] != default["fwd_warps"]

    [first] = _triton_job(store, storage_url, LuckyFirstReading(lambda c: (1.0, 1e-3), lucky), trials=12,
                          confirm=3)[0].run()
    again = LuckyFirstReading(lambda c: (1.0, 1e-3), lucky)
    [second] = _triton_job(store, storage_url, again, trials=12, confirm=3)[0].run()
    assert again.calls == []  # nothing searched or duelled again
    for result in (first, second):
        assert result.confirmed and result.config == default
    entry = _cached(store)
    assert entry.config == second.config and entry.time_ms == second.time_ms == pytest.approx(1.0)
    assert entry.provenance["confirmed_runs"] == 3
    assert first.stored and not second.stored  # the second run wrote nothing: the summary says 0 entries


def test_a_search_reading_never_replaces_a_confirmed_entry_but_a_new_duel_does(store, storage_url):
    """A larger budget finds a faster point: its raw reading is not comparable with the stored median
    and is not stored over it; the new duel's verdict is."""
    evaluator = TableEvaluator(log2_bowl(CENTRE))
    [first] = _triton_job(store, storage_url, evaluator, trials=12, confirm=2)[0].run()
    confirmed = _cached(store)
    assert confirmed.provenance["confirmed_runs"] == 2 and confirmed.config == first.config

    seen = []

    class Watching(TableEvaluator):
        def evaluate(self, request):
            seen.append(_cached(store))  # what the cache holds while this run searches
            return super().evaluate(request)

    [bigger] = _triton_job(store, storage_url, Watching(log2_bowl(CENTRE)), trials=30, confirm=2)[0].run()
    searched = seen[:-4]  # the last 4 evaluations are the duel's 2 rounds of (winner, default)
    assert searched and all(e.provenance.get("confirmed_runs") == 2 for e in searched)
    entry = _cached(store)
    assert bigger.time_ms < first.time_ms and bigger.stored
    assert entry.config == bigger.config and entry.time_ms == bigger.time_ms
    assert entry.provenance["confirmed_runs"] == 2


def test_a_saved_verdict_is_stored_again_when_the_cache_lost_it(store, storage_url, tmp_path):
    """The studies remember the duel; a fresh cache (or one whose entry was replaced) gets the verdict."""
    from adasplash_tune.cache.store import open_store

    [first] = _triton_job(store, storage_url, TableEvaluator(log2_bowl(CENTRE)), trials=12, confirm=2)[0].run()
    with open_store(str(tmp_path / "fresh.sqlite")) as fresh:
        again = TableEvaluator(log2_bowl(CENTRE))
        [second] = _triton_job(fresh, storage_url, again, trials=12, confirm=2)[0].run()
        entry = _cached(fresh)
    assert again.calls == [] and second.stored
    assert entry.config == first.config and entry.time_ms == first.time_ms == second.time_ms
    assert entry.provenance["confirmed_runs"] == 2


class _StreamingTable(TableEvaluator):
    """Compiles a batch and hands the results back last-first (as parallel compiles finish out
    of order); records whether the problem was prepared ahead and what each trial saw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared_ahead = []
        self.order = []

    def prepare_problem(self, request):
        self.prepared_ahead.append(request.problem)

    def compile_stream(self, requests):
        results = self.compile(requests)
        for index in reversed(range(len(results))):
            self.order.append(("compiled", index))
            yield index, results[index]

    def evaluate(self, request):
        self.order.append(("timed", dict(request.config)))
        return super().evaluate(request)


def test_trials_are_timed_as_their_compiles_finish_and_the_oracle_is_built_ahead(store, storage_url):
    evaluator = _StreamingTable(log2_bowl(CENTRE), compile_workers=3,
                                compile_fail=lambda c: c["tau_block_m"] == 32 and c["tau_block_n"] == 128)
    job, _ = _triton_job(store, storage_url, evaluator, trials=24)
    [result] = job.run()
    assert result.status == "tuned" and result.trials == 24
    assert evaluator.prepared_ahead == [PROBLEM]  # once per problem, before its first batch
    # each compiled point is timed right after its own compile finished, before the next one
    kinds = [kind for kind, _ in evaluator.order]
    assert kinds[0] == "compiled" and "timed" in kinds
    first_timed = kinds.index("timed")
    assert kinds[first_timed - 1] == "compiled" and kinds[first_timed + 1] == "compiled"
    # compile failures were told, never timed; every asked trial was told exactly once
    assert not any(c["tau_block_m"] == 32 and c["tau_block_n"] == 128 for c in evaluator.calls)
    assert result.evaluated == 24
    phases = result.phases
    assert "compile_wall" in phases and phases["compile_wall"] >= 0
