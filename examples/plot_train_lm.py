#!/usr/bin/env python3
"""Compare runs of ``examples/train_lm.py``: a table, a combined JSON and validation-loss curves.

    python examples/plot_train_lm.py RUN_DIR [RUN_DIR ...] [--png curves.png] [--json compare.json]

Each RUN_DIR is a ``--out`` folder of train_lm.py (``config.json`` + ``metrics.jsonl``, and
``summary.json`` once the run finished). Validation losses are compared at the last step that
every run evaluated (runs stopped by a time budget reach different steps), relative to the
baseline: the first softmax (sdpa) run given, else the first run. The plot (validation loss
against step and against wall time) needs matplotlib; without it the table and JSON still come.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Run:
    folder: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.config["name"]

    def val_losses(self) -> dict[int, float]:
        return {r["step"]: r["val_loss"] for r in self.records if r["val_loss"] is not None}


def load_run(folder: str | Path) -> Run:
    """One run's files; a missing or malformed file raises ValueError naming it (and the line)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    records = []
    metrics = folder / "metrics.jsonl"
    try:
        lines = metrics.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{metrics}: cannot read ({exc.strerror})") from exc
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{metrics}:{number}: not JSON ({exc.msg})") from exc
    if not records:
        raise ValueError(f"{metrics}: no records")
    summary_path = folder / "summary.json"
    summary = _read_json(summary_path) if summary_path.exists() else None
    return Run(str(folder), config, records, summary)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg})") from exc


def compare(runs: Sequence[Run]) -> dict[str, Any]:
    """Per run: losses at the common step and at the end, speed, memory, final density and alpha."""
    baseline = next((r for r in runs if r.config["attention"] == "sdpa"), runs[0])
    common = set.intersection(*(set(r.val_losses()) for r in runs))
    common_step = max(common) if common else None
    base_loss = baseline.val_losses().get(common_step) if common_step is not None else None
    rows = []
    for run in runs:
        s = run.summary or {}
        loss = run.val_losses().get(common_step) if common_step is not None else None
        density = (s.get("density") or [None])[-1]
        rows.append({
            "name": run.name, "folder": run.folder, "attention": run.config["attention"],
            "alpha": run.config.get("alpha"), "status": s.get("status", "unfinished"),
            "steps_done": run.records[-1]["step"], "stop_reason": s.get("stop_reason"),
            "val_loss_at_common_step": loss,
            "gap_vs_baseline": (loss / base_loss - 1.0) if loss is not None and base_loss else None,
            "final_val_loss": s.get("final_val_loss"), "best_val_loss": s.get("best_val_loss"),
            "step_time_s": s.get("step_time_s"), "tokens_per_s": s.get("tokens_per_s"),
            "peak_mem_bytes": s.get("peak_mem_bytes"), "alpha_final": s.get("alpha_final"),
            "density_final": density,
        })
    curves = [{"name": run.name, "folder": run.folder,
               "points": [{k: r[k] for k in ("step", "wall_s", "train_loss", "val_loss")} for r in run.records]}
              for run in runs]
    return {"baseline": baseline.name, "common_step": common_step, "mismatches": mismatches(runs), "runs": rows,
            "curves": curves}


#: Settings that must agree for a loss comparison to mean something (the attention is what varies).
SAME = ("seq_len", "batch", "steps", "layers", "width", "heads", "lr", "weight_decay", "clip", "seed",
        "max_bytes", "val_fraction", "eval_windows", "data")


def mismatches(runs: Sequence[Run]) -> dict[str, list[Any]]:
    """Settings (and the corpus hash) that differ between the runs: name -> value per run."""
    values = {name: [run.config["args"].get(name) for run in runs] for name in SAME}
    values["corpus_sha256"] = [run.config["corpus"]["sha256"] for run in runs]
    return {name: v for name, v in values.items() if len(set(map(json.dumps, v))) > 1}


def table(report: dict[str, Any]) -> str:
    """The comparison as plain text: one row per run, then the final density per layer."""
    step = report["common_step"]
    head = (f"{'run':<34} {'steps':>6} {'val@' + str(step):>10} {'gap':>7} {'final val':>9} "
            f"{'ms/step':>8} {'tokens/s':>10} {'peak MiB':>9}")
    lines = [f"baseline: {report['baseline']}; validation losses compared at step {step}", head]
    if report["mismatches"]:
        lines.insert(0, "WARNING: the runs differ in more than the attention: " + ", ".join(
            f"{name} {values}" for name, values in report["mismatches"].items()))
    for r in report["runs"]:
        cells = [_num(r["val_loss_at_common_step"], ".4f", width=10),
                 _num(r["gap_vs_baseline"], "+.2%", width=7, scale=1.0),
                 _num(r["final_val_loss"], ".4f", width=9), _num(r["step_time_s"], ".2f", width=8, scale=1e3),
                 _num(r["tokens_per_s"], ",.0f", width=10), _num(r["peak_mem_bytes"], ",.0f", width=9, scale=2**-20)]
        lines.append(f"{r['name'][:34]:<34} {r['steps_done']:>6} " + " ".join(cells))
    dense = [r for r in report["runs"] if r["density_final"]]
    if dense:
        lines.append("final block density per layer (16x16 / 64x64 tiles):")
        for r in dense:
            cells = "  ".join(f"{d['tile16']:.3f}/{d['tile64']:.3f}" for d in r["density_final"]["layers"])
            lines.append(f"  {r['name'][:34]:<34} step {r['density_final']['step']}: {cells}")
    return "\n".join(lines)


def _num(value: float | None, spec: str, *, width: int, scale: float = 1.0) -> str:
    text = "n/a" if value is None else format(value * scale, spec)
    return f"{text:>{width}}"


def plot(runs: Sequence[Run], png: str | Path) -> bool:
    """Validation loss against step and against wall time, one line per run; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        evals = [r for r in run.records if r["val_loss"] is not None]
        by_step.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker=".", label=run.name)
        by_time.plot([r["wall_s"] for r in evals], [r["val_loss"] for r in evals], marker=".", label=run.name)
    for ax, xlabel in ((by_step, "step"), (by_time, "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train_lm.py --out folders")
    p.add_argument("--png", help="write the loss curves here")
    p.add_argument("--json", help="write the comparison (and every run's curve) here")
    args = p.parse_args(argv)
    try:
        runs = [load_run(folder) for folder in args.runs]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = compare(runs)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.png:
        if plot(runs, args.png):
            print(f"wrote {args.png}")
        else:
            print(f"matplotlib is not installed: no plot written to {args.png} (pip install matplotlib)",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
