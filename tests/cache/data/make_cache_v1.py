"""Writes ``cache-v1.sqlite``: a config cache in schema version 1 (the first layout), committed so
that the migration test upgrades a real old file. Run once; the output is checked in.

    python tests/cache/data/make_cache_v1.py
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

V1_DDL = """
CREATE TABLE schema_version (app VARCHAR(64) NOT NULL PRIMARY KEY, version INTEGER NOT NULL,
                             updated_at DATETIME NOT NULL);
CREATE TABLE devices (id INTEGER NOT NULL PRIMARY KEY, device_id VARCHAR(256) NOT NULL UNIQUE,
    backend VARCHAR(16) NOT NULL, vendor VARCHAR(64) NOT NULL, name VARCHAR(128) NOT NULL,
    arch VARCHAR(64) NOT NULL, sm_count INTEGER NOT NULL, shared_mem INTEGER NOT NULL,
    torch_version VARCHAR(64) NOT NULL, triton_version VARCHAR(64) NOT NULL,
    runtime_version VARCHAR(64) NOT NULL);
CREATE INDEX ix_devices_arch ON devices (arch);
CREATE TABLE kernels (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(64) NOT NULL,
    backend VARCHAR(32) NOT NULL, source_hash VARCHAR(64) NOT NULL,
    CONSTRAINT uq_kernels UNIQUE (name, backend, source_hash));
CREATE TABLE tuned_entries (id INTEGER NOT NULL PRIMARY KEY,
    device_pk INTEGER NOT NULL REFERENCES devices (id), kernel_pk INTEGER NOT NULL REFERENCES kernels (id),
    key_json TEXT NOT NULL, config_json TEXT NOT NULL, time_ms FLOAT, spread_ms FLOAT, error FLOAT,
    trials INTEGER NOT NULL, strategy VARCHAR(32) NOT NULL, provenance_json TEXT NOT NULL,
    created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    CONSTRAINT uq_tuned_entries UNIQUE (device_pk, kernel_pk, key_json));
CREATE TABLE failed_configs (id INTEGER NOT NULL PRIMARY KEY,
    device_pk INTEGER NOT NULL REFERENCES devices (id), kernel_pk INTEGER NOT NULL REFERENCES kernels (id),
    key_json TEXT NOT NULL, config_json TEXT NOT NULL, reason VARCHAR(16) NOT NULL, detail TEXT NOT NULL,
    created_at DATETIME NOT NULL);
"""

DEVICE = ("NVIDIA H200|sm_90|triton-3.6", "cuda", "NVIDIA", "NVIDIA H200", "sm_90", 132, 232448,
          "2.11.0", "3.6.0", "12.8")
HASH = "0123456789abcdef"


def key(seq: int, bh: int, causal: bool) -> str:
    data = {"alpha": "1.5", "backend": "torch", "bh": bh, "causal": causal, "dtype": "float16",
            "gqa": 1, "head_dim": 64, "seq": seq, "varlen": False}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def main() -> None:
    path = Path(__file__).with_name("cache-v1.sqlite")
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript(V1_DDL)
    stamp = "2026-01-02 03:04:05.000000"
    con.execute("INSERT INTO schema_version VALUES ('adasplash-tune', 1, ?)", (stamp,))
    con.execute("INSERT INTO devices VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", DEVICE)
    con.execute("INSERT INTO kernels VALUES (1, 'adasplash', 'torch', ?)", (HASH,))
    con.execute("INSERT INTO kernels VALUES (2, 'entmax', 'torch', ?)", (HASH,))
    rows = [
        (1, key(1024, 32, True), {"k_chunk": 512, "niter": 6, "q_chunk": 128}, 0.91),
        (1, key(4096, 32, True), {"k_chunk": 2048, "niter": 6, "q_chunk": 256}, 7.5),
        (2, json.dumps({"alpha": "2", "backend": "torch", "cols": 1024, "dtype": "float32",
                        "rows": 4096}, sort_keys=True, separators=(",", ":")),
         {"niter": 5, "row_chunk": 1024}, 0.12),
    ]
    for kernel_pk, key_json, config, time_ms in rows:
        con.execute(
            "INSERT INTO tuned_entries (device_pk, kernel_pk, key_json, config_json, time_ms, "
            "spread_ms, error, trials, strategy, provenance_json, created_at, updated_at) "
            "VALUES (1, ?, ?, ?, ?, 0.01, 1e-5, 40, 'tpe', ?, ?, ?)",
            (kernel_pk, key_json, json.dumps(config, sort_keys=True), time_ms,
             json.dumps({"host": "gpu-node-1", "tool": "adasplash-tune 0.0.1"}), stamp, stamp))
    con.execute("INSERT INTO failed_configs VALUES (1, 1, 1, ?, ?, 'compile', 'out of resources', ?)",
                (key(1024, 32, True), json.dumps({"k_chunk": 4096, "niter": 6, "q_chunk": 2048}), stamp))
    con.commit()
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()


if __name__ == "__main__":
    main()
