"""Plot benchmarks/bench_sparsity.py results: each method's time over SDPA's against block density.

Reads one or more of its JSON files and writes one PNG: x = block density of our mask (16x16 tiles
by default, ``--tile 64`` for 64x64; log scale), y = time / SDPA's time of the same pass at the
same point (log scale), one panel for the forward and one for forward+backward; a marker per
method (ours selected, ours default, upstream v2), a colour per run (shape and causal mode), each
point labelled with its family and scale, and a line at 1.0 (parity with SDPA). Also prints the
rows as a table.

    python benchmarks/plot_sparsity.py benchmarks/results/h200-sparsity-crossover.json
    python benchmarks/plot_sparsity.py a.json b.json --tile 64 --out /tmp/sparsity.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("plot_sparsity")

PASSES = ("fwd", "fwd+bwd")
MARKERS = {"ours-selected": "o", "ours-default": "s", "upstream-v2": "^"}


def load_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The rows of every file (ValueError for a file without bench_sparsity's per-method rows)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        got = report.get("rows") if isinstance(report, dict) else None
        if not isinstance(got, list) or any("method" not in r or "pass" not in r for r in got):
            raise ValueError(f"{path}: no per-method rows (not a bench_sparsity.py result of this version)")
        rows.extend(got)
    return rows


def _run_label(row: dict[str, Any]) -> str:
    return f"({','.join(map(str, row.get('shape') or ()))}) {'causal' if row['causal'] else 'non-causal'}"


def _point_label(row: dict[str, Any]) -> str:
    family = row["family"]
    if family.startswith("captured:"):
        family = Path(family[9:]).stem
    return f"{family}:{row['s']:g}"


def plot(rows: list[dict[str, Any]], path: str | Path, tile: int = 16, title: str = "") -> int:
    """Write the PNG; returns the number of points drawn (ValueError when there is none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    key = f"density_{tile}"
    mine = [r for r in rows if r["method"] in MARKERS and isinstance(r.get(key), (int, float)) and r[key] > 0
            and isinstance(r.get("ratio_sdpa"), (int, float)) and r["ratio_sdpa"] > 0]
    if not mine:
        raise ValueError(f"no row with a {tile}x{tile} density and a ratio to SDPA to plot")
    runs = sorted({_run_label(r) for r in mine})
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, pas in zip(axes, PASSES):
        sub = [r for r in mine if r["pass"] == pas]
        series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        for r in sub:
            series.setdefault((_run_label(r), r["method"], r["family"]), []).append((r[key], r["ratio_sdpa"]))
        for (run, method, _), pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[run], marker=MARKERS[method],
                    linestyle="-", linewidth=0.6, alpha=0.8, markersize=6,
                    markerfacecolor="none" if method == "ours-default" else colours[run])
        labelled: set[tuple[str, str, float]] = set()
        for r in sorted(sub, key=lambda r: list(MARKERS).index(r["method"])):  # label at ours-selected
            at = (_run_label(r), r["family"], r["s"])
            if at not in labelled:
                labelled.add(at)
                ax.annotate(_point_label(r), (r[key], r["ratio_sdpa"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=6, color=colours[at[0]])
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers at 1, 2, 5 x 10^k
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(pas)
        ax.set_xlabel(f"block density of our mask ({tile}x{tile} tiles)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time / SDPA's time (below 1: faster than SDPA)")
    handles = [Line2D([], [], color="gray", marker=m, linestyle="none", label=name,
                      markerfacecolor="none" if name == "ours-default" else "gray")
               for name, m in MARKERS.items() if any(r["method"] == name for r in mine)]
    handles += [Line2D([], [], color=colours[run], linewidth=2, label=run) for run in runs]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.8, label="parity with SDPA"))
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(mine)


def _title(paths: Sequence[str | Path]) -> str:
    metas = [json.loads(Path(p).read_text()).get("meta", {}) for p in paths]
    parts = sorted({f"{m.get('device_name', '?')} {m.get('dtype', '?')} alpha={m.get('alpha', '?')}" for m in metas})
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="bench_sparsity.py JSON results")
    p.add_argument("--out", default=None, help="PNG file (default: the first file's name with .png)")
    p.add_argument("--tile", type=int, choices=(16, 64), default=16, help="density at 16x16 or 64x64 mask tiles")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    try:
        rows = load_rows(args.files)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sparsity import table

    print(table(rows))
    out = Path(args.out) if args.out else Path(args.files[0]).with_suffix(".png")
    try:
        drawn = plot(rows, out, args.tile, _title(args.files))
    except ImportError as exc:
        log.error("matplotlib is not importable (%s): no plot", exc)
        return 2
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    log.info("wrote %s (%d points)", out, drawn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
