"""A process's first launches: Triton's one-time host work overlapped instead of queued.

Before a process launches its first kernel Triton hashes its own 450 MB library for its cache
key (``triton_key``, ~0.35 s on the H200's host, warm cache or cold) and builds its driver's C
utilities (a C compiler run of ~0.4 s when its cache is cold); and a kernel compiled for the first
time gets its launcher built by the C compiler once the compile is done (~0.3 s per kernel
signature, cold only). Triton does these one after another. Here:

* :func:`active_driver` hashes Triton's key in a thread while the driver builds or loads its
  utilities (the compiler runs as a subprocess, the hashing without the GIL);
* :func:`launchers_built_aside` surrounds a launch that may compile: Triton's ``jit_cache_hook``
  (called with the kernel's signature just before it compiles) starts building that signature's
  launcher in a thread, and ``jit_post_compile_hook`` waits for it once the compile is done, so
  Triton's own build then finds it in its cache. Hooks already set are called as before.

Everything here only warms Triton's caches: a build that fails or a Triton that lacks a hook or
attribute costs the time it took, and Triton then does the work itself as it always did.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from types import SimpleNamespace
from typing import Any, Callable, Iterator

__all__ = ["active_driver", "launchers_built_aside"]

log = logging.getLogger("adasplash_tune")

#: What a launcher reads from a compiled kernel's metadata, before there is one: none of our
#: kernels uses tensor descriptors, which alone change a launcher's C source; the other fields
#: are kept by the launcher object (discarded here), not compiled into its source.
_NO_METADATA = SimpleNamespace(tensordesc_meta=None, num_ctas=1, global_scratch_size=0, global_scratch_align=1,
                               profile_scratch_size=0, profile_scratch_align=1, launch_cooperative_grid=False,
                               launch_pdl=False)


def _quietly(work: Callable[..., Any], *args: Any) -> None:
    try:
        work(*args)
    except Exception as exc:  # a cache warmer: Triton redoes the work (and reports) if it must
        log.debug("ahead-of-time Triton work %s failed: %s", getattr(work, "__name__", work), exc)


def _aside(work: Callable[..., Any], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=_quietly, args=(work, *args), name="adasplash-triton-warm", daemon=True)
    thread.start()
    return thread


@functools.lru_cache(maxsize=1)
def active_driver() -> Any:
    """Triton's active GPU driver, created with Triton's version key hashed alongside (once per
    process)."""
    from triton.runtime import driver

    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # a Triton without it: nothing to overlap
        return driver.active
    thread = _aside(triton_key)
    try:
        return driver.active
    finally:
        thread.join()


def _runtime_knobs() -> Any:
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = knobs.runtime
    if not (hasattr(runtime, "jit_cache_hook") and hasattr(runtime, "jit_post_compile_hook")):
        return None
    return runtime


def _launcher_build(hook_kwargs: dict[str, Any], launcher_cls: Any) -> threading.Thread | None:
    """Start building the launcher of the kernel ``jit_cache_hook`` was called for."""
    try:
        fn = hook_kwargs["fn"].jit_function
        compile_args = hook_kwargs["compile"]
        src = fn.ASTSource(fn, compile_args["signature"], compile_args["constants"], compile_args["configs"][0])
    except Exception as exc:  # another Triton's hook arguments
        log.debug("no launcher built ahead: %s", exc)
        return None
    return _aside(launcher_cls, src, _NO_METADATA)


@contextlib.contextmanager
def launchers_built_aside(launcher_cls: Any) -> Iterator[None]:
    """Inside: each kernel Triton compiles gets its launcher built while it compiles (see the module
    docstring). ``launcher_cls``: the active driver's launcher class (None: nothing is done)."""
    runtime = _runtime_knobs() if launcher_cls is not None else None
    if runtime is None:
        yield
        return
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    building: list[threading.Thread] = []

    def about_to_compile(**kwargs: Any) -> Any:
        skip = before(**kwargs) if before is not None else None
        if not skip:
            thread = _launcher_build(kwargs, launcher_cls)
            if thread is not None:
                building.append(thread)
        return skip

    def compiled(**kwargs: Any) -> Any:
        while building:
            building.pop().join()
        return after(**kwargs) if after is not None else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = about_to_compile, compiled
    try:
        yield
    finally:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
        while building:
            building.pop().join()
