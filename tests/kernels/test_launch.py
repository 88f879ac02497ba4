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
from adasplash_tune.kernels.launch import Launch


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


def _kinds(fn: _FakeJit) -> list[str]:
    return [entry[0] for entry in fn.log]


def test_second_launch_goes_direct_with_triton_argument_order(direct):
    fn, x, y = _FakeJit(), torch.zeros(8), torch.zeros(8)
    run = Launch(fn, (4, 2), (5, 0.5), {"BM": 16, "num_warps": 4})
    run(x)
    run(y)
    assert _kinds(fn) == ["triton", "direct"]
    assert fn.log[0][1:] == ((4, 2), (x, 5, 0.5), {"BM": 16, "num_warps": 4})
    args = fn.log[1][1]
    # grid padded to 3-d, stream, handle, packed metadata, no launch metadata or hooks, then
    # every kernel parameter in order: constexprs by name, the default for the one not given.
    assert args[:9] == (4, 2, 1, 99, "fn-handle", "packed", None, None, None)
    assert args[9] is y and args[10:] == (5, 0.5, 16, 7)


def test_alignment_patterns_are_recorded_apart(direct):
    """Triton specialises on 16-byte alignment: a misaligned tensor gets its own compiled kernel
    (through Triton once), aligned views share the aligned one."""
    fn, x = _FakeJit(), torch.zeros(64)
    run = Launch(fn, (1,), (5, 0.5), {"BM": 16})
    run(x)           # triton, recorded (aligned)
    run(x[4:])       # 16 bytes in: aligned -> direct
    run(x[1:])       # 4 bytes in: a new pattern -> triton, recorded
    run(x[1:])       # direct
    run(x[5:])       # 20 bytes in: the same (misaligned) pattern -> direct
    assert _kinds(fn) == ["triton", "direct", "triton", "direct", "direct"]


def test_hooks_env_and_interpreter_take_the_triton_path(direct, monkeypatch):
    fn, x = _FakeJit(), torch.zeros(8)
    run = Launch(fn, (1,), (5, 0.5), {"BM": 16})
    run(x)
    monkeypatch.setattr(launch_mod, "_hooks_set", lambda: True)
    run(x)
    monkeypatch.setattr(launch_mod, "_hooks_set", lambda: False)
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "0")
    run(x)
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run(x)
    assert _kinds(fn) == ["triton", "triton", "triton", "triton", "direct"]


def test_devices_are_recorded_apart(direct, monkeypatch):
    fn, x = _FakeJit(), torch.zeros(8)
    run = Launch(fn, (1,), (5, 0.5), {"BM": 16})
    run(x)
    monkeypatch.setattr(launch_mod, "_driver",
                        lambda: SimpleNamespace(get_current_device=lambda: 4, get_current_stream=lambda d: 7))
    run(x)
    run(x)
    assert _kinds(fn) == ["triton", "triton", "direct"]
    assert fn.log[2][1][3] == 7


def test_no_compiled_kernel_means_triton_path_every_time(direct):
    fn, x = _FakeJit(compiled=False), torch.zeros(8)
    run = Launch(fn, (1,), (5, 0.5), {"BM": 16})
    for _ in range(3):
        run(x)
    assert _kinds(fn) == ["triton"] * 3


def test_a_missing_parameter_disables_the_direct_path(direct):
    fn, x = _FakeJit(), torch.zeros(8)
    run = Launch(fn, (1,), (5, 0.5), {})  # BM missing: Triton would raise; here the fake accepts it
    run(x)
    run(x)
    assert _kinds(fn) == ["triton", "triton"]


def test_hook_chains_count_only_when_they_hold_hooks():
    """Triton >= 3.5 keeps launch hooks as a chain object that is never None: empty means off."""
    assert not launch_mod._hook_active(None)
    assert not launch_mod._hook_active(SimpleNamespace(calls=[]))
    assert launch_mod._hook_active(SimpleNamespace(calls=[print]))
    assert launch_mod._hook_active(print)  # an older Triton's plain callable


def test_compile_only_warms_up_and_launches_nothing(direct):
    fn = _FakeJit()
    warmups = []

    class _Warm:
        def __init__(self):
            self.loaded = False

        def _init_handles(self):
            self.loaded = True

    def warmup(*args, grid, **meta):
        warmups.append((grid, args, meta))
        return kernel

    kernel = _Warm()
    fn.warmup = warmup
    x = torch.zeros(4)
    plan = Launch(fn, (2,), (4, 0.5), {"BM": 16, "num_warps": 4})
    with launch_mod.compile_only():
        plan(x)
    assert warmups == [((2,), (x, 4, 0.5), {"BM": 16, "num_warps": 4})]
    assert kernel.loaded  # loading is what rejects a kernel needing too much shared memory
    assert fn.log == []  # neither Triton's launch path nor the direct one ran
    plan(x)  # outside the context: a real launch again
    assert [entry[0] for entry in fn.log] == ["triton"]


@pytest.mark.gpu
def test_gpu_compile_only_compiles_without_running():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(X, N, VALUE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, tl.full((BLOCK,), VALUE, tl.float32), mask=offs < N)

    x = torch.zeros(100, device="cuda")
    plan = Launch(_fill, (2,), (100,), {"VALUE": 3.0, "BLOCK": 64})
    with launch_mod.compile_only():
        plan(x)
    torch.cuda.synchronize()
    assert torch.count_nonzero(x).item() == 0  # compiled, nothing ran
    plan(x)
    torch.cuda.synchronize()
    assert torch.all(x == 3.0)


class _FakeAsyncMode:
    """Stands in for Triton's AsyncCompileMode: records entry and exit."""

    log: list = []

    def __init__(self, executor):
        self.executor = executor

    def __enter__(self):
        _FakeAsyncMode.log.append("enter")
        return self

    def __exit__(self, *exc):
        _FakeAsyncMode.log.append("exit")


def test_parallel_compile_warms_up_without_loading_futures(direct, monkeypatch):
    monkeypatch.setattr(launch_mod, "_async_compile_mode", lambda: _FakeAsyncMode)
    _FakeAsyncMode.log = []
    fn = _FakeJit()
    loaded = []

    class _Future:
        def _init_handles(self):  # a real FutureKernel would block here until its compile ended
            loaded.append(True)

    fn.warmup = lambda *args, grid, **meta: _Future()
    plan = Launch(fn, (2,), (4, 0.5), {"BM": 16})
    with launch_mod.parallel_compile(3) as active:
        assert active
        plan(torch.zeros(4))
    assert _FakeAsyncMode.log == ["enter", "exit"] and loaded == [] and fn.log == []
    with launch_mod.compile_only():  # outside parallel_compile a warmup is loaded at once
        plan(torch.zeros(4))
    assert loaded == [True]


def test_parallel_compile_yields_false_without_async_compile(monkeypatch):
    monkeypatch.setattr(launch_mod, "_async_compile_mode", lambda: None)
    with launch_mod.parallel_compile(2) as active:
        assert active is False
        assert not launch_mod._COMPILE_ONLY[0]  # nothing is switched to compile-only


def test_compile_ahead_runs_once_per_key_and_never_fails_the_call(monkeypatch):
    from adasplash_tune.kernels.attention import op

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ADASPLASH_TUNE_PARALLEL_COMPILE", "1")
    monkeypatch.setattr(launch_mod, "_async_compile_mode", lambda: _FakeAsyncMode)
    runs = []
    op._compile_ahead(("t", 1), lambda: runs.append(1))
    op._compile_ahead(("t", 1), lambda: runs.append(1))
    assert runs == [1] and op._AHEAD_OUTCOME[0] == "parallel"

    def broken():
        raise RuntimeError("compile error")

    op._compile_ahead(("t", 2), broken)  # logged; the real launches report errors themselves
    assert op._AHEAD_OUTCOME[0] == "failed: RuntimeError"
    monkeypatch.delenv("ADASPLASH_TUNE_PARALLEL_COMPILE")  # opt-in: off by default
    op._parallel_compile_requested.cache_clear()
    assert op._parallel_compile_requested() is False
    monkeypatch.setenv("ADASPLASH_TUNE_PARALLEL_COMPILE", "1")
    op._parallel_compile_requested.cache_clear()
    assert op._parallel_compile_requested() is True
    op._parallel_compile_requested.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op._compile_ahead(("t", 4), lambda: runs.append(4))
    assert runs == [1]  # never under the interpreter
    op._COMPILED_AHEAD.difference_update({("t", 1), ("t", 2), ("t", 4)})


@pytest.mark.gpu
def test_gpu_first_call_compiles_in_parallel_and_matches_the_serial_compile(tmp_path):
    """Fresh processes with empty Triton caches: the parallel compile ran and gave the same output."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; run `pytest -m gpu` on the GPU machine")
    import os
    import subprocess
    import sys

    script = (
        "import torch, adasplash_tune\n"
        "from adasplash_tune.kernels.attention import op\n"
        "g = torch.Generator(device='cuda').manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, 333, 64, device='cuda', dtype=torch.bfloat16, generator=g) for _ in range(3))\n"
        "out = adasplash_tune.adasplash(q, k, v, alpha=1.5, is_causal=True)\n"
        "torch.save(out.cpu(), sys.argv[1]); print(op._AHEAD_OUTCOME[0])\n"
    )
    outcomes = []
    for name, flag in (("parallel", "1"), ("serial", "0")):
        env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / f"triton-{name}"), ADASPLASH_TUNE_PARALLEL_COMPILE=flag)
        proc = subprocess.run([sys.executable, "-c", "import sys\n" + script, str(tmp_path / f"{name}.pt")],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outcomes.append(proc.stdout.strip().splitlines()[-1])
    assert outcomes == ["parallel", "none"]
    assert torch.equal(torch.load(tmp_path / "parallel.pt"), torch.load(tmp_path / "serial.pt"))


def test_direct_with_addresses_after_a_recorded_launch(direct, monkeypatch):
    """``ready``/``direct``: raw addresses go to the compiled launcher in the tensors' places, once
    Triton's path recorded the kernel for that alignment pattern; otherwise nothing launches."""
    fn, x = _FakeJit(), torch.zeros(8)
    run = Launch(fn, (4, 2), (5, 0.5), {"BM": 16})
    assert not run.ready() and not run.direct(x.data_ptr())  # nothing recorded yet
    run(x)
    assert run.ready()
    assert run.direct(4096)
    assert fn.log[-1] == ("direct", (4, 2, 1, 99, "fn-handle", "packed", None, None, None, 4096, 5, 0.5, 16, 7))
    assert not run.direct(4096 + 4)  # a misaligned address: a pattern Triton's path has not seen
    monkeypatch.setattr(launch_mod, "_hooks_set", lambda: True)
    assert not run.direct(4096)  # a profiler's hook sees every launch: Triton's path
    monkeypatch.setattr(launch_mod, "_hooks_set", lambda: False)
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "0")
    assert not run.ready()
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "1")
    with launch_mod.compile_only():
        assert not run.ready()
    assert _kinds(fn) == ["triton", "direct"]


def test_a_launcher_refusing_addresses_turns_them_off(direct, monkeypatch):
    fn, x = _FakeJit(), torch.zeros(8)

    def refuse(*args):
        if isinstance(args[9], int):
            raise TypeError("pointer argument must be a tensor")
        fn.log.append(("direct", args))

    fn.compiled.run = refuse
    run = Launch(fn, (1,), (5, 0.5), {"BM": 16})
    run(x)
    monkeypatch.setattr(launch_mod, "_INT_POINTERS", [True])
    assert not run.direct(4096)
    assert not run.ready()  # never tried again in this process
    run(x)  # tensors still launch directly
    assert _kinds(fn) == ["triton", "direct"]


def test_environment_reads_follow_changes(monkeypatch):
    """The per-launch environment reads see ``os.environ`` as it is now."""
    monkeypatch.setenv("ADASPLASH_TUNE_TEST_FLAG", "abc")
    assert launch_mod.env_value("ADASPLASH_TUNE_TEST_FLAG", "-") == "abc"
    monkeypatch.setenv("ADASPLASH_TUNE_TEST_FLAG", "0")
    assert launch_mod.env_value("ADASPLASH_TUNE_TEST_FLAG", "-") == "0"
    monkeypatch.delenv("ADASPLASH_TUNE_TEST_FLAG")
    assert launch_mod.env_value("ADASPLASH_TUNE_TEST_FLAG", "-") == "-"


def test_even_n_holds_only_when_every_tile_size_divides_the_sequence():
    from adasplash_tune.kernels.attention.common import Geometry

    assert Geometry(1, 2, 1, 4096, 64).even_n(64, 32)
    assert not Geometry(1, 2, 1, 4096 + 32, 64).even_n(64, 32)  # 32-key tiles fit, 64-key ones do not
    assert not Geometry(1, 2, 1, 100, 64).even_n(16)
