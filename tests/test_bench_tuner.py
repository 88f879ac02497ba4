"""benchmarks/bench_tuner.py: the study's summary arithmetic, merging of per-GPU parts, and a
``--cpu-smoke`` run of one problem end to end (torch backend)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_tuner.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_tuner.py", siblings=True)  # it imports its sibling _tuning_run


def _run(strategy: str, curve: list[list[float]], default: float, label: str = "P") -> dict:
    return {"problem": label, "strategy": strategy, "trials": len(curve), "best_ms": curve[-1][1],
            "default_ms": default, "curve": curve, "wall_s": 10.0, "trials_per_min": 6.0 * len(curve)}


def _report() -> dict:
    return {"problems": [{"label": "P", "exhaustive_trials": 8}],
            "quality": [_run("grid", [[i, b] for i, b in enumerate([2.0, 2.0, 1.9, 1.8, 1.8, 1.8, 1.6, 1.6], 1)], 2.0),
                        _run("tpe", [[1, 2.1], [2, 1.7], [3, 1.64]], 2.1),
                        _run("random", [[1, 2.0], [2, 1.9]], 2.0)],
            "throughput": []}


def test_summary_measures_each_strategy_against_the_exhaustive_best(bench):
    rows = {r["strategy"]: r for r in bench.summarize(_report(), within=0.03)}
    assert rows["grid"]["vs_exhaustive"] == pytest.approx(1.0)
    assert rows["grid"]["trials_to_within"] == 7
    assert rows["grid"]["default_vs_exhaustive"] == pytest.approx(2.0 / 1.6)
    assert rows["tpe"]["vs_exhaustive"] == pytest.approx(1.64 / 1.6)
    assert rows["tpe"]["trials_to_within"] == 3  # 1.64 <= 1.6 * 1.03, 1.7 is not
    assert rows["tpe"]["gap_closed"] == pytest.approx((2.1 - 1.64) / 0.4)
    assert rows["random"]["trials_to_within"] is None  # never within 3%
    assert "random" in bench._table(list(rows.values()))


def test_merge_concatenates_parts_of_one_study(bench, tmp_path):
    a, b = _report(), _report()
    b["problems"][0]["label"] = "Q"
    for run in b["quality"]:
        run["problem"] = "Q"
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, (a, b)):
        path.write_text(json.dumps(part))
    merged = bench._merge(paths)
    assert [p["label"] for p in merged["problems"]] == ["P", "Q"]
    assert len(merged["quality"]) == 6
    assert {r["problem"] for r in bench.summarize(merged)} == {"P", "Q"}


def test_cpu_smoke_runs_one_selected_problem(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--problems", "2", "--name", "t",
                           "--throughput-trials", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "tuner-t.json").read_text())
    assert [p["label"] for p in report["problems"]] == ["B1 H1 N256 D16 a2 float32"]
    assert {r["strategy"] for r in report["summary"]} == {"grid", "random", "tpe"}
    grid = next(r for r in report["quality"] if r["strategy"] == "grid")
    assert grid["trials"] == report["problems"][0]["exhaustive_trials"]
    assert all(r["best_ms"] > 0 for r in report["quality"])
    # throughput runs (0 and 2 compile workers) say where each trial's seconds went
    assert [r["compile_workers"] for r in report["throughput"]] == [0, 2]
    for run in report["throughput"]:
        parts = run["per_trial_s"]
        assert set(parts) == {"compile_ahead", "setup", "first_call", "check", "timing", "worker_hop", "search"}
        assert parts["timing"] > 0 and all(v >= 0 for v in parts.values())
        assert sum(parts.values()) * run["trials"] <= run["wall_s"] * 1.05
    assert report["throughput"][0]["per_trial_s"]["compile_ahead"] == 0
    assert report["throughput"][1]["per_trial_s"]["compile_ahead"] > 0


def test_bad_problem_index_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--problems", "7", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "--problems" in proc.stderr


def test_a_throughput_only_report_has_no_plot_and_is_still_written(bench, tmp_path):
    """``--throughput-only`` studies no problem: the JSON is written and no plot is attempted
    (matplotlib refuses a figure of zero panels, which used to end such a run with an error)."""
    pytest.importorskip("matplotlib")
    report = {"problems": [], "quality": [], "throughput": [], "objective": "fwd+bwd"}
    assert bench._plot(report, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
    bench._write(report, tmp_path, "tput")
    assert json.loads((tmp_path / "tuner-tput.json").read_text())["throughput"] == []
    assert bench._plot(_report() | {"objective": "fwd"}, tmp_path / "p.png") is True
