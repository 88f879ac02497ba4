"""``adasplash-tune bench``: time the selected config vs the default vs upstream vs dense PyTorch."""

from __future__ import annotations

import json
from typing import Any

import click

from . import CliError
from .problem_options import build_problems, problem_options, resolve_backend


def register(main: click.Group) -> None:
    main.add_command(bench)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


@click.command()
@problem_options
@click.option("--forward-only", is_flag=True, help="Time the forward pass only (default: also forward+backward).")
@click.option("--no-upstream", is_flag=True, help="Skip the upstream adasplash package even if installed.")
@click.option("--no-dense", is_flag=True, help="Skip torch SDPA / softmax.")
@click.option("--cache", default=None, help="Cache path or SQLAlchemy URL (overrides ADASPLASH_TUNE_CACHE).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON rows to this file.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG plot (time vs N per method; needs "
              'matplotlib: pip install "adasplash-tune[plot]").')
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False),
              help="Do not run: load rows written by --out (e.g. on a GPU machine) and print / plot them.")
def bench(kernel: str, backend: str, seq_len, head_dim, batch, heads, kv_heads, alpha, causal_mode, varlen,
          dtype, rows, cols, forward_only: bool, no_upstream: bool, no_dense: bool, cache: str | None,
          as_json: bool, out: str | None, plot: str | None, from_json: str | None) -> None:
    """Time tuned (selected) vs default configs, upstream adasplash and dense PyTorch attention."""
    import os

    if plot and not _has_matplotlib():  # before the benchmark runs, not after
        raise CliError(f"--plot needs matplotlib: {PLOT_INSTALL}")
    if plot and kernel == "entmax" and not from_json:
        raise click.UsageError("--plot draws attention timings (time vs N); --kernel entmax has none to plot")
    if from_json:
        rows_out = _load_rows(from_json)
    else:
        import torch

        from ..benchmark import bench_problems, default_problems

        if cache:
            os.environ["ADASPLASH_TUNE_CACHE"] = cache
        has_gpu = torch.cuda.is_available()
        backend = resolve_backend(backend, has_gpu)
        device = "cuda" if has_gpu else "cpu"
        explicit = any(v for v in (seq_len, head_dim, batch, heads, kv_heads, alpha, causal_mode, varlen, dtype,
                                   rows, cols))
        if explicit:
            defaults = {"seq_len": (1024,), "head_dim": (64,), "batch": 1, "heads": 4, "alpha": (1.5,),
                        "dtype": "bfloat16" if has_gpu else "float32", "rows": (1024,), "cols": (1024,)}
            problems = build_problems(kernel, has_gpu, defaults, {
                "seq_len": seq_len, "head_dim": head_dim, "batch": batch, "heads": heads, "kv_heads": kv_heads,
                "alpha": alpha, "causal_mode": causal_mode, "varlen": varlen, "dtype": dtype, "rows": rows,
                "cols": cols})
        else:
            problems = default_problems(kernel, device)
        results = bench_problems(problems, backend=backend, device=device, backward=not forward_only,
                                 with_upstream=not no_upstream, with_dense=not no_dense)
        rows_out = [r.as_dict() for r in results]
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows_out, "speedup_selected_vs_default": _speedups(rows_out)}, fh, indent=2, default=str)
    if as_json:
        click.echo(json.dumps(rows_out, indent=2, default=str))
    else:
        _print_table(rows_out)
        for passes, value in _speedups(rows_out).items():
            click.echo(f"selected vs default, geometric mean ({passes}): {value:.2f}x")
    if plot:  # after the results are printed: a plot that fails loses nothing
        _plot(rows_out, plot)


def _load_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``bench --out`` file (a list of rows, or ``{"rows": [...]}``), or a one-line error."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CliError(f"{path}: not a bench --out file ({exc})") from None
    from ..benchmark import BenchRow

    rows = data.get("rows") if isinstance(data, dict) else data
    try:
        if not isinstance(rows, list) or not all(isinstance(BenchRow(**r).problem, dict) for r in rows):
            raise TypeError("expected a list of rows")
    except TypeError as exc:  # a row that is no mapping, lacks a field or has an unknown one
        raise CliError(f"{path}: not a bench --out file ({exc})") from None
    return rows


#: How to get matplotlib for ``--plot``.
PLOT_INSTALL = 'pip install "adasplash-tune[plot]"'


def _has_matplotlib() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken install or a module entry without a spec
        return False


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    from ..benchmark import plot_rows

    try:
        plot_rows(rows, path)
    except ImportError as exc:
        raise CliError(f"--plot: cannot import matplotlib ({exc}); {PLOT_INSTALL}") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"--plot {path}: {exc}") from None


def _speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    from ..benchmark import BenchRow, speedups

    return speedups([BenchRow(**r) for r in rows])


def _print_table(rows: list[dict[str, Any]]) -> None:
    from .cache_cmds import format_table

    labels = list(dict.fromkeys(r["label"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    for label in labels:
        for passes in ("fwd", "fwd+bwd"):
            cells = {r["method"]: r for r in rows if r["label"] == label and r["passes"] == passes}
            if not cells:
                continue
            sel = cells.get("selected", {})
            table.append([label, passes] + [_fmt(cells[m]["time_ms"]) if m in cells else "-" for m in methods]
                         + [sel.get("source", "-")])
    click.echo(format_table(["problem", "pass"] + [f"{m} ms" for m in methods] + ["selected from"], table))
