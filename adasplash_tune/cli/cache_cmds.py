"""``show``, ``export`` and ``import``: look into a config cache and move entries between caches."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import click

from . import CliError

__all__ = ["register", "open_for_reading", "format_table"]

CACHE_HELP = "Cache path or SQLAlchemy URL (overrides ADASPLASH_TUNE_CACHE)."


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain text table with left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def open_for_reading(cache: str | None) -> Any | None:
    """Open the cache to read it; None when the default cache does not exist yet.

    A named cache (``--cache`` or ADASPLASH_TUNE_CACHE) that does not exist is an error. An
    older-schema cache is upgraded in place first.
    """
    from ..cache.locations import ENV_CACHE, is_url, user_cache_location
    from ..cache.store import SchemaOutdatedError, StoreError, open_store

    location = user_cache_location(cache)
    if not is_url(location) and not os.path.exists(os.path.expanduser(location)):
        if cache or os.environ.get(ENV_CACHE):
            raise CliError(f"{location}: no cache file there")
        return None
    try:
        try:
            return open_store(location, readonly=True)
        except SchemaOutdatedError:
            open_store(location).close()  # upgrade once, then read
            return open_store(location, readonly=True)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _current_hashes() -> dict[tuple[str, str], str]:
    from ..kernels.registry import all_specs

    return {(s.kernel, s.backend): s.source_hash() for s in all_specs()}


def _short(mapping: Any, skip: tuple[str, ...] = ()) -> str:
    if not isinstance(mapping, dict):  # an invalid row's unparsable field
        return ascii(mapping)[:60]
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                    for k, v in sorted(mapping.items(), key=lambda item: str(item[0])) if k not in skip)


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):  # an invalid row's non-numeric field
        return ascii(value)[:20]


def _match_devices(store: Any, device: str) -> list[str]:
    """Device ids equal to ``device``, else containing it (case-insensitive)."""
    ids = [d["device_id"] for d in store.devices()]
    if device in ids:
        return [device]
    matches = [i for i in ids if device.lower() in i.lower()]
    if not matches:
        raise CliError(f"no device matching {device!r} in {store.location}; known: {ids}")
    return matches


def entry_rows(store: Any, kernel: str | None, device: str | None) -> list[dict[str, Any]]:
    """Entries as JSON-ready dicts (what ``show --json`` prints), each validated as it is read:
    ``status`` is ``ok``, ``stale`` (its kernel code changed since tuning), ``failed`` (marked by
    ``verify``) or ``invalid: <reason>`` (a row the current declarations or the schema's limits
    refuse, e.g. edited in the database; the loader ignores it too)."""
    from ..cache.validation import storable_row

    hashes = _current_hashes()
    device_ids = _match_devices(store, device) if device else [None]
    rows = []
    for device_id in device_ids:
        for raw in store.raw_rows(kernel, device_id):
            try:
                data = storable_row(raw).to_dict()
                invalid = None
            except (ValueError, TypeError, OverflowError) as exc:
                data, invalid = _as_shown(raw), str(exc)
            data["device"] = raw["device"]["device_id"]
            data["arch"] = raw["device"].get("arch", "")
            data["stale"] = hashes.get((raw["kernel"], raw["backend"])) != raw["kernel_hash"]
            data["invalid"] = invalid
            data["status"] = (f"invalid: {invalid}" if invalid else "failed" if data["failed_verify"]
                              else "stale" if data["stale"] else "ok")
            rows.append(data)
    return rows


def _as_shown(raw: dict[str, Any]) -> dict[str, Any]:
    """A row that failed validation, printable: JSON fields parsed where they parse."""
    data = dict(raw)
    for name in ("key", "config", "provenance"):
        try:
            data[name] = json.loads(raw[name])
        except (TypeError, ValueError, RecursionError):
            pass
    for name in ("created_at", "updated_at"):
        if raw.get(name) is not None:
            data[name] = str(raw[name])
    return data


def _kernel_option() -> Any:
    from ..kernels.registry import KERNELS

    return click.option("--kernel", type=click.Choice(KERNELS), default=None,
                        help="Only this kernel.")


@click.command("show")
@click.option("--cache", default=None, help=CACHE_HELP)
@_kernel_option()
@click.option("--device", default=None, help="Only this device (id, or part of it).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of entries.")
def show(cache: str | None, kernel: str | None, device: str | None, as_json: bool) -> None:
    """List cache entries, each checked: stale ones (kernel code changed since tuning), failed
    ones (marked by verify) and invalid ones (refused by the current declarations) are flagged."""
    from ..cache.store import StoreError

    store = open_for_reading(cache)
    rows: list[dict[str, Any]] = []
    if store is not None:
        try:
            rows = entry_rows(store, kernel, device)
        except StoreError as exc:  # e.g. a damaged file: one line naming it
            raise CliError(str(exc)) from None
        finally:
            store.close()
    if as_json:
        click.echo(json.dumps(rows, indent=1, sort_keys=True))
        return
    if not rows:
        click.echo("no entries")
        return
    table = [[
        r["kernel"], r["backend"], r["device"], _short(r["key"], ("backend",)), _short(r["config"]),
        _fmt(r["time_ms"], ".4f"), _fmt(r["error"], ".1e"), r["status"],
    ] for r in rows]
    click.echo(format_table(
        ["KERNEL", "BACKEND", "DEVICE", "KEY", "CONFIG", "TIME_MS", "ERROR", "STATUS"], table))
    stale = sum(r["stale"] and not r["invalid"] for r in rows)
    invalid = sum(bool(r["invalid"]) for r in rows)
    ignored = [f"{stale} stale"] * bool(stale) + [f"{invalid} invalid"] * bool(invalid)
    click.echo(f"{len(rows)} entries" + (f", {', '.join(ignored)} (ignored at call time)" if ignored else ""))


@click.command("export")
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.option("--cache", default=None, help=CACHE_HELP)
@_kernel_option()
@click.option("--device", default=None, help="Only this device (id, or part of it).")
def export(file: str, cache: str | None, kernel: str | None, device: str | None) -> None:
    """Write cache entries to FILE (.json, .jsonl, .sqlite or .db)."""
    from ..cache.store import StoreError
    from ..cache.transfer import write_entries

    if not file.lower().endswith((".json", ".jsonl", ".sqlite", ".sqlite3", ".db")):
        raise click.BadParameter("FILE must end in .json, .jsonl, .sqlite or .db", param_hint="FILE")
    store = open_for_reading(cache)
    entries = []
    if store is not None:
        try:
            for device_id in (_match_devices(store, device) if device else [None]):
                entries.extend(store.entries(kernel, device_id))
        except StoreError as exc:
            raise CliError(str(exc)) from None
        finally:
            store.close()
    from pathlib import Path

    try:
        write_entries(Path(file), entries)
    except (StoreError, OSError) as exc:
        raise CliError(f"{file}: cannot write ({exc})") from None
    click.echo(f"exported {len(entries)} entries to {file}")


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--cache", default=None, help=CACHE_HELP)
@click.option("--policy", type=click.Choice(["faster", "newer", "keep"]), default="faster",
              show_default=True, help="Which entry wins when both caches have the key.")
def import_(file: str, cache: str | None, policy: str) -> None:
    """Merge the entries of FILE into the cache; every entry is validated first."""
    from ..cache.store import StoreError, open_store

    try:
        store = open_store(cache)
        try:
            report = store.import_file(file, policy=policy)
        finally:
            store.close()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    click.echo(f"added {report.added}, replaced {report.replaced}, kept {report.kept}, "
               f"rejected {report.rejected}")
    for reason in report.reasons:
        click.echo(f"rejected: {reason}", err=True)
    if report.rejected:
        total = report.added + report.replaced + report.kept + report.rejected
        raise CliError(f"{report.rejected} of {total} entries in {file} were rejected")


def register(main: click.Group) -> None:
    main.add_command(show)
    main.add_command(export)
    main.add_command(import_)
