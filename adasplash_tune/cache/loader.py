"""Call-time config selection (placeholder until the cache lands: declared defaults only)."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.spec import Config, KernelSpec


def resolve(spec: KernelSpec, key: dict[str, Any], device: torch.device) -> tuple[Config, str]:
    """The config for ``key`` on ``device`` and where it came from."""
    return spec.default(), "default"
