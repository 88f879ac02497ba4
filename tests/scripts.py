"""Import a script of benchmarks/ or examples/ (not a package module) by its path, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str, *, siblings: bool = False, register: bool = False) -> ModuleType:
    """The module of ``REPO / relpath``. ``siblings``: its directory is importable while it loads
    (a script that imports a helper next to it); ``register``: it is put in ``sys.modules`` under
    its name first (dataclasses look their module up while a class is built)."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[path.stem] = module
    if siblings:
        sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        if siblings:
            sys.path.remove(str(path.parent))
    return module
