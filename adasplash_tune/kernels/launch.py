"""Kernel launches that skip Triton's per-call dispatch once a kernel is compiled.

``fn[grid](*args, **meta)`` binds the arguments, computes their specialisation, hashes a cache key,
checks globals and builds launch metadata on every call: tens of microseconds of host time, several
times per attention call. :func:`launch` does that once per *launch signature* (argument dtypes,
16-byte pointer alignment, integer values, constexprs and launch options, device) and afterwards
calls the compiled kernel's own launcher with the same positional arguments Triton would pass.

What makes the shortcut safe: every input of Triton's specialisation is in the signature key.
Tensors are keyed by dtype and whether their address is a multiple of 16 (the only pointer
property Triton specialises on); integers by their value (Triton specialises on ``== 1``, on
divisibility by 16 and on the 32/64-bit range); floats and ``None`` by their type; constexprs
and options (``num_warps``, ...) by value. Anything the shortcut cannot handle — the interpreter,
a launch hook set by a profiler, a Triton without the compiled-kernel launcher — takes Triton's
own path, so behaviour never depends on it. ``ADASPLASH_TUNE_DIRECT_LAUNCH=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch

__all__ = ["launch", "direct_launch_enabled", "clear_launch_cache"]

_ENTRIES: dict[tuple, tuple | None] = {}
_MAX_ENTRIES = 4096


def direct_launch_enabled() -> bool:
    """Whether compiled kernels are re-launched directly (off under the interpreter or when
    ``ADASPLASH_TUNE_DIRECT_LAUNCH=0``). Read per call: tests and benchmarks may toggle it."""
    return (os.environ.get("ADASPLASH_TUNE_DIRECT_LAUNCH", "1") != "0"
            and os.environ.get("TRITON_INTERPRET", "0") != "1")


def clear_launch_cache() -> None:
    """Forget every recorded launch (the next launch of each kernel goes through Triton again)."""
    _ENTRIES.clear()


def _arg_key(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() & 15 == 0)
    if isinstance(arg, bool) or isinstance(arg, int):
        return (type(arg), arg)
    if isinstance(arg, float):
        return float
    if arg is None:
        return None
    return (type(arg), arg)  # strings, dtypes: compile-time values, keyed by value


def _hooks_set() -> bool:
    """A launch hook (a profiler's) must see every launch: then Triton's own path runs."""
    runtime = _knobs_runtime()
    if runtime is None:  # a Triton without ``triton.knobs``: its hooks live on CompiledKernel
        from triton.compiler import CompiledKernel

        return (getattr(CompiledKernel, "launch_enter_hook", None) is not None
                or getattr(CompiledKernel, "launch_exit_hook", None) is not None)
    return runtime.launch_enter_hook is not None or runtime.launch_exit_hook is not None


@functools.lru_cache(maxsize=1)
def _knobs_runtime() -> Any:
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs.runtime


@functools.lru_cache(maxsize=1)
def _driver() -> Any:
    """Triton's active GPU driver (current device and stream exactly as its own launches read them)."""
    from triton.runtime import driver

    return driver.active


def _direct_entry(fn: Any, kernel: Any, n_args: int, meta: dict[str, Any]) -> tuple | None:
    """(run, function, packed metadata, trailing positional arguments) of a compiled kernel, or
    None when this Triton's compiled kernels cannot be launched that way."""
    if hasattr(kernel, "result"):  # an asynchronous compile's future
        kernel = kernel.result()
    try:
        run, function, packed = kernel.run, kernel.function, kernel.packed_metadata
        names, params = fn.arg_names, fn.params
    except AttributeError:
        return None
    if function is None or len(names) != len(params):
        return None
    tail = []
    for name, param in zip(names[n_args:], params[n_args:]):
        if name in meta:
            tail.append(meta[name])
        elif param.has_default:
            tail.append(param.default)
        else:
            return None
    return run, function, packed, tuple(tail)


def launch(fn: Any, grid: Sequence[int], *args: Any, **meta: Any) -> None:
    """``fn[grid](*args, **meta)`` for a ``@triton.jit`` function, through the compiled kernel's
    launcher once this launch signature has been compiled (see the module docstring).

    ``args`` are the kernel's leading parameters, positionally; ``meta`` the remaining ones by
    name (constexprs) and Triton's launch options (``num_warps``, ``num_stages``, ...)."""
    if not direct_launch_enabled():
        fn[tuple(grid)](*args, **meta)
        return
    drv = _driver()
    device = drv.get_current_device()
    key = (fn, device, tuple(map(_arg_key, args)), tuple(meta.items()))
    entry = _ENTRIES.get(key, False)
    if entry and not _hooks_set():
        run, function, packed, tail = entry
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        if g0 * g1 * g2 == 0:
            return
        run(g0, g1, g2, drv.get_current_stream(device), function, packed, None, None, None, *args, *tail)
        return
    kernel = fn[tuple(grid)](*args, **meta)
    if entry is False:
        if len(_ENTRIES) >= _MAX_ENTRIES:
            _ENTRIES.clear()
        _ENTRIES[key] = _direct_entry(fn, kernel, len(args), meta) if kernel is not None else None
