"""Integrations with other libraries. Each submodule imports its library only when used.

* :mod:`adasplash_tune.integrations.transformers` -- ``attn_implementation="adasplash"`` for
  Hugging Face transformers models (``register_transformers()``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["register_transformers"]


def register_transformers(name: str = "adasplash", **options: Any) -> str:
    """Register AdaSplash as transformers attention implementation ``name`` (see
    :func:`adasplash_tune.integrations.transformers.register`); returns ``name``."""
    from .transformers import register

    return register(name, **options)
