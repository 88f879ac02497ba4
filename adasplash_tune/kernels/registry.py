"""Name -> kernel declaration lookup. Declarations load lazily (importing them is cheap)."""

from __future__ import annotations

import importlib
from functools import lru_cache

from .spec import Config, KernelSpec

__all__ = ["KERNELS", "BACKENDS", "get_spec", "all_specs", "config_from_json"]

KERNELS: tuple[str, ...] = ("adasplash", "entmax")
BACKENDS: tuple[str, ...] = ("triton", "torch")

_MODULES = {
    "adasplash": "adasplash_tune.kernels.declarations.attention",
    "entmax": "adasplash_tune.kernels.declarations.entmax",
}


@lru_cache(maxsize=None)
def get_spec(kernel: str, backend: str) -> KernelSpec:
    """The declaration of ``kernel`` on ``backend``; ValueError for unknown names."""
    if kernel not in _MODULES:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {list(KERNELS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    module = importlib.import_module(_MODULES[kernel])
    return module.SPECS[backend]


def all_specs() -> list[KernelSpec]:
    return [get_spec(k, b) for k in KERNELS for b in BACKENDS]


def config_from_json(text: str) -> Config:
    """The validated :class:`Config` of a JSON text written by ``Config.to_json`` (ConfigError
    naming the bad field, or ValueError for an unknown kernel or backend)."""
    return Config.from_json(text, get_spec)
