"""kernels/first_launch.py: Triton's one-time host work overlapped, on fakes (the real thing, with a
cold Triton cache, is ``test_gpu_first_launch_builds_the_launcher_aside``)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from adasplash_tune.kernels import first_launch


class _FakeFn:
    """Stands in for a JITFunction: its ASTSource records what it was built from."""

    @staticmethod
    def ASTSource(fn, signature, constants, attrs):  # noqa: N802 (Triton's attribute name)
        return ("src", fn, signature, constants, attrs)


class _SlowLauncher:
    """A launcher class whose construction (the C build) takes a while and is recorded."""

    built: list = []

    def __init__(self, src, metadata):
        time.sleep(0.05)
        _SlowLauncher.built.append((src, metadata, threading.current_thread().name))


def _hook_kwargs(fn=None):
    fn = fn or _FakeFn()
    return {"key": "k", "fn": SimpleNamespace(jit_function=fn),
            "compile": {"key": "k", "signature": {"X": "*fp32"}, "constants": {(1,): 16}, "configs": [{"a": 1}]}}


@pytest.fixture
def runtime(monkeypatch):
    rt = SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    monkeypatch.setattr(first_launch, "_runtime_knobs", lambda: rt)
    _SlowLauncher.built = []
    return rt


def test_the_launcher_is_built_aside_and_waited_for_after_the_compile(runtime):
    fn = _FakeFn()
    with first_launch.launchers_built_aside(_SlowLauncher):
        assert runtime.jit_cache_hook(**_hook_kwargs(fn)) is None  # Triton compiles
        assert _SlowLauncher.built == []  # still building while the kernel compiles
        runtime.jit_post_compile_hook(key="k")
        ((src, metadata, thread),) = _SlowLauncher.built
    assert src == ("src", fn, {"X": "*fp32"}, {(1,): 16}, {"a": 1})
    assert metadata.tensordesc_meta is None and thread == "adasplash-triton-warm"
    assert runtime.jit_cache_hook is None and runtime.jit_post_compile_hook is None


def test_hooks_already_set_are_called_and_restored(runtime):
    calls = []

    def before(**kwargs):
        calls.append(("before", kwargs["key"]))
        return True  # the user's hook skips this compile: no launcher is built either

    def after(**kwargs):
        calls.append(("after", kwargs["key"]))
        return "after-result"

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
    with first_launch.launchers_built_aside(_SlowLauncher):
        assert runtime.jit_cache_hook(**_hook_kwargs()) is True
        assert runtime.jit_post_compile_hook(key="k") == "after-result"
    assert calls == [("before", "k"), ("after", "k")] and _SlowLauncher.built == []
    assert runtime.jit_cache_hook is before and runtime.jit_post_compile_hook is after


def test_failures_cost_nothing_but_time(runtime):
    """A launcher class that raises, hook arguments of another shape, an exception inside: the
    hooks are restored and the builds joined; nothing propagates but the caller's own error."""

    class Broken:
        def __init__(self, src, metadata):
            raise RuntimeError("no compiler")

    with first_launch.launchers_built_aside(Broken):
        runtime.jit_cache_hook(**_hook_kwargs())
        runtime.jit_cache_hook(key="k", fn=None, compile={})
        runtime.jit_post_compile_hook(key="k")
    with pytest.raises(ValueError, match="caller"):
        with first_launch.launchers_built_aside(_SlowLauncher):
            runtime.jit_cache_hook(**_hook_kwargs())
            raise ValueError("caller")
    assert len(_SlowLauncher.built) == 1  # joined on the way out
    assert runtime.jit_cache_hook is None and runtime.jit_post_compile_hook is None


def test_no_launcher_class_sets_no_hooks(runtime):
    with first_launch.launchers_built_aside(None):
        assert runtime.jit_cache_hook is None


def test_the_driver_is_created_while_the_key_is_hashed(monkeypatch):
    """Triton's key is hashed in another thread, started before the driver is created (a C build
    when the cache is cold) and joined before the driver is returned."""
    import triton.runtime
    import triton.runtime.cache

    events = []

    def key():
        time.sleep(0.05)
        events.append(("key", threading.current_thread().name))

    class Config:
        @property
        def active(self):
            events.append(("driver", threading.current_thread().name))
            return "the driver"

    monkeypatch.setattr(triton.runtime.cache, "triton_key", key)
    monkeypatch.setattr(triton.runtime, "driver", Config())
    first_launch.active_driver.cache_clear()
    try:
        assert first_launch.active_driver() == "the driver"
        assert events == [("driver", threading.main_thread().name), ("key", "adasplash-triton-warm")]
    finally:
        first_launch.active_driver.cache_clear()


_CHILD = r"""
import json, sys, threading
import torch
import triton.runtime.build as build

builds = []
real_build = build._build

def clocked_build(name, *args, **kwargs):
    builds.append((name, threading.current_thread().name))
    return real_build(name, *args, **kwargs)

build._build = clocked_build
import adasplash_tune
q, k, v = (torch.randn(1, 2, 100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
out = adasplash_tune.adasplash(q, k, v, 1.5, True)
torch.cuda.synchronize()
print(json.dumps({"builds": builds, "finite": bool(torch.isfinite(out).all())}))
"""


@pytest.mark.gpu
def test_gpu_first_launch_builds_the_launcher_aside(tmp_path):
    """A fresh process with an empty Triton cache: the driver's utilities are built in the main
    thread, every kernel launcher in the thread that builds it while the kernel compiles, and no
    C module twice (Triton's own build of each launcher found the one built aside)."""
    import json
    import os
    import subprocess
    import sys

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), ADASPLASH_TUNE_CACHE=str(tmp_path / "none.db"))
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["finite"]
    names = [name for name, _ in report["builds"]]
    assert names.count("cuda_utils") == 1 and names.count("__triton_launcher") >= 1
    for name, thread in report["builds"]:
        assert thread == ("adasplash-triton-warm" if name == "__triton_launcher" else "MainThread"), report
