"""Evaluation in worker processes: oracle gate, typed failures, fault injection, worker replacement."""

from __future__ import annotations

import optuna
import pytest

from adasplash_tune.kernels.reference import tolerance
from adasplash_tune.tuner.evaluate import Evaluator, TrialRequest
from adasplash_tune.tuner.job import TuneJob, TuneOptions
from adasplash_tune.tuner.problems import AttentionProblem, EntmaxProblem
from adasplash_tune.tuner.timing import TimingOptions
from adasplash_tune.tuner.worker import classify, matching_fault, parse_faults

optuna.logging.set_verbosity(optuna.logging.WARNING)

QUICK = TimingOptions(warmup_ms=2.0, rep_ms=10.0, min_reps=3, max_reps=20)
PROBLEM = AttentionProblem(batch=1, heads=2, kv_heads=1, seq_len=77, head_dim=24, alpha=1.5, causal=True)


def test_fault_rules_parse_and_match():
    rules = parse_faults("exit:niter=3; hang:q_chunk=64,niter=4")
    assert rules == [("exit", {"niter": 3}), ("hang", {"q_chunk": 64, "niter": 4})]
    assert matching_fault("exit:niter=3", {"niter": 3, "q_chunk": 16}) == "exit"
    assert matching_fault("hang:q_chunk=64,niter=4", {"niter": 4, "q_chunk": 32}) is None
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        parse_faults("explode:niter=1")


def test_exceptions_are_classified():
    from adasplash_tune.kernels.spec import ConfigError

    assert classify(ConfigError("bad field")) == ("invalid", False)
    assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == ("runtime", True)
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == ("runtime", False)
    assert classify(RuntimeError("something else")) == ("runtime", False)
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - triton is a dependency
        pytest.skip("triton missing")
    assert classify(OutOfResources(300000, 232448, "shared memory")) == ("compile", False)


@pytest.mark.parametrize("problem,backward", [
    (PROBLEM, True),
    (AttentionProblem(batch=2, heads=2, kv_heads=2, seq_len=50, head_dim=16, alpha=1.3, varlen=True), False),
    (EntmaxProblem(rows=9, cols=130, alpha=2.0), True),
])
def test_a_good_config_passes_the_oracle_gate(problem, backward):
    from adasplash_tune.tuner.space import build_space

    space = build_space(problem.kernel, "torch", target="cpu", context=problem.context())
    config, _ = space.split(space.default_values())
    with Evaluator(in_process=True) as ev:
        result = ev.evaluate(TrialRequest(problem, "torch", config, backward=backward, seed=11, timing=QUICK))
    assert result.status == "ok", result.detail
    assert 0 < result.error <= tolerance(__import__("torch").float32)
    assert result.fwd_ms > 0 and result.reps >= QUICK.min_reps
    if backward:
        assert 0 < result.grad_error <= tolerance(__import__("torch").float32, grad=True) and result.bwd_ms > 0
    else:
        assert result.grad_error is None and result.bwd_ms is None


def test_the_gate_can_demand_headroom_below_the_tolerance():
    config = {"q_chunk": 32, "k_chunk": 64, "niter": 3}
    with Evaluator(in_process=True) as ev:
        loose = ev.evaluate(TrialRequest(PROBLEM, "torch", config, seed=2, timing=QUICK))
        assert loose.status == "ok" and loose.error > 0
        strict = ev.evaluate(TrialRequest(PROBLEM, "torch", config, seed=2, timing=QUICK,
                                          gate=0.5 * loose.error / tolerance(__import__("torch").float32)))
    assert strict.status == "accuracy" and strict.error == pytest.approx(loose.error)
    assert strict.fwd_ms is None  # a rejected config is not timed


def test_faulty_configs_are_typed_and_the_worker_is_replaced():
    faults = "exit:niter=3;illegal:niter=5;compile:niter=6;raise:niter=10"
    expected = {8: "ok", 3: "crash", 5: "runtime", 6: "compile", 10: "runtime", 12: "ok"}
    with Evaluator(trial_timeout=60.0, fault=faults, threads=1) as ev:
        for niter, status in expected.items():
            request = TrialRequest(PROBLEM, "torch", {"q_chunk": 32, "k_chunk": 64, "niter": niter}, timing=QUICK)
            result = ev.evaluate(request)
            assert result.status == status, (niter, result.detail)
        assert ev.replaced == 2  # after the crash and after the poisoned (illegal address) context


def test_a_failing_config_is_recorded_and_the_run_completes(store, storage_url):
    opts = TuneOptions(strategy="grid", trials=10, storage=storage_url, seed=3, timing=QUICK,
                       restrict={"q_chunk": (32,), "k_chunk": (64,), "niter": (3, 4, 5, 8, 12)})
    evaluator = Evaluator(trial_timeout=5.0, fault="exit:niter=3;hang:niter=4;illegal:niter=5", threads=1)
    with evaluator:
        [result] = TuneJob([PROBLEM], kernel="adasplash", backend="torch", store=store, options=opts,
                           evaluator=evaluator).run()
    assert result.status == "tuned" and result.trials == 5 and result.failures == 3
    assert result.failure_kinds == {"crash": 1, "timeout": 1, "runtime": 1}
    assert result.config["niter"] in (8, 12)
    failures = {f["config"]["niter"]: f["reason"] for f in store.failures(kernel="adasplash")}
    assert failures == {3: "crash", 4: "timeout", 5: "runtime"}
    assert evaluator.replaced == 3


def test_the_accuracy_gate_rejects_a_fast_but_wrong_config(store, storage_url):
    opts = TuneOptions(strategy="grid", trials=4, storage=storage_url, seed=4, timing=QUICK,
                       restrict={"q_chunk": (32,), "k_chunk": (128,), "niter": (1, 12)})
    [result] = TuneJob([PROBLEM], kernel="adasplash", backend="torch", store=store, options=opts).run()
    assert result.status == "tuned" and result.config["niter"] == 12
    assert result.error <= tolerance(__import__("torch").float32)
    assert result.failures == 1 and result.failure_kinds == {"accuracy": 1}
    [failure] = store.failures(kernel="adasplash")
    assert failure["reason"] == "accuracy" and failure["config"]["niter"] == 1
    assert "relative error" in failure["detail"]
    [entry] = store.entries(kernel="adasplash")
    assert entry.config["niter"] == 12 and entry.error == pytest.approx(result.error)


def test_the_triton_interpreter_path_runs_under_the_gate(store, storage_url, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = EntmaxProblem(rows=3, cols=40, alpha=1.5)
    # from the bracket's end one iteration is inaccurate (from the subset start, 40 columns' chunk
    # maxima hold most of the row and one iteration is enough), so the gate has something to reject
    opts = TuneOptions(strategy="grid", trials=4, storage=storage_url, seed=5,
                       timing=TimingOptions(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1),
                       restrict={"block_n": (64,), "rows": (1, 2), "num_warps": (1,), "num_stages": (1,),
                                 "niter": (1, 10), "tau_init": ("lo",), "tau_tol": ("auto",)})
    with Evaluator(in_process=True) as ev:
        [result] = TuneJob([problem], kernel="entmax", backend="triton", store=store, options=opts,
                           evaluator=ev).run()
    assert result.status == "tuned" and result.config["niter"] == 10
    assert result.error <= tolerance(__import__("torch").float32)
    assert {f["reason"] for f in store.failures(kernel="entmax")} == {"accuracy"}


def test_the_cuda_spin_covers_twice_the_dispatch_time_within_bounds():
    from adasplash_tune.tuner import timing

    assert timing._spin_cycles(0.01) == timing._SPIN_CYCLES  # never below the floor
    assert timing._spin_cycles(3.0) == int(2 * 3.0 * timing._CYCLES_PER_MS)
    assert timing._spin_cycles(1e6) == timing._SPIN_CYCLES_MAX
    cpu = timing.measure(lambda: sum(range(200)), "cpu", QUICK)
    assert cpu.host_ms is None and cpu.median_ms > 0 and cpu.reps >= QUICK.min_reps


_KILLED_PARENT = """
import os, signal, threading
from adasplash_tune.tuner.evaluate import Evaluator, TrialRequest
from adasplash_tune.tuner.problems import EntmaxProblem
from adasplash_tune.tuner.timing import TimingOptions

problem = EntmaxProblem(rows=8, cols=64, alpha=1.5)
ev = Evaluator("cpu", trial_timeout=120)
quick = TimingOptions(warmup_ms=1.0, rep_ms=1.0, min_reps=1, max_reps=2)
assert ev.evaluate(TrialRequest(problem, "torch", {}, timing=quick)).ok  # the worker is up
print("ready", flush=True)
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()  # kill -9 mid-trial
ev.evaluate(TrialRequest(problem, "torch", {}, timing=TimingOptions(warmup_ms=1.0, rep_ms=4000.0, max_reps=10**7)))
"""


def test_a_worker_whose_parent_was_killed_exits_quietly():
    """Issue 16: the worker finishes its trial, finds its parent gone when it replies, and exits
    without a BrokenPipeError traceback (stderr is read until the worker has closed it too)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _KILLED_PARENT], capture_output=True, text=True, timeout=180)
    assert proc.returncode == -9 and proc.stdout == "ready\n", proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_default_compile_workers_is_one_per_core_up_to_the_cap(monkeypatch):
    """A GPU tuning job compiles on every core (each worker is a process), capped; a host whose core
    count is unknown still gets one worker."""
    from adasplash_tune.tuner import options

    for cores, expected in ((1, 1), (6, 6), (16, 16), (64, options.MAX_DEFAULT_COMPILE_WORKERS), (None, 1)):
        monkeypatch.setattr(options.os, "cpu_count", lambda cores=cores: cores)
        assert options.default_compile_workers() == expected
