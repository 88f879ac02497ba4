"""benchmarks/ncu_summary.py reads Nsight Compute's CSV pages (synthetic ones here: no GPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.scripts import load_script


def _load():
    return load_script("benchmarks/ncu_summary.py")


def _details(path: Path) -> None:
    head = ["ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
    rows = [("GPU Speed Of Light Throughput", "Duration", "us", "2,500.00"),
            ("Launch Statistics", "Registers Per Thread", "register/thread", "230"),
            ("Occupancy", "Achieved Occupancy", "%", "12.49"),
            ("Occupancy", "Something Else", "", "7")]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL)
        w.writerow(head)
        for section, metric, unit, value in rows:
            w.writerow(["0", "_k", section, metric, unit, value])


def _sass(path: Path) -> None:
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
            "stall_wait", "stall_barrier", "stall_wait (Not Issued)"]
    rows = [["0x0", "  LDGSTS.E.64 [R1], desc[UR4][R2.64]", "30", "100", "30", "0", "9"],
            ["0x10", "  @!P0 BAR.SYNC.DEFER_BLOCKING 0x0", "10", "50", "0", "10", "0"],
            ["0x20", "  FMUL R3, R4, R5", "0", "850", "0", "0", "0"]]
    with path.open("w", newline="") as fh:
        fh.write('"Kernel Name","_k",\n')
        w = csv.writer(fh, quoting=csv.QUOTE_ALL)
        w.writerow(head)
        w.writerows(rows)


def test_summary_reads_headline_metrics_and_stall_samples(tmp_path):
    module = _load()
    _details(tmp_path / "k-details.csv")
    _sass(tmp_path / "k-sass.csv")
    out = tmp_path / "summary.json"
    assert module.main([str(tmp_path), "k", "--out", str(out)]) == 0
    entry = json.loads(out.read_text())["k"]
    assert entry["kernel"] == "_k"
    assert entry["duration_ms"] == 2.5 and entry["registers"] == 230 and entry["achieved_occupancy_pct"] == 12.49
    assert entry["samples"] == 40
    assert entry["stall_share"] == {"wait": 0.75, "barrier": 0.25}  # "Not Issued" columns are not counted
    assert [o["opcode"] for o in entry["top_opcodes"]] == ["LDGSTS.E.64", "BAR.SYNC.DEFER_BLOCKING"]
    assert entry["instruction_mix"]["FMUL"] == 0.85  # predicates stripped, by executed instructions
