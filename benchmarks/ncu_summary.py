"""Summarise Nsight Compute CSV exports into one JSON: what bounds each profiled kernel.

Input, per profiled launch: ``NAME-details.csv`` (``ncu -i R --page details --csv``) and
``NAME-sass.csv`` (``ncu -i R --page source --csv --print-source sass``). Output, per NAME: the
launch's headline metrics (duration, SM frequency, occupancy, registers, issue-slot use,
throughputs), its warp-stall samples by reason, and the instructions that hold the most samples
by opcode (where the time goes inside the kernel).

    python benchmarks/ncu_summary.py DIR NAME [NAME ...] --out benchmarks/results/h200-ncu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

#: (section, metric) pairs kept from the details page, under short names.
HEADLINE = {
    ("GPU Speed Of Light Throughput", "Duration"): "duration",
    ("GPU Speed Of Light Throughput", "SM Frequency"): "sm_ghz",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_throughput_pct",
    ("GPU Speed Of Light Throughput", "Memory Throughput"): "memory_throughput_pct",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_throughput_pct",
    ("Compute Workload Analysis", "Issue Slots Busy"): "issue_slots_busy_pct",
    ("Compute Workload Analysis", "Executed Ipc Active"): "ipc_active",
    ("Launch Statistics", "Registers Per Thread"): "registers",
    ("Launch Statistics", "Block Size"): "block_size",
    ("Launch Statistics", "Grid Size"): "grid_size",
    ("Launch Statistics", "Dynamic Shared Memory Per Block"): "dynamic_smem_kb",
    ("Launch Statistics", "Waves Per SM"): "waves_per_sm",
    ("Occupancy", "Theoretical Occupancy"): "theoretical_occupancy_pct",
    ("Occupancy", "Achieved Occupancy"): "achieved_occupancy_pct",
    ("Occupancy", "Block Limit Registers"): "block_limit_registers",
    ("Occupancy", "Block Limit Shared Mem"): "block_limit_smem",
    ("Scheduler Statistics", "Eligible Warps Per Scheduler"): "eligible_warps_per_scheduler",
    ("Scheduler Statistics", "No Eligible"): "no_eligible_pct",
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"): "cycles_per_issued_instruction",
    ("Instruction Statistics", "Executed Instructions"): "executed_instructions",
    ("Memory Workload Analysis", "L2 Hit Rate"): "l2_hit_pct",
    ("Memory Workload Analysis", "Local Memory Spilling Requests"): "spill_requests",
}


def _number(text: str) -> Any:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def headline(path: Path) -> dict[str, Any]:
    """The HEADLINE metrics of the (first) kernel in a details CSV, plus its name."""
    out: dict[str, Any] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault("kernel", row["Kernel Name"])
            key = HEADLINE.get((row["Section Name"], row["Metric Name"]))
            if key and key not in out:
                unit = row["Metric Unit"]
                out[key] = _number(row["Metric Value"])
                if key == "duration" and unit == "us":
                    out[key] = out[key] / 1000.0
                elif key == "duration" and unit == "ns":
                    out[key] = out[key] / 1e6
    if "duration" in out:
        out["duration_ms"] = out.pop("duration")
    return out


def stalls(path: Path, top: int = 12) -> dict[str, Any]:
    """Warp-stall samples by reason and the opcodes holding the most samples, from a sass CSV."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
    reader = csv.DictReader(lines[start:])
    reasons: Counter[str] = Counter()
    by_opcode: Counter[str] = Counter()
    by_opcode_reason: dict[str, Counter[str]] = {}
    executed: Counter[str] = Counter()
    total = 0
    for row in reader:
        samples = int(_number(row.get("Warp Stall Sampling (All Samples)") or "0") or 0)
        sass = row.get("Source", "").strip()
        opcode = re.sub(r"^@!?U?P\w+\s+", "", sass).split(" ")[0] if sass else "?"
        executed[opcode] += int(_number(row.get("Instructions Executed") or "0") or 0)
        if not samples:
            continue
        total += samples
        by_opcode[opcode] += samples
        for name, value in row.items():
            if name.startswith("stall_") and not name.endswith("(Not Issued)") and value not in ("", "0"):
                count = int(_number(value))
                reasons[name[6:]] += count
                by_opcode_reason.setdefault(opcode, Counter())[name[6:]] += count
    share = {k: round(v / max(total, 1), 4) for k, v in reasons.most_common()}
    ops = [{"opcode": op, "share": round(n / max(total, 1), 4),
            "reasons": dict(by_opcode_reason.get(op, Counter()).most_common(3))}
           for op, n in by_opcode.most_common(top)]
    all_exec = sum(executed.values())
    mix = {op: round(n / max(all_exec, 1), 4) for op, n in executed.most_common(top)}
    return {"samples": total, "stall_share": share, "top_opcodes": ops, "instruction_mix": mix}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("names", nargs="+")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result: dict[str, Any] = {}
    for name in args.names:
        entry: dict[str, Any] = {}
        details, sass = args.dir / f"{name}-details.csv", args.dir / f"{name}-sass.csv"
        if details.exists():
            entry.update(headline(details))
        if sass.exists():
            entry.update(stalls(sass))
        result[name] = entry
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
