"""Where caches live: the user cache (env var or platform cache dir) and the shipped caches.

The shipped directory is :data:`SHIPPED_DIR` when set (tests monkeypatch it), else
``$ADASPLASH_TUNE_SHIPPED_DIR`` when set, else ``adasplash_tune/cache/shipped/`` in the package.
Shipped caches are named after the GPU model: ``NVIDIA H200`` -> ``nvidia-h200.sqlite``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "ENV_CACHE", "ENV_SHIPPED", "SHIPPED_DIR", "default_cache_path", "user_cache_location",
    "shipped_dir", "shipped_name", "shipped_files", "is_url",
]

ENV_CACHE = "ADASPLASH_TUNE_CACHE"
ENV_SHIPPED = "ADASPLASH_TUNE_SHIPPED_DIR"

#: Overrides the shipped-cache directory when not None (monkeypatch point for tests).
SHIPPED_DIR: Path | None = None

_PACKAGE_SHIPPED = Path(__file__).resolve().parent / "shipped"


def default_cache_path() -> Path:
    """``<platform user cache dir>/adasplash-tune/configs.sqlite`` (not created here)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("adasplash-tune")) / "configs.sqlite"


def user_cache_location(override: str | None = None) -> str:
    """The user cache as a path or URL: ``override``, else ``$ADASPLASH_TUNE_CACHE``, else the
    default file."""
    if override:
        return override
    env = os.environ.get(ENV_CACHE)
    return env if env else str(default_cache_path())


def is_url(location: str) -> bool:
    """True for SQLAlchemy URLs (``dialect[+driver]://...``), False for plain paths."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def shipped_dir() -> Path:
    if SHIPPED_DIR is not None:
        return Path(SHIPPED_DIR)
    env = os.environ.get(ENV_SHIPPED)
    return Path(env) if env else _PACKAGE_SHIPPED


def shipped_name(device_name: str) -> str:
    """File name of the shipped cache for a GPU model: lower case, runs of other chars -> '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"{slug or 'device'}.sqlite"


def shipped_files() -> list[Path]:
    """The shipped cache files, sorted by name (an absent directory has none)."""
    folder = shipped_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.sqlite") if p.is_file())
