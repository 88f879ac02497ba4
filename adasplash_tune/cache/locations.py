"""Where caches live: the user cache (env var or platform cache dir) and the shipped caches.

The shipped directory is :data:`SHIPPED_DIR` when set (tests monkeypatch it), else
``$ADASPLASH_TUNE_SHIPPED_DIR`` when set, else ``adasplash_tune/cache/shipped/`` in the package.
Shipped caches are named after the GPU model: ``NVIDIA H200`` -> ``nvidia-h200.sqlite``.
Whatever prints a location prints :func:`display_location` of it (a URL's password masked).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

__all__ = [
    "ENV_CACHE", "ENV_SHIPPED", "SHIPPED_DIR", "default_cache_path", "user_cache_location",
    "shipped_dir", "shipped_name", "shipped_files", "is_url", "sqlite_file",
    "display_location", "hide_password",
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


def sqlite_file(location: str) -> Path | None:
    """The SQLite file a location names (a plain path, or a ``sqlite:///PATH`` URL without
    options); None for anything else (server URLs, in-memory SQLite, URLs with options)."""
    if not is_url(location):
        return Path(location).expanduser()
    prefix = "sqlite:///"
    database = location[len(prefix):]
    if not location.startswith(prefix) or not database or "?" in database or database == ":memory:":
        return None
    return Path(unquote(database)).expanduser()  # as SQLAlchemy reads it


_USERINFO = re.compile(r"^([^/]*://)([^:@/]*):(.*)@")


def display_location(location: str) -> str:
    """``location`` safe to print: a URL's password becomes ``***`` (paths are unchanged).

    SQLAlchemy renders the URLs it parses (``URL.render_as_string(hide_password=True)``); what
    it cannot parse, and any ``@`` it would take for part of the host, is masked up to the last
    ``@`` (over-masking beats leaking a password)."""
    if "://" not in location:
        return location
    if is_url(location):
        try:
            from sqlalchemy.engine import make_url

            url = make_url(location)
            if url.password is not None:
                location = url.render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - not parsable: the pattern below still masks it
            pass
    return _USERINFO.sub(r"\1\2:***@", location, count=1)


def hide_password(text: str, location: str) -> str:
    """``text`` (an error message about ``location``) with the raw location and its password
    replaced by their masked forms."""
    if "://" not in location:
        return text
    text = text.replace(location, display_location(location))
    match = _USERINFO.match(location)
    if match and match.group(3):  # the password where it stands as a word of its own
        pattern = rf"(?<![A-Za-z0-9]){re.escape(match.group(3))}(?![A-Za-z0-9])"
        text = re.sub(pattern, "***", text)
    return text


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
