"""``adasplash-tune tune`` end to end on the torch backend (real CPU timings, real cache)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import adasplash_tune
from adasplash_tune.cache import locations
from adasplash_tune.cache.store import open_store
from adasplash_tune.cli import main


@pytest.fixture(autouse=True)
def _isolated(isolated_locations, tmp_path, monkeypatch):
    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "cache.sqlite"))  # the path the tests read


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _storage(tmp_path) -> list[str]:
    return ["--storage", f"sqlite:///{tmp_path / 'studies.sqlite'}"]


def test_tune_writes_entries_that_select_then_returns_from_the_cache(tmp_path):
    result = run("tune", "--backend", "torch", "--seq-len", "70", "--head-dim", "24", "--heads", "2",
                 "--kv-heads", "1", "--batch", "1", "--alpha", "1.5,2", "--both", "--trials", "3", "--seed", "1",
                 *_storage(tmp_path))
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output and "4 entries written" in result.output
    # not a terminal: one progress line per finished problem, none per trial
    done = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(done) == 4 and all(": 3 trials, best " in line for line in done)
    assert sorted(line.split("]")[0] for line in done) == ["[1/4", "[2/4", "[3/4", "[4/4"]
    with open_store(str(tmp_path / "cache.sqlite"), readonly=True) as store:
        entries = store.entries(kernel="adasplash")
    assert len(entries) == 4
    gen = torch.Generator().manual_seed(0)
    for alpha in (1.5, 2.0):
        for causal in (False, True):
            q = torch.randn(1, 2, 70, 24, generator=gen)
            k, v = torch.randn(2, 1, 1, 70, 24, generator=gen)
            sel = adasplash_tune.select("adasplash", q, k, v, alpha=alpha, is_causal=causal)
            assert sel.source == "cache"
            [entry] = [e for e in entries if e.key == sel.key]
            assert sel.config == entry.config and entry.error is not None
            # and the tuned config runs and matches the oracle
            from adasplash_tune.kernels.reference import attention_reference, relative_error, tolerance

            out = adasplash_tune.adasplash(q, k, v, alpha, causal)
            assert relative_error(out, attention_reference(q, k, v, alpha, causal)) <= tolerance(torch.float32)


def test_tune_entmax_json_output_and_the_cache_flag(tmp_path):
    cache = tmp_path / "other.sqlite"
    result = run("tune", "--kernel", "entmax", "--backend", "torch", "--rows", "33", "--cols", "100",
                 "--alpha", "1.7", "--trials", "3", "--seed", "2", "--cache", str(cache), "--json", *_storage(tmp_path))
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["status"] == "tuned" and row["trials"] == 3 and row["objective"] == "fwd"
    assert row["key"] == {"alpha": "generic", "backend": "torch", "cols": 128, "dtype": "float32", "rows": 64}
    with open_store(str(cache), readonly=True) as store:
        [entry] = store.entries(kernel="entmax")
    assert entry.config == row["config"]
    x = torch.randn(33, 100)
    assert adasplash_tune.select("entmax", x, alpha=1.7).source == "default"  # another cache than $ENV
    assert not (tmp_path / "cache.sqlite").exists()


def test_tune_from_record_tunes_the_most_frequent_key_first(tmp_path):
    record = tmp_path / "record.jsonl"
    lines = []
    for rows, count in ((10, 1), (300, 3)):
        shape = {"rows": rows, "cols": 50, "alpha": 1.5, "dtype": "float32"}
        key = {"backend": "torch", "dtype": "float32", "alpha": "1.5", "cols": 64, "rows": 16 if rows == 10 else 512}
        lines += [json.dumps({"kernel": "entmax", "backend": "torch", "key": key, "shape": shape})] * count
    lines.append("not json")
    record.write_text("\n".join(lines) + "\n")
    result = run("tune", "--kernel", "entmax", "--backend", "torch", "--from-record", str(record),
                 "--trials", "2", "--seed", "3", "--json", *_storage(tmp_path))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["problem"]["rows"] for r in rows] == [300, 10]


def test_the_summary_tells_gate_rejections_from_crashes(tmp_path):
    """niter=1 fails the accuracy gate: the trials column says "inaccurate", the JSON counts it."""
    args = ("tune", "--backend", "torch", "--seq-len", "40", "--head-dim", "16", "--heads", "1", "--batch", "1",
            "--trials", "2", "--seed", "5", "--strategy", "grid", "--space", "niter=1,12", "--space", "q_chunk=32",
            "--space", "k_chunk=64", *_storage(tmp_path))
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "2 (1 inaccurate)" in result.stdout
    again = run(*args, "--json")  # resumed: the stored trials, the same counts
    [row] = json.loads(again.stdout)
    assert row["failures"] == 1 and row["failure_kinds"] == {"accuracy": 1} and row["config"]["niter"] == 12


def test_space_bounds_the_search(tmp_path):
    """--space KNOB=V1,V2 keeps only those choices: every evaluated trial stays inside them."""
    result = run("tune", "--backend", "torch", "--seq-len", "40", "--head-dim", "16", "--heads", "1",
                 "--batch", "1", "--trials", "4", "--seed", "4", "--strategy", "grid", "--json",
                 "--space", "niter=6,8", "--space", "q_chunk=16,32", *_storage(tmp_path))
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["status"] == "tuned" and row["trials"] == 4
    assert row["config"]["niter"] in (6, 8) and row["config"]["q_chunk"] in (16, 32)
    bad = run("tune", "--backend", "torch", "--seq-len", "40", "--trials", "1", "--space", "niter=7",
              *_storage(tmp_path))  # not a declared choice: a usage error, before any tuning
    assert bad.exit_code == 2 and "niter=7: not a choice of niter" in bad.output
    for value in ("abc", "3,999", "true"):
        assert run("tune", "--backend", "torch", "--space", f"niter={value}").exit_code == 2
    empty = run("tune", "--backend", "torch", "--seq-len", "40", "--head-dim", "16", "--trials", "1", "--space",
                "q_chunk=2048", *_storage(tmp_path))  # declared, but no q_chunk that large fits N = 40
    assert empty.exit_code == 1 and "leaves no choice" in empty.output
    assert run("tune", "--backend", "torch", "--space", "niter").exit_code == 2


@pytest.mark.parametrize("args,message", [
    (["--alpha", "2.5"], "alpha must be in (1, 2]"),
    (["--seq-len", "abc"], "comma list of integers"),
    (["--gpus", "0"], "no CUDA/ROCm GPU"),
    (["--strategy", "annealing"], "Invalid value for '--strategy'"),
    (["--trials", "0"], "--trials"),
    (["--heads", "3", "--kv-heads", "2"], "multiple of --kv-heads"),
    # issue 16, defect 8: flags that used to be ignored or taken last, and an unknown knob
    (["--kernel", "entmax", "--head-dim", "999"], "--head-dim does not apply to --kernel entmax"),
    (["--kernel", "entmax", "--rows", "8", "--causal"], "--causal does not apply to --kernel entmax"),
    (["--seq-len", "64", "--rows", "8", "--cols", "9"], "--rows, --cols do not apply to --kernel adasplash"),
    (["--causal", "--non-causal"], "--causal and --non-causal contradict each other"),
    (["--both", "--causal"], "--causal and --both contradict each other"),
    (["--space", "unknown_knob=1"], "unknown knob 'unknown_knob' for adasplash (torch); known knobs: q_chunk"),
])
def test_usage_errors_exit_2(args, message):
    if "--gpus" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("tune", "--backend", "torch", *args)
    assert result.exit_code == 2
    assert message in result.output


def test_shape_flags_beside_from_record_are_a_usage_error(tmp_path):
    record = tmp_path / "record.jsonl"
    record.write_text("")
    result = run("tune", "--backend", "torch", "--from-record", str(record), "--seq-len", "64")
    assert result.exit_code == 2 and "--seq-len cannot be combined with --from-record" in result.output


@pytest.mark.parametrize("command", [None, *sorted(main.commands)])
def test_dash_h_is_help_on_every_command(command):
    result = run(*([command] if command else []), "-h")
    assert result.exit_code == 0 and result.output.startswith("Usage: ")
    assert result.output == run(*([command] if command else []), "--help").output


@pytest.fixture
def read_only(monkeypatch):
    """Make a file read-only for this process: chmod 0444, and for root (which writes through
    permission bits) the immutable attribute where the file system allows it, else the answer
    os.access gives any other user."""
    import os
    import subprocess

    made: list = []

    def make(path):
        path.chmod(0o444)
        if os.geteuid() != 0:
            return
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0 \
            if shutil.which("chattr") else False
        if done:
            made.append(path)
            return
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(path) and mode & os.W_OK
                            else real(p, mode, *a, **k))

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_cache_fails_before_tuning_naming_the_file(tmp_path, read_only, monkeypatch):
    """Issue 16, defect 8: a 0444 cache used to fail only when the tuned entries were written."""
    from adasplash_tune.tuner import job

    cache = tmp_path / "ro.sqlite"
    open_store(str(cache)).close()
    read_only(cache)
    monkeypatch.setattr(job.TuneJob, "run", lambda self: pytest.fail("tuning started"))
    result = run("tune", "--backend", "torch", "--seq-len", "40", "--trials", "1", "--cache", str(cache),
                 *_storage(tmp_path))
    assert result.exit_code == 1
    assert result.output == f"error: {cache}: the cache is not writable (read-only); nothing was tuned\n"


def test_failures_exit_1_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("triton is available here")
    result = run("tune", "--backend", "triton")
    assert result.exit_code == 1
    assert result.output.startswith("error: --backend triton needs a GPU")
    bogus = tmp_path / "not-a-cache.sqlite"
    bogus.write_bytes(b"definitely not sqlite" * 10)
    result = run("tune", "--backend", "torch", "--cache", str(bogus), "--trials", "1")
    assert result.exit_code == 1 and result.output.startswith("error:")
    assert bogus.read_bytes() == b"definitely not sqlite" * 10


def test_a_study_storage_that_cannot_be_opened_is_named_in_one_line(tmp_path):
    """Used to print SQLAlchemy's bare "Can't load plugin: sqlalchemy.dialects:bogus"."""
    result = run("tune", "--backend", "torch", "--seq-len", "16", "--head-dim", "16", "--trials", "1",
                 "--cache", str(tmp_path / "cache.sqlite"), "--storage", "bogus://user:sekrit@host/db")
    assert result.exit_code == 1
    assert result.output.startswith("error: study storage bogus://user:***@host/db: cannot open (")
    assert result.output.count("\n") == 1 and "sekrit" not in result.output
