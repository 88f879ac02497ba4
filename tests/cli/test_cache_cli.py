"""``info``, ``show``, ``export`` and ``import`` through the real click group (exit codes, output)."""

from __future__ import annotations

import itertools
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


# --------------------------------------------------------------------------- passwords

SECRET = "s3cretPW"
SERVER = f"postgresql+psycopg://tuner:{SECRET}@127.0.0.1:1/cache"   # nothing listens on port 1
MALFORMED = f"postgresql://tuner:{SECRET}@db-host:notaport/cache"


@pytest.mark.parametrize("url", [SERVER, MALFORMED])
@pytest.mark.parametrize("via", ["--cache", "env"])
@pytest.mark.parametrize("command", [["info"], ["info", "--json"], ["show"], ["export", "x.json"],
                                     ["import", "x.json"]])
def test_no_command_prints_a_password(tmp_path, monkeypatch, url, via, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.json").write_text("[]")
    args = list(command)
    if via == "env":
        monkeypatch.setenv(locations.ENV_CACHE, url)
    else:
        args += ["--cache", url]
    result = run(*args)
    assert SECRET not in result.output
    assert "tuner:***@" in result.output
    if command[0] == "info":
        assert result.exit_code == 0
    else:
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1


def test_locations_print_without_their_password():
    from adasplash_tune.cache.locations import display_location

    for url in (SERVER, MALFORMED, f"postgresql://tuner:p@{SECRET}@host/db", f"weird url://u:{SECRET}@h/db"):
        shown = display_location(url)
        assert SECRET not in shown and "***" in shown, shown
    assert display_location("/tmp/a:b@c.sqlite") == "/tmp/a:b@c.sqlite"
    assert display_location("sqlite:////tmp/a@b.sqlite") == "sqlite:////tmp/a@b.sqlite"


@pytest.mark.postgres
def test_tune_summary_and_info_hide_the_server_password(tmp_path):
    from sqlalchemy.engine import make_url

    from .._postgres import fresh_schema

    with fresh_schema() as cache_url, fresh_schema() as storage_url:
        cache_url, storage_url = (make_url(u).set(password=SECRET).render_as_string(hide_password=False)
                                  for u in (cache_url, storage_url))  # trust auth ignores it
        result = run("tune", "--kernel", "entmax", "--backend", "torch", "--rows", "8", "--cols", "64",
                     "--trials", "2", "--cache", cache_url, "--storage", storage_url)
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if " written to " in line or "trials are kept in" in line]
        assert len(lines) == 2 and all(":***@" in line for line in lines)
        info = run("info", "--json", "--cache", cache_url)
        assert info.exit_code == 0 and "error" not in json.loads(info.stdout)["user_cache"]
        assert SECRET not in result.output + info.output


# --------------------------------------------------------------------------- damaged, empty, edited


def _damaged(path) -> None:
    """A cache whose pages after the schema's are overwritten: it opens, then reading fails."""
    with open_store(path) as store:
        store.upsert_many(_many_entries(300))
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = DELETE")
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray(path.read_bytes())
    data[2 * page:len(data) - page] = bytes([0xA5]) * (len(data) - 3 * page)
    path.write_bytes(bytes(data))


def _many_entries(count: int) -> list[Entry]:
    h = get_spec("adasplash", "torch").source_hash()
    out = []
    shapes = itertools.product((64, 128), ("float16", "bfloat16", "float32"), (False, True),
                               [2 ** i for i in range(16)], [2 ** i for i in range(4, 20)])
    for dim, dtype, causal, heads, seq in itertools.islice(shapes, count):
        key = attention_key(backend="torch", dtype=dtype, batch=1, q_heads=heads, kv_heads=heads,
                            seq_len=seq, head_dim=dim, alpha=1.5, causal=causal, varlen=False)
        out.append(Entry("adasplash", "torch", dict(H200), h, key, {"q_chunk": 64, "k_chunk": 256, "niter": 8},
                         time_ms=1.0, trials=3, strategy="tpe"))
    return out


@pytest.mark.parametrize("command", ["show", "export", "import-from", "info"])
def test_a_damaged_cache_file_is_named_in_the_error(tmp_path, command):
    damaged = tmp_path / "damaged.sqlite"
    _damaged(damaged)
    args = {"show": ["show", "--cache", str(damaged)],
            "export": ["export", str(tmp_path / "o.json"), "--cache", str(damaged)],
            "import-from": ["import", str(damaged), "--cache", str(tmp_path / "c.sqlite")],
            "info": ["info", "--cache", str(damaged)]}[command]
    result = run(*args)
    if command == "info":
        assert result.exit_code == 0 and f"{damaged}  (unreadable: {damaged}: " in result.stdout
        assert "malformed" in result.stdout
    else:
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {damaged}: ") and "malformed" in lines[0]


def test_a_zero_byte_cache_is_an_empty_cache_for_every_command(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    show = run("show", "--cache", str(empty))
    assert show.exit_code == 0 and show.stdout.strip() == "no entries"
    assert _show_json(empty) == []
    info = json.loads(run("info", "--json", "--cache", str(empty)).stdout)["user_cache"]
    assert info["entries"] == 0 and "error" not in info
    export = run("export", str(tmp_path / "out.json"), "--cache", str(empty))
    assert export.exit_code == 0 and "exported 0 entries" in export.stdout
    source = run("import", str(empty), "--cache", str(tmp_path / "other.sqlite"))
    assert source.exit_code == 0 and source.stdout.strip() == "added 0, replaced 0, kept 0, rejected 0"
    assert empty.stat().st_size == 0  # reading never initialised it
    other = tmp_path / "other-empty.sqlite"
    other.touch()
    verify = run("verify", "--cache", str(other))  # verify opens for writing: initialised, empty
    assert verify.exit_code == 0 and "0 checked, 0 failed" in verify.stdout
    good = tmp_path / "good.json"
    good.write_text(json.dumps([e.to_dict() for e in _entries()]))
    target = run("import", str(good), "--cache", str(empty))  # writing initialises it
    assert target.exit_code == 0 and target.stdout.startswith(f"added {len(_entries())},")
    assert len(_show_json(empty)) == len(_entries())


def test_show_flags_rows_edited_into_invalid_configs_and_keys(tmp_path):
    cache = tmp_path / "c.sqlite"
    entries = _filled(cache)
    con = sqlite3.connect(cache)
    con.execute("UPDATE tuned_entries SET config_json = '{\"q_chunk\": 7, \"k_chunk\": 256, \"niter\": 8}' "
                "WHERE id = 1")
    con.execute("UPDATE tuned_entries SET key_json = '{\"seq\": 3}' WHERE id = 2")
    con.commit()
    con.close()
    rows = _show_json(cache)
    assert len(rows) == len(entries)
    invalid = sorted(r["status"] for r in rows if r["invalid"])
    assert len(invalid) == 2 and all(s.startswith("invalid: ") for s in invalid)
    assert any("q_chunk" in s for s in invalid) and any("key fields" in s for s in invalid)
    assert sum(r["status"] == "ok" for r in rows) == len(entries) - 2
    table = run("show", "--cache", str(cache))
    assert table.exit_code == 0 and table.stdout.count("invalid: ") == 2
    assert f"{len(entries)} entries, 2 invalid (ignored at call time)" in table.stdout


def test_import_of_2000_rows_with_bad_ones_stores_the_good_and_exits_1(tmp_path):
    *good, other, another = [e.to_dict() for e in _many_entries(2002)]
    bad = [dict(other, trials=2 ** 70), dict(another, device=dict(another["device"], sm_count="many"))]
    file = tmp_path / "big.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in good[:700] + bad + good[700:]) + "\n")
    cache = tmp_path / "c.sqlite"
    result = run("import", str(file), "--cache", str(cache))
    assert result.exit_code == 1
    assert result.stdout.strip() == f"added {len(good)}, replaced 0, kept 0, rejected 2"
    err = result.stderr.strip().splitlines()
    assert err[0].startswith("rejected: big.jsonl line 701: trials ")
    assert err[1].startswith("rejected: big.jsonl line 702: device.sm_count must be an integer")
    assert err[-1] == f"error: 2 of {len(good) + 2} entries in {file} were rejected"
    with open_store(cache, readonly=True) as store:
        assert store.count() == len(good)
