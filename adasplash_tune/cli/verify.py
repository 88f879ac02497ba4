"""``adasplash-tune verify``: re-check cached entries for this device against the fp64 oracle."""

from __future__ import annotations

import json
from typing import Any

import click

from . import CliError


def register(main: click.Group) -> None:
    main.add_command(verify)


def _device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--device``: a torch device string this machine has (a usage error otherwise)."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or count == 0:
            raise click.BadParameter(f"{value!r}: this machine has {count} CUDA/ROCm GPU(s)")
    return value


@click.command()
@click.option("--cache", "cache", default=None, help="Cache path or SQLAlchemy URL (default: the user cache).")
@click.option("--kernel", type=click.Choice(["adasplash", "entmax"]), default=None, help="Only this kernel.")
@click.option("--device", "device", default=None, callback=_device,
              help="Device to check on (default: cuda if present, else cpu).")
@click.option("--shipped/--no-shipped", default=True, show_default=True,
              help="Also check the shipped caches' entries for this device (not with --cache).")
@click.option("--retime", is_flag=True, help="Also time each entry again and show it beside the stored time.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def verify(cache: str | None, kernel: str | None, device: str | None, shipped: bool, retime: bool,
           as_json: bool) -> None:
    """Re-run the accuracy check of every cached entry that matches this device.

    The user cache's entries that fail are marked so the loader skips them; the shipped caches are
    read-only: a failing shipped entry is reported (re-tune its key: a user entry takes precedence).
    Entries tuned for an older version of a kernel's code (stale) are reported and left alone.
    Exit status 1 if any entry failed.
    """
    import os

    import torch

    from ..cache.locations import is_url, shipped_files, user_cache_location
    from ..cache.store import StoreError, open_store
    from ..device import fingerprint
    from ..tuner.evaluate import Evaluator
    from ..tuner.timing import TimingOptions

    dev = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    device_id = fingerprint(torch.device(dev)).device_id
    sources: list[tuple[str, Any, bool]] = []
    location = user_cache_location(cache)
    missing = not is_url(location) and not os.path.exists(os.path.expanduser(location))
    if missing:  # nothing of the user's to check, and checking creates no cache file
        click.echo(f"no cache file at {location}: no user entries to check", err=True)
    try:
        if not missing:
            sources.append(("user", *_open_user(cache)))
        if shipped and cache is None:
            sources += [("shipped", open_store(str(path), readonly=True), False) for path in shipped_files()]
    except StoreError as exc:
        for _, store, _ in sources:
            store.close()
        raise CliError(str(exc)) from None
    rows: list[dict[str, Any]] = []
    timing = TimingOptions(warmup_ms=10.0, rep_ms=50.0) if retime else TimingOptions(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)
    with Evaluator(dev) as evaluator:
        for source, store, mark in sources:
            with store:
                entries = store.entries(kernel=kernel, device_id=device_id)
                if source == "user" and not entries:
                    click.echo(f"no cached entries for this device ({device_id}) in {store.location}", err=True)
                rows += [_check(entry, source, store if mark else None, evaluator, timing, retime)
                         for entry in entries]
    failed = [r for r in rows if r["status"] not in ("ok", "stale")]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        _print_table(rows, retime)
        marked = sum(bool(r.get("marked")) for r in failed)
        click.echo(f"{len(rows)} checked, {len(failed)} failed ({marked} marked), "
                   f"{sum(r['status'] == 'stale' for r in rows)} stale")
    if failed:
        n = len(failed)
        raise CliError(f"{n} cached entr{'y' if n == 1 else 'ies'} failed verification")


def _check(entry: Any, source: str, store: Any, evaluator: Any, timing: Any, retime: bool) -> dict[str, Any]:
    """One entry's row; a failing entry is marked in ``store`` (None: read-only, not marked)."""
    import torch

    from ..kernels.reference import tolerance
    from ..kernels.registry import get_spec
    from ..tuner.evaluate import TrialRequest
    from ..tuner.inputs import inputs_label
    from ..tuner.problems import problem_for_entry

    spec = get_spec(entry.kernel, entry.backend)
    row: dict[str, Any] = {"source": source, "kernel": entry.kernel, "backend": entry.backend, "key": entry.key,
                           "config": entry.config, "stored_ms": entry.time_ms}
    if entry.kernel_hash != spec.source_hash():
        row.update(status="stale", detail="tuned for other kernel code; the loader ignores it")
        return row
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
    if not result.ok and store is not None:
        store.mark_failed(entry)
        row["marked"] = True
    return row


def _open_user(cache: str | None) -> tuple[Any, bool]:
    """(the user cache, whether failures can be marked in it): a cache this process cannot write
    (a read-only file, folder or mount) is still checked, read-only, its failures reported only."""
    from ..cache.store import StoreError, open_store

    try:
        return open_store(cache), True
    except StoreError as exc:
        try:
            store = open_store(cache, readonly=True)
        except StoreError:
            raise exc from None
        click.echo(f"note: {exc}; checking it read-only: failures are reported, not marked", err=True)
        return store, False


def _print_table(rows: list[dict[str, Any]], retime: bool) -> None:
    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    header = ["source", "kernel", "backend", "key", "status", "error", "grad_error"] + (["stored_ms", "time_ms"] if retime else [])
    table = [[fmt(r.get(h)) if h != "key" else json.dumps(r["key"], sort_keys=True) for h in header] for r in rows]
    widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(header)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for t in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(t, widths)))
