"""kernels/launch.py: which launches take the compiled kernel's launcher, and with what arguments.

A fake ``@triton.jit`` function stands in for Triton (no GPU here): it records Triton-path calls
and returns a fake compiled kernel that records direct launches. The GPU suite runs the real path
(test_attention_triton.py's ``test_gpu_direct_launch_matches_triton_path``).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from adasplash_tune.kernels import launch as launch_mod
from adasplash_tune.kernels.launch import clear_launch_cache, launch


class _Param:
    def __init__(self, name: str, default=inspect.Parameter.empty):
        self.name, self.default = name, default

    @property
    def has_default(self) -> bool:
        return self.default is not inspect.Parameter.empty


class _Compiled:
    def __init__(self, log: list):
        self.function, self.packed_metadata, self.log = "fn-handle", "packed", log

    def run(self, *args):
        self.log.append(("direct", args))


class _FakeJit:
    """Parameters X (tensor), N (int), S (float), then constexprs BM and DEFAULTED=7."""

    arg_names = ["X", "N", "S", "BM", "DEFAULTED"]
    params = [_Param("X"), _Param("N"), _Param("S"), _Param("BM"), _Param("DEFAULTED", 7)]

    def __init__(self, compiled: bool = True):
        self.log: list = []
        self.compiled = _Compiled(self.log) if compiled else None

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return self.compiled

        return call


@pytest.fixture
def direct(monkeypatch):
    """The direct path switched on with a fake driver (device 3, stream 99) and no hooks."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("ADASPLASH_TUNE_DIRECT_LAUNCH", raising=False)
    monkeypatch.setattr(launch_mod, "_driver",
                        lambda: SimpleNamespace(get_current_device=lambda: 3, get_current_stream=lambda d: 99))
    monkeypatch.setattr(launch_mod, "_hooks_set", lambda: False)
    clear_launch_cache()
    yield
    clear_launch_cache()


def _kinds(fn: _FakeJit) -> list[str]:
    return [entry[0] for entry in fn.log]


def test_second_launch_goes_direct_with_triton_argument_order(direct):
    fn, x = _FakeJit(), torch.zeros(8)
    launch(fn, (4, 2), x, 5, 0.5, BM=16, num_warps=4)
    launch(fn, (4, 2), x, 5, 0.25, BM=16, num_warps=4)
    assert _kinds(fn) == ["triton", "direct"]
    assert fn.log[0][1:] == ((4, 2), (x, 5, 0.5), {"BM": 16, "num_warps": 4})
    args = fn.log[1][1]
    # grid padded to 3-d, stream, handle, packed metadata, no launch metadata or hooks, then
    # every kernel parameter in order: constexprs by name, the default for the one not given.
    assert args[:9] == (4, 2, 1, 99, "fn-handle", "packed", None, None, None)
    assert args[9:] == (x, 5, 0.25, 16, 7)


@pytest.mark.parametrize("change", ["int", "constexpr", "option", "dtype", "alignment"])
def test_a_new_specialisation_goes_through_triton(direct, change):
    fn, x = _FakeJit(), torch.zeros(64)
    base = dict(args=(x, 5, 0.5), meta={"BM": 16, "num_warps": 4})
    launch(fn, (1,), *base["args"], **base["meta"])
    args, meta = list(base["args"]), dict(base["meta"])
    if change == "int":
        args[1] = 6
    elif change == "constexpr":
        meta["BM"] = 32
    elif change == "option":
        meta["num_warps"] = 8
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    else:  # a view 4 bytes in: not 16-byte aligned, which Triton specialises on
        args[0] = x[1:]
    launch(fn, (1,), *args, **meta)
    launch(fn, (1,), *args, **meta)
    assert _kinds(fn) == ["triton", "triton", "direct"]


def test_aligned_views_share_the_compiled_kernel(direct):
    fn, x = _FakeJit(), torch.zeros(64)
    launch(fn, (1,), x, 5, 0.5, BM=16)
    launch(fn, (1,), x[4:], 5, 0.5, BM=16)  # 16 bytes in: still aligned
    assert _kinds(fn) == ["triton", "direct"]
    assert fn.log[1][1][9] is not x


def test_hooks_env_and_interpreter_take_the_triton_path(direct, monkeypatch):
    fn, x = _FakeJit(), torch.zeros(8)
    launch(fn, (1,), x, 5, 0.5, BM=16)
    monkeypatch.setattr(launch_mod, "_hooks_set", lambda: True)
    launch(fn, (1,), x, 5, 0.5, BM=16)
    monkeypatch.setattr(launch_mod, "_hooks_set", lambda: False)
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "0")
    launch(fn, (1,), x, 5, 0.5, BM=16)
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launch(fn, (1,), x, 5, 0.5, BM=16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    launch(fn, (1,), x, 5, 0.5, BM=16)
    assert _kinds(fn) == ["triton", "triton", "triton", "triton", "direct"]


def test_no_compiled_kernel_means_triton_path_every_time(direct):
    fn, x = _FakeJit(compiled=False), torch.zeros(8)
    for _ in range(3):
        launch(fn, (1,), x, 5, 0.5, BM=16)
    assert _kinds(fn) == ["triton"] * 3


def test_a_missing_parameter_disables_the_direct_path(direct):
    fn, x = _FakeJit(), torch.zeros(8)
    for _ in range(2):
        launch(fn, (1,), x, 5, 0.5)  # BM missing: Triton would raise; here the fake accepts it
    assert _kinds(fn) == ["triton", "triton"]


def test_empty_grid_launches_nothing_directly(direct):
    fn, x = _FakeJit(), torch.zeros(8)
    launch(fn, (0, 4), x, 5, 0.5, BM=16)
    launch(fn, (0, 4), x, 5, 0.5, BM=16)
    assert _kinds(fn) == ["triton"]
