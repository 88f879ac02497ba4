"""The tuner on a real GPU: Triton kernels, parallel compile, CUDA-event timing, real faults.

Run on the GPU machine with ``pytest -m gpu tests/tuner``.
"""

from __future__ import annotations

import optuna
import pytest
import torch

import adasplash_tune
from adasplash_tune.device import fingerprint
from adasplash_tune.kernels.registry import get_spec
from adasplash_tune.kernels.reference import tolerance
from adasplash_tune.tuner.evaluate import Evaluator, TrialRequest
from adasplash_tune.tuner.job import TuneJob, TuneOptions
from adasplash_tune.tuner.problems import AttentionProblem, EntmaxProblem
from adasplash_tune.tuner.timing import TimingOptions, measure

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.gpu

QUICK = TimingOptions(warmup_ms=5.0, rep_ms=20.0, min_reps=5, max_reps=100)


def test_cuda_event_timing_is_positive_and_ordered():
    small = torch.randn(256, 256, device="cuda")
    large = torch.randn(4096, 4096, device="cuda")
    t_small = measure(lambda: small @ small, "cuda:0", QUICK)
    t_large = measure(lambda: large @ large, "cuda:0", QUICK)
    assert 0 < t_small.median_ms < t_large.median_ms and t_large.reps >= QUICK.min_reps


def test_host_bound_calls_are_timed_by_their_kernels():
    """A call whose Python dispatch (sleep 2 ms) dwarfs its kernel: the spin ahead covers the
    dispatch, so the reading is the kernel's time and host_ms reports the dispatch."""
    import time

    x = torch.randn(1024, 1024, device="cuda")
    kernel = measure(lambda: x @ x, "cuda:0", QUICK)

    def slow_host():
        time.sleep(0.002)
        return x @ x

    hosted = measure(slow_host, "cuda:0", QUICK)
    assert hosted.host_ms is not None and hosted.host_ms >= 2.0
    assert hosted.median_ms < 1.0 and hosted.median_ms < 3 * kernel.median_ms + 0.05


def test_real_cuda_faults_are_typed_and_the_worker_is_replaced():
    problem = EntmaxProblem(rows=64, cols=1000, alpha=1.5, dtype="bfloat16")
    base = {"block_n": 1024, "rows": 1, "num_warps": 4, "num_stages": 1}
    faults = "illegal:niter=5;exit:niter=6;hang:niter=4"
    expected = {10: "ok", 5: "runtime", 12: "ok", 6: "crash", 4: "timeout", 8: "ok"}
    with Evaluator("cuda:0", trial_timeout=30.0, fault=faults) as ev:
        for niter, status in expected.items():
            result = ev.evaluate(TrialRequest(problem, "triton", {**base, "niter": niter}, timing=QUICK))
            assert result.status == status, (niter, result.detail)
        assert ev.replaced == 3


@pytest.mark.parametrize("compile_workers", [0, 2])
def test_tune_triton_entmax_on_gpu(tmp_path, compile_workers, monkeypatch):
    from adasplash_tune.cache.store import open_store

    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", str(tmp_path / "cache.sqlite"))
    problem = EntmaxProblem(rows=512, cols=3000, alpha=1.5, dtype="bfloat16")
    opts = TuneOptions(strategy="tpe", trials=10, seed=1, device="cuda:0", compile_workers=compile_workers,
                       storage=f"sqlite:///{tmp_path / 'studies.sqlite'}", timing=QUICK)
    with open_store(str(tmp_path / "cache.sqlite")) as store:
        [result] = TuneJob([problem], kernel="entmax", backend="triton", store=store, options=opts).run()
    assert result.status == "tuned" and result.error <= tolerance(torch.bfloat16)
    x = torch.randn(512, 3000, device="cuda", dtype=torch.bfloat16)
    sel = adasplash_tune.select("entmax", x, alpha=1.5)
    assert sel.source == "cache" and sel.config == result.config


def test_tune_triton_attention_staged_on_gpu(tmp_path, monkeypatch):
    from adasplash_tune.cache.store import open_store

    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", str(tmp_path / "cache.sqlite"))
    problem = AttentionProblem(batch=2, heads=8, kv_heads=2, seq_len=1000, head_dim=64, alpha=1.5, causal=True,
                               dtype="bfloat16")
    opts = TuneOptions(strategy="tpe", trials=12, seed=2, device="cuda:0", compile_workers=4,
                       storage=f"sqlite:///{tmp_path / 'studies.sqlite'}", timing=QUICK)
    events = []
    with open_store(str(tmp_path / "cache.sqlite")) as store:
        [result] = TuneJob([problem], kernel="adasplash", backend="triton", store=store, options=opts,
                           progress=events.append).run()
        entry = store.get_exact(fingerprint("cuda:0").device_id, "adasplash", "triton",
                                get_spec("adasplash", "triton").source_hash(), problem.key("triton"))
    assert result.status == "tuned" and result.objective == "fwd+bwd"
    # the final duel (TuneOptions.confirm, 3 by default) re-timed the winner beside the default
    assert result.confirmed and entry.provenance["confirmed_runs"] == opts.confirm == 3
    assert entry.config == result.config and entry.time_ms == pytest.approx(result.time_ms)
    assert result.error <= tolerance(torch.bfloat16) and result.grad_error <= tolerance(torch.bfloat16, grad=True)
    assert [e.stage for e in events][0] == "tau" and "bwd" in {e.stage for e in events}
    inputs = problem.make_inputs("cuda", 0, requires_grad=False)
    sel = adasplash_tune.select("adasplash", inputs["q"], inputs["k"], inputs["v"], alpha=1.5, is_causal=True)
    assert sel.source == "cache" and sel.config == result.config
