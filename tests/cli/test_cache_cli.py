"""``info``, ``show``, ``export`` and ``import`` through the real click group (exit codes, output)."""

from __future__ import annotations

import json
import os
import random
import sqlite3

import pytest
import torch
from click.testing import CliRunner

from adasplash_tune.cache import locations
from adasplash_tune.cache.store import Entry, open_store
from adasplash_tune.cli import main
from adasplash_tune.device import fingerprint
from adasplash_tune.kernels.problem import attention_key, entmax_key
from adasplash_tune.kernels.registry import get_spec

H200 = {"backend": "cuda", "vendor": "NVIDIA", "name": "NVIDIA H200", "arch": "sm_90",
        "sm_count": 132, "shared_mem": 232448, "torch_version": "2.11.0",
        "triton_version": "3.6.0", "runtime_version": "12.8",
        "device_id": "NVIDIA H200|sm_90|triton-3.6"}
H100 = dict(H200, name="NVIDIA H100 80GB HBM3", device_id="NVIDIA H100 80GB HBM3|sm_90|triton-3.6")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "env-cache.sqlite"))
    monkeypatch.delenv(locations.ENV_SHIPPED, raising=False)
    (tmp_path / "shipped").mkdir()
    monkeypatch.setattr(locations, "SHIPPED_DIR", tmp_path / "shipped")


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _config(kernel: str, rng: random.Random) -> dict:
    spec = get_spec(kernel, "torch")
    return {p.name: rng.choice(p.choices) for p in spec.params}


def _entries(seed: int = 0) -> list[Entry]:
    rng = random.Random(seed)
    out = []
    for device in (H200, H100):
        for seq in (64, 1000, 5000):
            key = attention_key(backend="torch", dtype="bfloat16", batch=2, q_heads=8, kv_heads=2,
                                seq_len=seq, head_dim=96, alpha=1.5, causal=True, varlen=False)
            out.append(Entry("adasplash", "torch", dict(device), get_spec("adasplash", "torch").source_hash(),
                             key, _config("adasplash", rng), time_ms=rng.uniform(0.1, 9.0),
                             error=rng.uniform(1e-6, 1e-3), trials=rng.randint(1, 50), strategy="tpe"))
    key = entmax_key(backend="torch", dtype="float32", rows=300, cols=777, alpha=1.7)
    out.append(Entry("entmax", "torch", dict(H200), get_spec("entmax", "torch").source_hash(), key,
                     _config("entmax", rng), time_ms=0.3))
    return out


def _filled(path) -> list[Entry]:
    entries = _entries()
    with open_store(path) as store:
        for e in entries:
            assert store.upsert_best(e)
    return entries


def _show_json(cache) -> list[dict]:
    result = run("show", "--cache", str(cache), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("suffix", [".json", ".sqlite"])
def test_round_trip_export_import_show(tmp_path, suffix):
    src, dst, file = tmp_path / "src.sqlite", tmp_path / "dst.sqlite", tmp_path / f"out{suffix}"
    entries = _filled(src)
    result = run("export", str(file), "--cache", str(src))
    assert result.exit_code == 0 and f"exported {len(entries)} entries" in result.stdout
    result = run("import", str(file), "--cache", str(dst))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"added {len(entries)}, replaced 0, kept 0, rejected 0"
    before, after = _show_json(src), _show_json(dst)
    assert len(after) == len(entries)
    fields = ("kernel", "backend", "device", "key", "config", "time_ms", "error", "kernel_hash", "stale")
    assert [{f: r[f] for f in fields} for r in after] == [{f: r[f] for f in fields} for r in before]
    assert {r["device"] for r in after} == {H200["device_id"], H100["device_id"]}


def test_show_flags_stale_entries(tmp_path):
    cache = tmp_path / "c.sqlite"
    entries = _filled(cache)
    stale = Entry(**{**entries[0].__dict__, "kernel_hash": "0000000000000000",
                     "key": dict(entries[0].key, seq=32768)})
    with open_store(cache) as store:
        store.upsert_best(stale)
    rows = _show_json(cache)
    assert [r["key"]["seq"] for r in rows if r["stale"]] == [32768]
    assert sum(not r["stale"] for r in rows) == len(entries)
    table = run("show", "--cache", str(cache))
    assert table.exit_code == 0
    assert "STATUS" in table.stdout and "stale" in table.stdout
    assert f"{len(entries) + 1} entries, 1 stale" in table.stdout


def test_show_filters_by_kernel(tmp_path):
    cache = tmp_path / "c.sqlite"
    _filled(cache)
    result = run("show", "--cache", str(cache), "--kernel", "entmax", "--json")
    rows = json.loads(result.stdout)
    assert [r["kernel"] for r in rows] == ["entmax"] and rows[0]["key"]["cols"] == 1024


def test_export_filters_by_kernel_and_device(tmp_path):
    cache, out = tmp_path / "c.sqlite", tmp_path / "h100.json"
    _filled(cache)
    result = run("export", str(out), "--cache", str(cache), "--device", "h100", "--kernel", "adasplash")
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())["entries"]
    assert len(data) == 3 and {d["device"]["device_id"] for d in data} == {H100["device_id"]}
    missing = run("export", str(tmp_path / "x.json"), "--cache", str(cache), "--device", "MI300X")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: no device matching")


def test_import_with_invalid_rows_reports_them_and_exits_1(tmp_path):
    good = [e.to_dict() for e in _entries(seed=5)[:2]]
    base = good[0]
    bad = [
        dict(base, kernel="flashattn"),                                   # unknown kernel
        dict(base, config=dict(base["config"], tile=3)),                  # unknown parameter
        dict(base, config=dict(base["config"], niter=7)),                 # out-of-domain value
        dict(base, config="{not json"),                                   # malformed JSON
    ]
    file = tmp_path / "mixed.json"
    file.write_text(json.dumps({"entries": good + bad}))
    cache = tmp_path / "c.sqlite"
    result = run("import", str(file), "--cache", str(cache))
    assert result.exit_code == 1
    assert result.stdout.strip() == "added 2, replaced 0, kept 0, rejected 4"
    err = result.stderr.strip().splitlines()
    assert len([line for line in err if line.startswith("rejected: ")]) == 4
    assert any("flashattn" in line for line in err) and any("'tile'" in line for line in err)
    assert any("niter" in line and "7" in line for line in err)
    assert any("malformed JSON" in line for line in err)
    assert err[-1] == f"error: 4 of 6 entries in {file} were rejected"
    assert len(_show_json(cache)) == 2


@pytest.mark.parametrize("policy, expected", [("faster", "added 0, replaced 1, kept 0, rejected 0"),
                                              ("keep", "added 0, replaced 0, kept 1, rejected 0")])
def test_import_policy(tmp_path, policy, expected):
    cache, file = tmp_path / "c.sqlite", tmp_path / "faster.json"
    entry = _entries()[0]
    with open_store(cache) as store:
        store.upsert_best(entry)
    file.write_text(json.dumps([dict(entry.to_dict(), time_ms=entry.time_ms / 2)]))
    result = run("import", str(file), "--cache", str(cache), "--policy", policy)
    assert result.exit_code == 0 and result.stdout.strip() == expected


def test_usage_errors_exit_2(tmp_path):
    file = tmp_path / "x.json"
    file.write_text("[]")
    assert run("import", str(file), "--policy", "fastest").exit_code == 2
    assert run("import", str(tmp_path / "missing.json")).exit_code == 2
    assert run("export", str(tmp_path / "out.csv")).exit_code == 2
    assert run("show", "--kernel", "flash").exit_code == 2


def _random(path):
    path.write_bytes(os.urandom(5000))


def _foreign(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, blob BLOB)")
    con.commit()
    con.close()


def _newer(path):
    open_store(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = version + 5")
    con.commit()
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()


@pytest.mark.parametrize("make", [_random, _foreign, _newer])
@pytest.mark.parametrize("command", ["show", "import", "export", "info"])
def test_bad_cache_file_one_line_error_and_unchanged(tmp_path, make, command):
    victim = tmp_path / "victim.sqlite"
    make(victim)
    before = victim.read_bytes()
    good = tmp_path / "good.json"
    good.write_text(json.dumps([_entries()[0].to_dict()]))
    args = {"show": ["show"], "import": ["import", str(good)], "export": ["export", str(tmp_path / "o.json")],
            "info": ["info"]}[command]
    result = run(*args, "--cache", str(victim))
    if command == "info":  # info reports an unreadable cache instead of failing
        assert result.exit_code == 0 and f"{victim}  (unreadable: " in result.stdout
    else:
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {victim}: ")
    assert victim.read_bytes() == before


def test_import_of_a_random_file_is_a_one_line_error(tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_bytes(os.urandom(3000))
    result = run("import", str(junk), "--cache", str(tmp_path / "c.sqlite"))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {junk}: not a cache export")


def test_cache_option_overrides_env(tmp_path, monkeypatch):
    env_cache, opt_cache = tmp_path / "env.sqlite", tmp_path / "opt.sqlite"
    monkeypatch.setenv(locations.ENV_CACHE, str(env_cache))
    _filled(opt_cache)
    assert len(_show_json(opt_cache)) == len(_entries())
    result = run("show", "--json")  # the env cache does not exist: a named cache must
    assert result.exit_code == 1 and str(env_cache) in result.stderr
    open_store(env_cache).close()
    assert json.loads(run("show", "--json").stdout) == []


def test_info_json_and_text(tmp_path):
    cache = tmp_path / "c.sqlite"
    entries = _filled(cache)
    shipped = locations.shipped_dir() / "nvidia-h200.sqlite"
    with open_store(cache) as store:
        store.export(shipped, device_id=H200["device_id"])
    result = run("info", "--json", "--cache", str(cache))
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["versions"]["torch"] == torch.__version__
    cpu = [d for d in data["devices"] if d["device"] == "cpu"]
    assert cpu and cpu[0]["device_id"] == fingerprint("cpu").device_id
    assert cpu[0]["default_backend"] == "torch"
    assert data["user_cache"]["entries"] == len(entries)
    assert data["user_cache"]["by_kernel"] == {"adasplash": 6, "entmax": 1}
    assert [(s["location"], s["entries"]) for s in data["shipped"]] == [(str(shipped), 4)]
    text = run("info", "--cache", str(cache))
    assert text.exit_code == 0
    assert f"user cache: {cache}  (7 entries: adasplash 6, entmax 1)" in text.stdout
    assert f"  {shipped}  (4 entries" in text.stdout
