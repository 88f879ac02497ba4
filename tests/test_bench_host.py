"""benchmarks/bench_host.py runs end to end in its reduced CPU mode (torch backend, tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cpu_env() -> dict[str, str]:
    """This environment for a child that must run the reduced CPU mode, even on a GPU machine."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_bench_host_quick_run_on_cpu(tmp_path):
    out = tmp_path / "host.json"
    env = _cpu_env()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_host.py"), "--quick", "--calls", "2",
                           "--repeats", "2", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    host = report["host"]
    assert host["backend"] == "torch"
    for case in ("forward", "forward_backward", "entmax"):
        for method in ("adasplash", "sdpa", "backend_alone", "null_backend"):
            assert host[case][method]["host_us"] > 0
    assert {(r["method"], r["seq_len"]) for r in report["train"]} == {("adasplash", 32), ("sdpa", 32)}
    assert all(r["step_ms"] > 0 for r in report["train"])
    (case,) = report["first-call"]["cases"]
    assert case["warm"]["source"] == "cache" and case["warm"]["first_call_s"] > 0
    assert "torch._dynamo" not in case["warm"]["heavy_modules_after_first_call"]
    assert report["first-call"]["import"]["import_package_beyond_torch_s"] > 0
    assert "needs CUDA" in report["memory"]["skipped"]
    assert "host time per call" in done.stdout and "training step" in done.stdout


def test_profile_host_refuses_without_a_gpu(tmp_path):
    """benchmarks/profile_host.py profiles the GPU eager path only: without CUDA it says so and
    exits 2, writing nothing."""
    out = tmp_path / "profile.json"
    env = _cpu_env()
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_host.py"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr
    assert not out.exists()


def test_child_processes_import_the_package_the_caller_put_first(tmp_path, monkeypatch):
    """A fresh-process reading measures the tree the caller's PYTHONPATH names first (an A/B of two
    commits), and still finds this checkout when PYTHONPATH is unset."""
    from tests.scripts import load_script

    bench = load_script("benchmarks/bench_host.py")
    other = tmp_path / "older-tree"
    monkeypatch.setenv("PYTHONPATH", str(other))
    parts = bench._child_env(EXTRA="1")["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == str(other) and parts[-1] == str(REPO)
    assert bench._child_env(EXTRA="1")["EXTRA"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert bench._child_env()["PYTHONPATH"] == str(REPO)


def test_clock_calls_records_each_call_and_passes_results_and_errors_through():
    """The first-call breakdown's wrapper: one (label, seconds) per call, the callee's result and
    exceptions unchanged."""
    import types

    import pytest

    from tests.scripts import load_script

    bench = load_script("benchmarks/bench_host.py")

    def work(name, fail=False):
        if fail:
            raise RuntimeError(name)
        return name.upper()

    owner = types.SimpleNamespace(work=work)
    records = []
    bench.clock_calls(owner, "work", records, lambda name, **kw: f"job {name}")
    assert owner.work("a") == "A"
    with pytest.raises(RuntimeError, match="b"):
        owner.work("b", fail=True)
    assert [label for label, _ in records] == ["job a", "job b"]
    assert all(seconds >= 0 for _, seconds in records)


def test_first_call_breakdown_child_reports_its_parts_on_cpu():
    """The breakdown child imports Triton before the clock and reports what it clocked. On CPU the
    torch backend compiles nothing: the whole call is 'rest'."""
    env = _cpu_env()
    spec = {"shape": [1, 2, 32, 16], "causal": True, "backward": True, "breakdown": True}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_host.py"), "--child", "first-call",
                           json.dumps(spec)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    split = result["breakdown"]
    assert split["import_triton_s"] > 0
    assert split["compiles"] == [] and split["c_builds"] == []
    assert split["compile_s"] == split["c_build_s"] == split["triton_key_s"] == 0
    assert split["rest_s"] == result["first_call_s"] > 0
