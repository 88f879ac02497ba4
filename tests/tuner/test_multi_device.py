"""One evaluation worker per device (``tune --gpus 0,1``): several trials in flight, one study,
one cache writer; on CPU two "devices" ("cpu", "cpu") stand in for two GPUs."""

from __future__ import annotations

import json
import threading
from collections import Counter

import optuna
import pytest
import torch
from optuna.trial import TrialState

from adasplash_tune.kernels.reference import tolerance
from adasplash_tune.kernels.registry import get_spec
from adasplash_tune.tuner.evaluate import EvaluatorPool, TrialRequest, TrialResult
from adasplash_tune.tuner.job import TuneJob, TuneOptions
from adasplash_tune.tuner.problems import AttentionProblem
from adasplash_tune.tuner.search import ATTR
from adasplash_tune.tuner.timing import TimingOptions

from .conftest import FAKE_GPU, TableEvaluator

optuna.logging.set_verbosity(optuna.logging.WARNING)

QUICK = TimingOptions(warmup_ms=1.0, rep_ms=5.0, min_reps=3, max_reps=10)
#: Tiny and odd-shaped: the torch backend's space is q_chunk x niter (39 points) here.
PROBLEM = AttentionProblem(batch=1, heads=2, kv_heads=1, seq_len=45, head_dim=24, alpha=1.5, causal=True)


def _table(config):
    """A time with a unique minimum (q_chunk 32, niter 6) and an error that falls with niter."""
    return 1.0 + abs(config["q_chunk"] - 32) / 16 + abs(config["niter"] - 6) / 4, 10.0 ** -(config["niter"] + 2)


class MeetingTable(TableEvaluator):
    """A table evaluator whose first trial waits (up to 30 s) until every evaluator of the pool
    is inside a trial too: it only returns if trials really run on the devices at once."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__(_table)
        self.barrier = barrier

    def evaluate(self, request):
        if not self.calls:
            self.barrier.wait(timeout=30)  # BrokenBarrierError if the trials ran one at a time
        return super().evaluate(request)


def _counted(storage_url: str) -> list:
    storage = optuna.storages.RDBStorage(storage_url)
    try:
        trials = [t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)]
    finally:
        storage.remove_session()
        storage.engine.dispose()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return [t for t in trials if t.user_attrs.get(ATTR, {}).get("counted")]


def _configs(trials) -> Counter:
    return Counter(tuple(sorted(t.user_attrs[ATTR]["config"].items())) for t in trials)


def _job(store, storage_url, evaluator=None, trials=9, **options):
    options.setdefault("confirm", 0)  # these tests count the search's own evaluations
    opts = TuneOptions(strategy="grid", trials=trials, storage=storage_url, seed=3, timing=QUICK, **options)
    return TuneJob([PROBLEM], kernel="adasplash", backend="torch", store=store, options=opts, evaluator=evaluator,
                   fingerprint=FAKE_GPU if evaluator is not None else None)


def test_two_devices_keep_two_trials_in_flight_and_tell_each_exactly_once(store, tmp_path):
    barrier = threading.Barrier(2)
    devices = [MeetingTable(barrier), MeetingTable(barrier)]
    pool = EvaluatorPool(devices)
    events = []
    job = _job(store, f"sqlite:///{tmp_path / 'two.sqlite'}", pool)
    job.progress = events.append
    [two] = job.run()
    # both devices ran trials, concurrently (the barrier let the first two trials through)
    assert all(d.calls for d in devices) and not barrier.broken
    assert pool.usage == [len(d.calls) for d in devices]
    # every counted trial in the study was evaluated exactly once, and nothing else was
    counted = _counted(f"sqlite:///{tmp_path / 'two.sqlite'}")
    evaluated = Counter(tuple(sorted(c.items())) for d in devices for c in d.calls)
    trials = [e for e in events if e.stage != "done"]  # one event per counted trial, then the outcome
    assert len(counted) == two.trials == two.evaluated == 9 == len(trials) and events[-1].stage == "done"
    assert set(_configs(counted).values()) == {1}
    assert evaluated == _configs(counted)

    # the same job on one device: the same trials (grid order), the same winner in the cache
    single = TableEvaluator(_table)
    [one] = _job(store, f"sqlite:///{tmp_path / 'one.sqlite'}", single).run()
    assert one.trials == one.evaluated == two.trials
    assert _configs(_counted(f"sqlite:///{tmp_path / 'one.sqlite'}")) == _configs(counted)
    assert one.config == two.config and one.time_ms == two.time_ms
    entry = store.get_exact(FAKE_GPU["device_id"], "adasplash", "torch", get_spec("adasplash", "torch").source_hash(),
                            PROBLEM.key("torch"))
    assert entry is not None and entry.config == two.config and entry.time_ms == pytest.approx(two.time_ms)


def test_a_device_that_fails_does_not_lose_or_repeat_trials(store, tmp_path):
    """One device raises a typed failure for some configs: those trials are told as failures
    (counted once, never winners); the other device's results are unaffected."""
    flaky = TableEvaluator(_table, fail=lambda c: "runtime" if c["niter"] in (2, 5) else None)
    pool = EvaluatorPool([flaky, TableEvaluator(_table)])
    [result] = _job(store, f"sqlite:///{tmp_path / 's.sqlite'}", pool, trials=12).run()
    counted = _counted(f"sqlite:///{tmp_path / 's.sqlite'}")
    assert len(counted) == result.trials == 12 and set(_configs(counted).values()) == {1}
    failed = [t for t in counted if not t.user_attrs[ATTR]["ok"]]
    assert result.failures == len(failed) == sum(1 for c in flaky.calls if c["niter"] in (2, 5))
    assert failed and result.status == "tuned" and result.config["niter"] not in (2, 5)


def test_two_cpu_workers_tune_like_one(store, tmp_path):
    """Real worker processes: devices ("cpu", "cpu"), the torch backend, the fp64 oracle gate."""
    two_url = f"sqlite:///{tmp_path / 'two.sqlite'}"
    job = _job(store, two_url, devices=("cpu", "cpu"), trials=6)
    [two] = job.run()
    assert two.status == "tuned" and two.trials == two.evaluated == 6
    assert len(job.device_usage) == 2 and all(n > 0 for n in job.device_usage)
    assert sum(job.device_usage) >= 6  # the 6 trials (+ the baseline of the default)
    assert 0 < two.error <= tolerance(torch.float32)
    counted = _counted(two_url)
    assert len(counted) == 6 and set(_configs(counted).values()) == {1}

    one_url = f"sqlite:///{tmp_path / 'one.sqlite'}"
    [one] = _job(store, one_url, devices=("cpu",), trials=6).run()
    assert one.trials == one.evaluated == 6
    assert _configs(_counted(one_url)) == _configs(counted)  # grid: the same six points


def test_several_problems_are_spread_over_the_devices(store, tmp_path):
    """With several problems each device tunes whole problems with its own worker (compile,
    oracle and timing all in parallel): every problem is tuned once, into one cache, and the
    results come back in the order the problems were given."""
    problems = [PROBLEM, AttentionProblem(1, 2, 2, 33, 16, 2.0, False), AttentionProblem(1, 1, 1, 70, 32, 1.5, False)]
    url = f"sqlite:///{tmp_path / 'spread.sqlite'}"
    opts = TuneOptions(strategy="grid", trials=3, storage=url, seed=3, timing=QUICK, devices=("cpu", "cpu"))
    events = []
    job = TuneJob(problems, kernel="adasplash", backend="torch", store=store, options=opts,
                  progress=events.append)
    results = job.run()
    assert [r.problem for r in results] == problems
    assert all(r.status == "tuned" and r.trials == r.evaluated == 3 and r.stored for r in results)
    assert len(job.device_usage) == 2 and all(n > 0 for n in job.device_usage)
    assert sum(job.device_usage) == 9
    assert {e.problem_index for e in events} == {1, 2, 3}
    keys = {json.dumps(e.key, sort_keys=True) for e in store.entries()}
    assert keys == {json.dumps(r.key, sort_keys=True) for r in results}
    assert len(_counted(url)) == 9


def test_pool_and_options_reject_bad_input():
    with pytest.raises(ValueError, match="at least one evaluator"):
        EvaluatorPool([])
    with pytest.raises(ValueError, match="devices must be a non-empty list"):
        TuneOptions(devices=())
    with pytest.raises(ValueError, match="devices must be a non-empty list"):
        TuneOptions(devices="cuda:0,cuda:1")
    assert TuneOptions(devices=["cuda:1", "cuda:0"]).device == "cuda:1"
    assert TuneOptions(device="cuda:2").device_list == ("cuda:2",)


def test_pool_times_on_free_devices_and_compiles_in_the_first_ones_pool():
    first = TableEvaluator(_table, compile_workers=2, compile_fail=lambda c: c["q_chunk"] == 64)
    pool = EvaluatorPool([first, TableEvaluator(_table)])
    assert pool.capacity == 2 and pool.compile_workers == 2
    requests = [TrialRequest(PROBLEM, "torch", {"q_chunk": q, "k_chunk": 64, "niter": n})
                for q, n in ((16, 3), (32, 4), (32, 6), (64, 6))]
    assert [r.status for r in pool.compile(requests)] == ["ok", "ok", "ok", "compile"]
    with pool:
        results = [f.result(timeout=30) for f in [pool.submit(r) for r in requests[:3]]]
        assert all(isinstance(r, TrialResult) and r.ok for r in results)
        assert results[2].fwd_ms == pytest.approx(_table(requests[2].config)[0])
        assert sum(pool.usage) == 3 and len(first.compiled) == 4
    with pytest.raises(Exception, match="closed"):
        pool.submit(requests[0])


class CountingTable(TableEvaluator):
    """Counts trials being timed on any evaluator sharing ``state``; compiling records how many
    were being timed meanwhile."""

    def __init__(self, state: dict, **kwargs) -> None:
        super().__init__(_table, **kwargs)
        self.state = state

    def evaluate(self, request):
        with self.state["lock"]:
            self.state["timing"] += 1
        try:
            return super().evaluate(request)
        finally:
            with self.state["lock"]:
                self.state["timing"] -= 1

    def compile(self, requests):
        self.state["timing_while_compiling"].append(self.state["timing"])
        return super().compile(requests)


def test_with_a_compile_pool_batches_compile_first_then_time_on_every_device(store, tmp_path):
    state = {"lock": threading.Lock(), "timing": 0, "timing_while_compiling": []}
    first = CountingTable(state, compile_workers=3, compile_fail=lambda c: c["niter"] == 2)
    second = CountingTable(state)
    pool = EvaluatorPool([first, second])
    [result] = _job(store, f"sqlite:///{tmp_path / 's.sqlite'}", pool, trials=10).run()
    assert result.trials == 10 and result.failures >= 1
    # compiled in batches of 3, and never while a trial was being timed
    assert len(state["timing_while_compiling"]) >= 4 and set(state["timing_while_compiling"]) == {0}
    assert len(first.compiled) == 10
    timed = first.calls + second.calls
    assert not [c for c in timed if c["niter"] == 2]  # failed to compile: never timed
    assert len(timed) == 10 - sum(1 for c in first.compiled if c["niter"] == 2)


@pytest.mark.gpu
def test_every_visible_gpu_gets_a_worker(store, tmp_path):
    """On the GPU machine: the Triton kernels, one worker per visible GPU."""
    devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    problem = AttentionProblem(batch=1, heads=4, kv_heads=4, seq_len=1024, head_dim=64, alpha=1.5,
                               dtype="bfloat16")
    opts = TuneOptions(strategy="random", trials=8, storage=f"sqlite:///{tmp_path / 's.sqlite'}", seed=1,
                       devices=devices, compile_workers=2)
    job = TuneJob([problem], kernel="adasplash", backend="triton", store=store, options=opts)
    [result] = job.run()
    assert result.status == "tuned" and result.trials == result.evaluated == 8
    assert len(job.device_usage) == len(devices) and all(n > 0 for n in job.device_usage)
    assert result.error <= tolerance(torch.bfloat16)
