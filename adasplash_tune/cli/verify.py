"""``adasplash-tune verify``: re-check cached entries for this device against the fp64 oracle."""

from __future__ import annotations

import json
from typing import Any

import click

from . import CliError


def register(main: click.Group) -> None:
    main.add_command(verify)


@click.command()
@click.option("--cache", "cache", default=None, help="Cache path or SQLAlchemy URL (default: the user cache).")
@click.option("--kernel", type=click.Choice(["adasplash", "entmax"]), default=None, help="Only this kernel.")
@click.option("--device", "device", default=None, help="Device to check on (default: cuda if present, else cpu).")
@click.option("--retime", is_flag=True, help="Also time each entry again and show it beside the stored time.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def verify(cache: str | None, kernel: str | None, device: str | None, retime: bool, as_json: bool) -> None:
    """Re-run the accuracy check of every cached entry that matches this device.

    Entries that fail are marked so the loader skips them; entries tuned for an older version of a
    kernel's code (stale) are reported and left alone. Exit status 1 if any entry failed.
    """
    import torch

    from ..cache.store import StoreError, open_store
    from ..device import fingerprint
    from ..kernels.reference import tolerance
    from ..kernels.registry import get_spec
    from ..tuner.evaluate import Evaluator, TrialRequest
    from ..tuner.inputs import inputs_label
    from ..tuner.problems import problem_for_entry
    from ..tuner.timing import TimingOptions

    dev = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    device_id = fingerprint(torch.device(dev)).device_id
    try:
        store = open_store(cache)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    rows: list[dict[str, Any]] = []
    failed = 0
    timing = TimingOptions(warmup_ms=10.0, rep_ms=50.0) if retime else TimingOptions(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)
    with store, Evaluator(dev) as evaluator:
        entries = store.entries(kernel=kernel, device_id=device_id)
        if not entries:
            click.echo(f"no cached entries for this device ({device_id}) in {store.location}", err=True)
        for entry in entries:
            spec = get_spec(entry.kernel, entry.backend)
            row: dict[str, Any] = {"kernel": entry.kernel, "backend": entry.backend, "key": entry.key,
                                   "config": entry.config, "stored_ms": entry.time_ms}
            if entry.kernel_hash != spec.source_hash():
                row.update(status="stale", detail="tuned for other kernel code; the loader ignores it")
                rows.append(row)
                continue
            problem = problem_for_entry(entry)
            row["inputs"] = inputs_label(getattr(problem, "inputs", "randn"))
            backward = entry.kernel == "adasplash" or bool(entry.provenance.get("backward"))
            result = evaluator.evaluate(TrialRequest(problem, entry.backend, entry.config, backward=backward,
                                                     seed=12345, timing=timing))
            dtype = getattr(torch, problem.dtype)
            row.update(status=result.status, error=result.error, grad_error=result.grad_error,
                       tolerance=tolerance(dtype), detail=result.detail)
            if retime and result.ok:
                row["time_ms"] = result.time_ms
            if not result.ok:
                failed += 1
                store.mark_failed(entry)
            rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        _print_table(rows, retime)
        click.echo(f"{len(rows)} checked, {failed} failed and marked, "
                   f"{sum(r['status'] == 'stale' for r in rows)} stale")
    if failed:
        raise CliError(f"{failed} cached entr{'y' if failed == 1 else 'ies'} failed verification")


def _print_table(rows: list[dict[str, Any]], retime: bool) -> None:
    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    header = ["kernel", "backend", "key", "status", "error", "grad_error"] + (["stored_ms", "time_ms"] if retime else [])
    table = [[fmt(r.get(h)) if h != "key" else json.dumps(r["key"], sort_keys=True) for h in header] for r in rows]
    widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(header)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for t in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(t, widths)))
