"""benchmarks/bench_tuning_value.py on the CPU (torch backend): a cache with one tuned entry, the
held-out smoke grid, and the report's three times per problem and geometric means."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import adasplash_tune
from adasplash_tune.cache.entry import Entry
from adasplash_tune.cache.store import open_store
from adasplash_tune.device import fingerprint
from adasplash_tune.kernels.registry import get_spec
from adasplash_tune.selection import clear_memo

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_tuning_value.py"


def test_cpu_smoke_times_default_tuned_and_best_fixed(tmp_path, monkeypatch):
    cache = tmp_path / "tuned.sqlite"
    q = torch.empty(1, 2, 80, 16)
    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", str(tmp_path / "empty.sqlite"))
    key = adasplash_tune.select("adasplash", q, q, q, is_causal=True, backend="torch").key
    clear_memo()
    spec = get_spec("adasplash", "torch")
    tuned = {**spec.default().as_dict(), "q_chunk": 16, "k_chunk": 64}
    with open_store(str(cache)) as store:
        store.upsert_best(Entry("adasplash", "torch", fingerprint("cpu").as_dict(), spec.source_hash(), key,
                                tuned, time_ms=1.0, error=1e-6, trials=3, strategy="grid"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--cache", str(cache), "--families",
                           "randn,local:2", "--name", "t", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "tuning-value-t.json").read_text())
    assert len(report["candidates"]) == 2 and tuned in report["candidates"]
    rows = report["rows"]
    assert len(rows) == 4 and {r["inputs"] for r in rows} == {"randn", "local:2"}
    exact = [r for r in rows if r["source"] == "cache"]
    assert exact and all(r["problem"].startswith("B1 H2 N80 D16") for r in exact)
    for r in rows:
        assert r["tuned_ms"] > 0 and r["default_ms"] > 0 and r["best_fixed_ms"] > 0
        assert r["per_problem_best_ms"] <= min(r["tuned_ms"], r["default_ms"], r["best_fixed_ms"])
    summary = report["summary"]
    assert summary["problems"] == 4 and summary["candidates"] == 2
    for name in ("default_over_tuned", "best_fixed_over_tuned", "default_over_per_problem_best",
                 "default_over_tuned[local:2]"):
        assert summary[name] > 0
