"""``bench`` and ``verify`` through the real click group, on the torch backend (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import adasplash_tune
from adasplash_tune.api import clear_memo
from adasplash_tune.cache import locations
from adasplash_tune.cache.store import Entry, open_store
from adasplash_tune.cli import main
from adasplash_tune.device import fingerprint
from adasplash_tune.kernels.registry import get_spec
from adasplash_tune.tuner.problems import AttentionProblem


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "cache.sqlite"))
    monkeypatch.delenv(locations.ENV_SHIPPED, raising=False)
    (tmp_path / "shipped").mkdir()
    monkeypatch.setattr(locations, "SHIPPED_DIR", tmp_path / "shipped")
    torch.manual_seed(0)


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


PROBLEM = AttentionProblem(batch=1, heads=2, kv_heads=2, seq_len=37, head_dim=16, alpha=1.5, causal=True,
                           dtype="float32")


def _store_entry(path, niter: int) -> Entry:
    spec = get_spec("adasplash", "torch")
    config = spec.validate({"q_chunk": 16, "k_chunk": 64, "niter": niter}).as_dict()
    entry = Entry("adasplash", "torch", fingerprint("cpu").as_dict(), spec.source_hash(), PROBLEM.key("torch"),
                  config, time_ms=1.0, error=0.0, trials=1, strategy="test",
                  provenance={"problem": PROBLEM.to_dict(), "backward": True})
    with open_store(str(path)) as store:
        assert store.upsert_best(entry)
    return entry


def test_bench_table_json_and_replot(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--backend", "torch", "--seq-len", "33", "--head-dim", "16", "--heads", "2",
                 "--both", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "selected ms" in result.output and "sdpa ms" in result.output
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"selected", "default", "sdpa"}
    assert {r["passes"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["time_ms"] > 0 for r in rows)
    assert {r["source"] for r in rows if r["method"] == "selected"} == {"default"}
    again = run("bench", "--from-json", str(out), "--json")
    assert again.exit_code == 0 and json.loads(again.stdout) == rows


def test_bench_usage_error_exit_2():
    assert run("bench", "--seq-len", "abc").exit_code == 2


def test_bench_plot_of_entmax_is_a_usage_error_before_running(tmp_path, monkeypatch):
    """The plot draws attention timings only: entmax used to be timed first, then fail with exit 1."""
    from adasplash_tune import benchmark

    ran = []
    monkeypatch.setattr(benchmark, "bench_problems", lambda *a, **k: ran.append(1) or [])
    result = run("bench", "--kernel", "entmax", "--rows", "2", "--cols", "16", "--plot", str(tmp_path / "p.png"))
    assert result.exit_code == 2 and not ran
    assert "--plot draws attention timings" in result.output


@pytest.mark.parametrize("content", ["not json", '{"rows": [1]}', '[{"label": "x"}]', '{"entries": []}', "\udcff"])
def test_bench_from_a_file_that_is_no_bench_output_is_a_one_line_error(tmp_path, content):
    """Used to be `error: 'rows'` or a bare JSON decoder message, without the file's name."""
    path = tmp_path / "rows.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    result = run("bench", "--from-json", str(path))
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {path}: not a bench --out file (") and result.output.count("\n") == 1


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path, monkeypatch):
    """Issue 16, defect 5: the whole benchmark used to run first, then fail with nothing printed."""
    import sys

    from adasplash_tune import benchmark

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    ran = []
    monkeypatch.setattr(benchmark, "bench_problems", lambda *a, **k: ran.append(1) or [])
    result = run("bench", "--backend", "torch", "--seq-len", "33", "--head-dim", "16", "--plot",
                 str(tmp_path / "plot.png"))
    assert result.exit_code == 1 and not ran
    assert result.output == 'error: --plot needs matplotlib: pip install "adasplash-tune[plot]"\n'


def test_bench_prints_the_results_when_only_the_plot_fails(tmp_path, monkeypatch):
    """A matplotlib that is installed but breaks on import: the rows are printed, then the error."""
    import sys

    rows = [{"problem": {"kernel": "adasplash", "head_dim": 16, "causal": False, "seq_len": 33, "alpha": 1.5},
             "label": "B1 H2 N33 D16", "method": method, "passes": "fwd", "time_ms": t, "spread_ms": 0.01,
             "source": "default" if method == "selected" else "", "config": {}, "note": "", "host_ms": None}
            for method, t in (("selected", 1.0), ("default", 1.5))]
    saved = tmp_path / "rows.json"
    saved.write_text(json.dumps({"rows": rows}))
    broken = tmp_path / "site" / "matplotlib"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    result = run("bench", "--from-json", str(saved), "--plot", str(tmp_path / "plot.png"))
    assert result.exit_code == 1
    assert "selected ms" in result.stdout and "(fwd): 1.50x" in result.stdout  # the table and the speed-up
    assert result.stderr.strip().splitlines() == [
        'error: --plot: cannot import matplotlib (a broken install); pip install "adasplash-tune[plot]"']


def test_verify_passes_a_good_entry(tmp_path):
    cache = tmp_path / "cache.sqlite"
    _store_entry(cache, niter=12)
    result = run("verify", "--cache", str(cache), "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["status"] == "ok" and row["error"] < row["tolerance"]


def test_verify_marks_a_failing_entry_and_the_loader_skips_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache.sqlite"
    _store_entry(cache, niter=1)  # one Halley step: far outside the fp32 tolerance
    q = torch.randn(1, 2, 37, 16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    clear_memo()
    assert adasplash_tune.select("adasplash", q, k, v, 1.5, True, backend="torch").source == "cache"
    result = run("verify", "--cache", str(cache))
    assert result.exit_code == 1
    assert "accuracy" in result.output and "1 failed" in result.output
    clear_memo()
    sel = adasplash_tune.select("adasplash", q, k, v, 1.5, True, backend="torch")
    assert sel.source == "default"
    with open_store(str(cache)) as store:
        (entry,) = store.entries()
        assert entry.failed_verify


def test_verify_checks_the_shipped_entries_for_this_device_without_marking_them(tmp_path):
    shipped = tmp_path / "shipped" / "this-cpu.sqlite"
    _store_entry(shipped, niter=12)
    result = run("verify", "--json")  # an empty user cache: the shipped entry is still checked
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["source"] == "shipped" and row["status"] == "ok" and row["inputs"] == "randn"
    assert json.loads(run("verify", "--json", "--no-shipped").stdout) == []
    assert json.loads(run("verify", "--json", "--cache", str(tmp_path / "cache.sqlite")).stdout) == []

    _store_entry(tmp_path / "shipped" / "other.sqlite", niter=1)  # a bad shipped entry: reported, not marked
    before = shipped.with_name("other.sqlite").read_bytes()
    result = run("verify")
    assert result.exit_code == 1 and "2 checked, 1 failed (0 marked)" in result.output
    assert shipped.with_name("other.sqlite").read_bytes() == before


def test_verify_of_a_missing_cache_checks_nothing_and_creates_no_file(tmp_path):
    missing = tmp_path / "typo.sqlite"
    result = run("verify", "--json", "--cache", str(missing))
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert f"no cache file at {missing}" in result.stderr
    assert not missing.exists()


@pytest.mark.parametrize("device,message", [("bogus", "'bogus' is not a device"), ("cuda:99", "CUDA/ROCm GPU")])
def test_verify_on_a_device_this_machine_lacks_is_a_usage_error(tmp_path, device, message):
    cache = tmp_path / "cache.sqlite"
    _store_entry(cache, niter=12)
    result = run("verify", "--cache", str(cache), "--device", device)
    assert result.exit_code == 2 and "Invalid value for '--device'" in result.output and message in result.output


def test_verify_checks_a_cache_it_cannot_write_read_only_without_marking(tmp_path, monkeypatch):
    """A cache in a read-only folder (or mount) used to fail verify before anything was checked."""
    from adasplash_tune.cache import store as store_module
    from adasplash_tune.cache.store import StoreError

    cache = tmp_path / "cache.sqlite"
    _store_entry(cache, niter=1)  # fails the fp32 gate
    real_open = store_module.open_store

    def no_writing(location=None, *args, readonly=False, **kwargs):
        if not readonly and str(location) == str(cache):
            raise StoreError(f"{cache}: its directory is read-only (SQLite needs to create its journal there)")
        return real_open(location, *args, readonly=readonly, **kwargs)

    monkeypatch.setattr(store_module, "open_store", no_writing)
    result = run("verify", "--cache", str(cache))
    assert result.exit_code == 1
    assert "checking it read-only: failures are reported, not marked" in result.stderr
    assert "1 checked, 1 failed (0 marked)" in result.stdout
    with real_open(str(cache)) as store:
        (entry,) = store.entries()
        assert not entry.failed_verify
