"""``info``: devices, backends, toolchain versions, cache locations and entry counts."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import click

__all__ = ["register", "collect"]


def _cache_summary(location: str, *, shipped: bool) -> dict[str, Any]:
    from ..cache.locations import display_location, hide_password, is_url
    from ..cache.store import open_store

    info: dict[str, Any] = {"location": display_location(location)}  # never a password
    if not is_url(location):
        info["exists"] = os.path.exists(os.path.expanduser(location))
        if not info["exists"]:
            info["entries"] = 0
            return info
    try:
        store = open_store(location, readonly=True, immutable=shipped)
    except Exception as exc:  # noqa: BLE001 - info reports problems, it does not fail on them
        info["error"] = hide_password(str(exc), location)
        return info
    try:
        info["entries"] = store.count()
        info["by_kernel"] = {k: store.count(k) for k in ("adasplash", "entmax")}
        info["devices"] = [d["device_id"] for d in store.devices()]
    except Exception as exc:  # noqa: BLE001
        info["error"] = hide_password(str(exc), location)
    finally:
        store.close()
    return info


def collect(cache: str | None = None) -> dict[str, Any]:
    """Everything ``info`` reports, as JSON-ready data."""
    import torch

    from .. import __version__
    from ..cache import locations
    from ..cache.loader import ENV_MODE, ENV_RECORD
    from ..device import fingerprint, triton_version

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            fp = fingerprint(index).as_dict()
            devices.append({"device": f"cuda:{index}", "default_backend": "triton", **fp})
    devices.append({"device": "cpu", "default_backend": "torch", **fingerprint("cpu").as_dict()})
    shipped_dir = locations.shipped_dir()
    return {
        "versions": {
            "adasplash_tune": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version(),
            "cuda": torch.version.cuda or "",
            "hip": getattr(torch.version, "hip", None) or "",
        },
        "devices": devices,
        "mode": os.environ.get(ENV_MODE, "cache"),
        "record": os.environ.get(ENV_RECORD, ""),
        "user_cache": _cache_summary(locations.user_cache_location(cache), shipped=False),
        "shipped_dir": str(shipped_dir),
        "shipped": [_cache_summary(str(p), shipped=True) for p in locations.shipped_files()],
    }


def _cache_line(info: dict[str, Any]) -> str:
    if "error" in info:
        return f"{info['location']}  (unreadable: {info['error']})"
    if info.get("exists") is False:
        return f"{info['location']}  (not created yet)"
    kinds = ", ".join(f"{k} {n}" for k, n in info.get("by_kernel", {}).items())
    return f"{info['location']}  ({info['entries']} entries: {kinds})"


@click.command("info")
@click.option("--cache", default=None, help="Cache path or SQLAlchemy URL (overrides ADASPLASH_TUNE_CACHE).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(cache: str | None, as_json: bool) -> None:
    """Show devices, backends, versions, cache locations and entry counts."""
    data = collect(cache)
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True))
        return
    versions = data["versions"]
    lines = [f"adasplash-tune {versions['adasplash_tune']}  python {versions['python']}  "
             f"torch {versions['torch']}  triton {versions['triton']}  "
             f"cuda {versions['cuda'] or '-'}" + (f"  hip {versions['hip']}" if versions["hip"] else "")]
    lines.append("devices:")
    for dev in data["devices"]:
        extra = f", {dev['sm_count']} SMs, {dev['shared_mem'] // 1024} KiB smem" if dev["sm_count"] else ""
        lines.append(f"  {dev['device']:<8} {dev['name']} ({dev['arch']}{extra}); "
                     f"backend {dev['default_backend']}; id {dev['device_id']}")
    lines.append(f"mode: {data['mode']}" + (f"   record: {data['record']}" if data["record"] else ""))
    lines.append(f"user cache: {_cache_line(data['user_cache'])}")
    lines.append(f"shipped caches in {data['shipped_dir']}:" + ("" if data["shipped"] else " none"))
    for shipped in data["shipped"]:
        lines.append(f"  {_cache_line(shipped)}")
    click.echo("\n".join(lines))


def register(main: click.Group) -> None:
    main.add_command(info)
