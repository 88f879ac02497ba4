"""Device fingerprints: what a tuned config is only valid for (GPU model, arch, toolchain)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch

__all__ = ["DeviceFingerprint", "fingerprint", "triton_version"]


_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu")


def triton_version() -> str:
    """Triton's version ("none" without it), read from its package metadata unless triton is
    already imported: importing it costs about 0.5 s, which a torch-backend call never needs."""
    module = sys.modules.get("triton")
    if module is None:
        for name in _TRITON_DISTRIBUTIONS:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
    try:
        import triton

        return triton.__version__
    except Exception:  # triton missing or broken: the torch backend still works
        return "none"


@dataclass(frozen=True)
class DeviceFingerprint:
    """Facts about one device that change which launch config is best (or even valid)."""

    backend: str  # "cuda", "rocm" or "cpu"
    vendor: str
    name: str
    arch: str  # "sm_90", "gfx942", or the CPU machine type
    sm_count: int
    shared_mem: int  # bytes of shared memory a block may use (opt-in maximum); 0 on CPU
    torch_version: str
    triton_version: str
    runtime_version: str  # CUDA or HIP version; "" on CPU

    @property
    def device_id(self) -> str:
        """The part of the cache key that names the device and the codegen toolchain."""
        triton_mm = ".".join(self.triton_version.split(".")[:2])
        return f"{self.name}|{self.arch}|triton-{triton_mm}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"device_id": self.device_id}


def _cpu_fingerprint() -> DeviceFingerprint:
    name = platform.processor() or platform.machine() or "cpu"
    return DeviceFingerprint(
        backend="cpu", vendor="cpu", name=f"CPU {name}", arch=platform.machine(), sm_count=0,
        shared_mem=0, torch_version=torch.__version__, triton_version=triton_version(),
        runtime_version="",
    )


@lru_cache(maxsize=None)
def _gpu_fingerprint(index: int) -> DeviceFingerprint:
    props = torch.cuda.get_device_properties(index)
    is_rocm = torch.version.hip is not None
    if is_rocm:
        arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
        vendor, backend, runtime = "AMD", "rocm", str(torch.version.hip)
    else:
        arch = f"sm_{props.major}{props.minor}"
        vendor, backend, runtime = "NVIDIA", "cuda", str(torch.version.cuda)
    smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    return DeviceFingerprint(
        backend=backend, vendor=vendor, name=props.name, arch=arch,
        sm_count=int(props.multi_processor_count), shared_mem=smem,
        torch_version=torch.__version__, triton_version=triton_version(), runtime_version=runtime,
    )


_CPU: list[DeviceFingerprint] = []


def fingerprint(device: torch.device | str | int | None = None) -> DeviceFingerprint:
    """Fingerprint of ``device`` (default: the current CUDA device if any, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _gpu_fingerprint(index)
    if not _CPU:
        _CPU.append(_cpu_fingerprint())
    return _CPU[0]
