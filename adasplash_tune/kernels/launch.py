"""Kernel launches planned once per (problem, config): Triton's per-call dispatch skipped when warm.

``fn[grid](*args, **meta)`` binds the arguments, computes their specialisation, hashes a cache key,
checks globals and builds launch metadata on every call: tens of microseconds of host time, several
times per attention call. A :class:`Launch` is built once per problem and config by the stage that
owns the kernel (memoised there): the grid, every scalar argument and every constexpr and launch
option. Calling it with the call's tensors launches the kernel; after the first call on a device,
through the compiled kernel's own launcher with the positional arguments Triton would pass.

Why that is safe: Triton specialises a kernel on its constexprs and options (fixed in the plan), on
integer arguments (fixed in the plan), on argument types (the plan's problem fixes every dtype) and
on whether each pointer is a multiple of 16: the compiled kernel is recorded per device and per
pattern of 16-byte-aligned tensors. Everything the shortcut cannot handle takes Triton's own path:
the interpreter, a launch hook set by a profiler, a Triton whose compiled kernels lack the
launcher. ``ADASPLASH_TUNE_DIRECT_LAUNCH=0`` turns the shortcut off.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

from .first_launch import active_driver, launchers_built_aside

__all__ = ["Launch", "direct_launch_enabled", "env_value", "compile_only", "parallel_compile"]

_COMPILE_ONLY = [False]
_ASYNC = [False]  # inside parallel_compile: warmups return futures, loaded when first launched
_INT_POINTERS = [True]  # whether compiled launchers take raw addresses (Triton's do: ints skip data_ptr())


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Inside: every :class:`Launch` compiles its kernel (Triton's ``warmup``: into the on-disk
    cache, exactly as a real launch with these arguments would) and runs nothing, so outputs stay
    unwritten. For the tuner's compile workers: they fill the cache while the device times other
    configs, and queue no kernel beside the timing."""
    previous = _COMPILE_ONLY[0]
    _COMPILE_ONLY[0] = True
    try:
        yield
    finally:
        _COMPILE_ONLY[0] = previous


@contextlib.contextmanager
def parallel_compile(workers: int) -> Iterator[bool]:
    """Inside: every :class:`Launch` only compiles (as under :func:`compile_only`), and the
    compiles run concurrently in ``workers`` threads (Triton's ``AsyncCompileMode``: much of a
    compile -- the LLVM and ptxas steps -- runs without the GIL); leaving waits for all of them,
    and a compile error is raised there. Yields False, compiling nothing, where this Triton has
    no asynchronous compile (the launches then compile one by one when they run)."""
    mode = _async_compile_mode()
    if mode is None:
        yield False
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="adasplash-compile") as pool:
        with compile_only(), mode(pool):
            _ASYNC[0] = True
            try:
                yield True
            finally:
                _ASYNC[0] = False


@functools.lru_cache(maxsize=1)
def _async_compile_mode() -> Any:
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode


def direct_launch_enabled() -> bool:
    """Whether compiled kernels are re-launched directly (off under the interpreter or when
    ``ADASPLASH_TUNE_DIRECT_LAUNCH=0``). Read per call: tests and benchmarks may toggle it."""
    return env_value("ADASPLASH_TUNE_DIRECT_LAUNCH", "1") != "0" and env_value("TRITON_INTERPRET", "0") != "1"


def _environ_reader() -> Any:
    """``env_value(name, default)``: a variable of the live environment. On POSIX it reads
    ``os.environ``'s own bytes dict (what ``os.environ[...] = ...`` and monkeypatching update):
    a tenth of ``os.environ.get``'s cost, which encodes, looks up and decodes (~0.7 µs a read,
    twice per launch). Elsewhere it is ``os.environ.get``."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get
    keys: dict[str, bytes] = {}

    def getenv(name: str, default: str) -> str:
        key = keys.get(name)
        if key is None:
            key = keys[name] = os.fsencode(name)
        value = data.get(key)
        return default if value is None else os.fsdecode(value)

    return getenv


env_value = _environ_reader()


class Launch:
    """One kernel launch of a planned problem: ``Launch(fn, grid, scalars, meta)(*tensors)`` runs
    ``fn[grid](*tensors, *scalars, **meta)``.

    ``tensors`` are the kernel's leading (pointer) parameters, ``scalars`` the following ones up to
    the first parameter passed by name; ``meta`` holds the remaining parameters by name and Triton's
    launch options (``num_warps``, ``num_stages``). Every value but the tensors is fixed per plan."""

    __slots__ = ("fn", "grid", "scalars", "meta", "_direct")

    def __init__(self, fn: Any, grid: tuple[int, ...], scalars: tuple, meta: dict[str, Any]) -> None:
        self.fn, self.grid, self.scalars, self.meta = fn, tuple(grid), tuple(scalars), dict(meta)
        self._direct: dict[int, tuple | None] = {}  # (alignment, device) -> (run, function, packed, tail)

    def __call__(self, *tensors: Any) -> None:
        if _COMPILE_ONLY[0] and env_value("TRITON_INTERPRET", "0") != "1":
            if _ASYNC[0]:  # a future, loaded when first launched
                self.fn.warmup(*tensors, *self.scalars, grid=self.grid, **self.meta)
                return
            with launchers_built_aside(getattr(_driver(), "launcher_cls", None)):
                kernel = self.fn.warmup(*tensors, *self.scalars, grid=self.grid, **self.meta)
            load = getattr(kernel, "_init_handles", None)
            if load is not None:  # loading is where a kernel that needs too much shared memory fails
                load()
            return
        if not direct_launch_enabled():
            self.fn[self.grid](*tensors, *self.scalars, **self.meta)
            return
        drv, device, key, entry = self._recorded([t.data_ptr() for t in tensors])
        if entry and not _hooks_set():
            self._relaunch(entry, drv, device, tensors)
            return
        if entry is not False:
            self.fn[self.grid](*tensors, *self.scalars, **self.meta)
            return
        # first launch with this alignment on this device: it may compile
        with launchers_built_aside(getattr(drv, "launcher_cls", None)):
            kernel = self.fn[self.grid](*tensors, *self.scalars, **self.meta)
        self._direct[key] = _direct_entry(self.fn, kernel, len(tensors), self.scalars, self.meta)

    def _recorded(self, addresses: Any) -> tuple[Any, int, int, Any]:
        """(driver, current device, key, the compiled kernel recorded for the key or False): the key
        is the device and which addresses are not 16-byte aligned (Triton specialises on that)."""
        odd, bit = 0, 1
        for p in addresses:
            if p & 15:
                odd |= bit
            bit <<= 1
        drv = _driver()
        device = drv.get_current_device()
        key = odd << 8 | device
        return drv, device, key, self._direct.get(key, False)

    def _relaunch(self, entry: tuple, drv: Any, device: int, pointers: Any) -> None:
        """Launch a recorded compiled kernel through its own launcher (tensors or raw addresses)."""
        run, function, packed, tail = entry
        g = self.grid
        run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, drv.get_current_stream(device),
            function, packed, None, None, None, *pointers, *tail)

    def ready(self) -> bool:
        """Whether :meth:`direct` may launch: a compiled kernel is recorded and neither the
        environment nor a compile-only context asks for Triton's own path."""
        return bool(self._direct) and not _COMPILE_ONLY[0] and _INT_POINTERS[0] and direct_launch_enabled()

    def direct(self, *pointers: int) -> bool:
        """After :meth:`ready`: launch with raw device addresses (ints, one per leading tensor
        parameter) when a compiled kernel is recorded for their 16-byte-alignment pattern on the
        current device and no launch hook is set; returns whether it launched. False leaves the
        launch to ``__call__`` with tensors (the first launch of a pattern, a profiler's hook, a
        Triton whose launcher takes no ints). The caller keeps the memory alive until the kernel
        is enqueued; stream order does the rest, as for any temporary."""
        drv, device, _, entry = self._recorded(pointers)
        if not entry or _hooks_set():
            return False
        try:
            self._relaunch(entry, drv, device, pointers)
        except TypeError:  # this Triton's launcher wants tensors: never try ints again
            _INT_POINTERS[0] = False
            return False
        return True

    def __repr__(self) -> str:
        return f"Launch({getattr(self.fn, '__name__', self.fn)!s}, grid={self.grid})"


def _direct_entry(fn: Any, kernel: Any, n_tensors: int, scalars: tuple, meta: dict[str, Any]) -> tuple | None:
    """(run, function, packed metadata, positional arguments after the tensors) of a compiled
    kernel, or None when this Triton's compiled kernels cannot be launched that way."""
    if kernel is None:
        return None
    if hasattr(kernel, "result"):  # an asynchronous compile's future
        kernel = kernel.result()
    try:
        run, function, packed = kernel.run, kernel.function, kernel.packed_metadata
        names, params = list(fn.arg_names), list(fn.params)
    except AttributeError:
        return None
    if function is None or len(names) != len(params):
        return None
    tail = list(scalars)
    for name, param in zip(names[n_tensors + len(scalars):], params[n_tensors + len(scalars):]):
        if name in meta:
            tail.append(meta[name])
        elif getattr(param, "has_default", False):
            tail.append(param.default)
        else:
            return None
    return run, function, packed, tuple(tail)


def _hooks_set() -> bool:
    """A launch hook (a profiler's) must see every launch: then Triton's own path runs."""
    runtime = _knobs_runtime()
    if runtime is None:  # a Triton without ``triton.knobs``: its hooks live on CompiledKernel
        from triton.compiler import CompiledKernel

        return (getattr(CompiledKernel, "launch_enter_hook", None) is not None
                or getattr(CompiledKernel, "launch_exit_hook", None) is not None)
    return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)


def _hook_active(hook: Any) -> bool:
    """None, or an empty hook chain (Triton >= 3.5 keeps one that is never None), is inactive."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


@functools.lru_cache(maxsize=1)
def _knobs_runtime() -> Any:
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs.runtime


def _driver() -> Any:
    """Triton's active GPU driver (current device and stream exactly as its own launches read them),
    created with Triton's one-time work overlapped (:func:`.first_launch.active_driver`)."""
    return active_driver()
