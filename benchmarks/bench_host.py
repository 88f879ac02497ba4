"""What a call costs besides the kernels: host time per call, a training step, the first call, memory.

Parts (``--parts``, default all):

* ``host``: microseconds of host time per call (enqueue only: no synchronisation inside the timed
  loop) at tiny shapes, for ``adasplash`` forward, forward+backward and ``entmax``, against SDPA
  and softmax (forward+backward also with q, k, v as views of one packed projection and a strided
  gradient, as a model's layer makes them); beside them the backend's own entry point ("alone") and the API over a backend that
  only allocates its outputs ("null backend": the API's own cost, validation, memo and autograd),
  and on CUDA the same call with ``ADASPLASH_TUNE_DIRECT_LAUNCH=0`` ("triton path": every kernel
  through Triton's own per-call dispatch instead of kernels/launch.py's direct re-launch).
  ``wall_us`` adds the final synchronisation (per call, over the batch).
* ``train``: one training step (forward, backward, AdamW) of a BERT-sized encoder, 12 layers of
  width 768 with 12 heads in bfloat16, at batch 8 x N = 512 and batch 1 x N = 8192, with
  ``adasplash`` against SDPA: step time and peak memory beyond the model and optimizer state.
* ``first-call``: a fresh process's first ``adasplash`` call (forward; forward+backward) with a
  cache hit, with an empty Triton kernel cache (cold) and reusing it (warm), reported beyond
  ``import torch``; plus ``import adasplash_tune``'s cost from ``python -X importtime``. With
  ``--breakdown`` one more warm and one more cold process clock Triton's import, its kernel
  compiles (per kernel; warm: cache lookups), the key of Triton itself inside them and its C
  builds (its driver utilities, each new launcher signature) inside that call.
* ``memory``: peak memory beyond the inputs of causal (1, 8, 131072, 64) bfloat16 forward+backward
  and forward without gradients, ``adasplash`` against SDPA, each in a fresh process after a warm-up.

On a machine without CUDA (or with ``--quick``) everything shrinks to a smoke run: tiny shapes,
the torch backend, host time as this thread's CPU time (one intra-op thread: immune to other
processes), the memory part skipped (it reads the CUDA allocator). A part that fails is reported
with its error; the others still run.

    python benchmarks/bench_host.py --out benchmarks/results/h200-host.json    # H200: ~3-4 min
    python benchmarks/bench_host.py --quick --out /tmp/cpu-host.json           # CPU smoke: ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PARTS = ("host", "train", "first-call", "memory")
ALPHA = 1.5

# --------------------------------------------------------------------------- timing


def per_call_us(fn: Callable[[], Any], calls: int, repeats: int, cuda: bool) -> dict[str, float]:
    """Host microseconds per call (median and min over ``repeats`` loops of ``calls``), and on CUDA
    the wall time per call including the synchronisation that ends each loop."""
    import torch

    clock = time.perf_counter_ns if cuda else time.thread_time_ns
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(max(3, calls // 5)):
        fn()
    sync()
    host, wall = [], []
    for _ in range(repeats):
        start, start_wall = clock(), time.perf_counter_ns()
        for _ in range(calls):
            fn()
        host.append((clock() - start) / calls / 1e3)
        sync()
        wall.append((time.perf_counter_ns() - start_wall) / calls / 1e3)
    return {"host_us": statistics.median(host), "host_min_us": min(host), "wall_us": statistics.median(wall)}


def _environment(cuda: bool) -> dict[str, Any]:
    import torch

    from adasplash_tune.device import triton_version

    return {"torch": torch.__version__, "triton": triton_version(), "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if cuda else f"CPU {platform.machine()}",
            "cpu_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


# --------------------------------------------------------------------------- host part


def _backend_alone(backend: str):
    """The backend's own entry points: (forward, differentiable forward, entmax forward); None for
    one this checkout's kernels do not have."""
    if backend == "torch":
        from adasplash_tune.kernels.torch_backend.attention import adasplash_torch, adasplash_torch_forward
        from adasplash_tune.kernels.torch_backend.entmax import entmax_torch_forward

        return (lambda *a: adasplash_torch_forward(*a)[0]), adasplash_torch, entmax_torch_forward
    from adasplash_tune.kernels import entmax
    from adasplash_tune.kernels.attention import op

    attention = getattr(op, "adasplash_triton", None)
    return attention, attention, getattr(entmax, "entmax_forward", None)


@contextlib.contextmanager
def null_backend():
    """The API with backends that only allocate their outputs: what is timed is the API's own cost
    (validation, memo, autograd) -- on CPU, the torch backend's compute would drown it."""
    from adasplash_tune import ops

    def forward(q, k, v, alpha, is_causal, varlen, scale, config, *, need_residuals=True):
        stats = [q.new_empty((3, *q.shape[:3], 1))] if need_residuals else []
        return q.new_empty(q.shape), stats

    def backward(grad_out, q, k, v, out, residuals, alpha, is_causal, varlen, scale, config, *,
                 needs=(True, True, True)):
        return tuple(t.new_empty(t.shape) if need else None for t, need in zip((q, k, v), needs))

    attention = ops.AttentionPair(forward, backward, lambda q, k, v, config: [])
    entmax = ops.EntmaxPair(lambda x, alpha, config: x.new_empty(x.shape),
                            lambda y, grad, alpha, config: y.new_empty(y.shape))
    saved = ops.attention_pair, ops.entmax_pair
    ops.attention_pair, ops.entmax_pair = (lambda backend: attention), (lambda backend: entmax)
    try:
        yield
    finally:
        ops.attention_pair, ops.entmax_pair = saved


def host_part(cuda: bool, quick: bool, calls: int, repeats: int) -> dict[str, Any]:
    import math

    import torch
    import torch.nn.functional as F

    import adasplash_tune
    from adasplash_tune.kernels.registry import get_spec

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape, rows = ((1, 1, 16, 16), (4, 16)) if quick else ((1, 2, 128, 64), (64, 128))
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        grad = torch.randn(shape, generator=gen).to(device, dtype)
        x = torch.randn(rows, generator=gen).to(device, dtype)
        scale = 1.0 / math.sqrt(shape[-1])
        sel = adasplash_tune.select("adasplash", q, k, v, ALPHA, True)
        ent = adasplash_tune.select("entmax", x, ALPHA)
        cfg = get_spec("adasplash", sel.backend).validate(sel.config)
        ent_cfg = get_spec("entmax", ent.backend).validate(ent.config)
        alone_fwd, alone_diff, alone_entmax = _backend_alone(sel.backend)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad)

        ours = lambda a, b, c: adasplash_tune.adasplash(a, b, c, ALPHA, True)  # noqa: E731
        sdpa = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
        alone = lambda a, b, c: alone_diff(a, b, c, ALPHA, True, None, scale, cfg)  # noqa: E731
        # q, k, v as a model's layer makes them: views of one (B, N, 3 H, D) projection, and the
        # gradient of the output as strided as the transpose back to (B, N, H, D) leaves it
        packed = torch.randn(shape[0], shape[2], 3 * shape[1], shape[3], generator=gen).to(device, dtype)
        packed.requires_grad_()
        grad_strided = grad.transpose(1, 2).contiguous().transpose(1, 2)

        def packed_fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(*(t.transpose(1, 2) for t in packed.split(shape[1], dim=2))),
                                               packed, grad_strided)

        cases = {
            "forward": {"adasplash": lambda: ours(q, k, v), "sdpa": lambda: sdpa(q, k, v),
                        "backend_alone": alone_fwd and (lambda: alone_fwd(q, k, v, ALPHA, True, None, scale, cfg))},
            "forward_backward": {"adasplash": fwd_bwd(ours), "sdpa": fwd_bwd(sdpa),
                                 "backend_alone": alone_diff and fwd_bwd(alone)},
            "forward_backward_packed": {"adasplash": packed_fwd_bwd(ours), "sdpa": packed_fwd_bwd(sdpa),
                                        "backend_alone": None},
            "entmax": {"adasplash": lambda: adasplash_tune.entmax(x, ALPHA), "sdpa": lambda: torch.softmax(x, -1),
                       "backend_alone": alone_entmax and (lambda: alone_entmax(x, ALPHA, ent_cfg))},
        }
        results: dict[str, Any] = {"attention_shape": list(shape), "entmax_shape": list(rows),
                                   "dtype": str(dtype).replace("torch.", ""), "backend": sel.backend,
                                   "config_source": sel.source, "clock": "wall" if cuda else "thread CPU time",
                                   "calls": calls, "repeats": repeats}
        for case, fns in cases.items():
            row = {name: per_call_us(fn, calls, repeats, cuda) if fn else None for name, fn in fns.items()}
            with null_backend():
                row["null_backend"] = per_call_us(fns["adasplash"], calls, repeats, cuda)
            with _direct_launch(False):  # every kernel through Triton's own dispatch, for comparison
                row["triton_dispatch"] = per_call_us(fns["adasplash"], calls, repeats, cuda) if cuda else None
            row["ratio_to_sdpa"] = row["adasplash"]["host_us"] / row["sdpa"]["host_us"]
            row["api_overhead_us"] = row["null_backend"]["host_us"]
            results[case] = row
        return results
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _direct_launch(on: bool):
    """ADASPLASH_TUNE_DIRECT_LAUNCH set for the duration (kernels/launch.py reads it per call)."""
    before = os.environ.get("ADASPLASH_TUNE_DIRECT_LAUNCH")
    os.environ["ADASPLASH_TUNE_DIRECT_LAUNCH"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ADASPLASH_TUNE_DIRECT_LAUNCH", None)
        else:
            os.environ["ADASPLASH_TUNE_DIRECT_LAUNCH"] = before


# --------------------------------------------------------------------------- train part


def _encoder(layers: int, width: int, heads: int, attend, device, dtype):
    import torch
    from torch import nn

    class Layer(nn.Module):
        """A BERT layer (post-norm): self-attention, then a 4x feed-forward, each with a residual."""

        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            o = attend(q, k, v).transpose(1, 2).reshape(b, n, width)
            x = self.norm1(x + self.proj(o))
            return self.norm2(x + self.ff(x))

    return nn.Sequential(*(Layer() for _ in range(layers))).to(device, dtype)


def _train_steps(model, x, warmup: int, steps: int, cuda: bool) -> tuple[list[float], list[float]]:
    """Step times (ms) and peak memory beyond the state before each step (MB, CUDA only)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times, peaks = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        times.append((time.perf_counter() - start) * 1e3)
    return times, peaks


def train_part(cuda: bool, quick: bool) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    import adasplash_tune

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    layers, width, heads = (2, 64, 2) if quick else (12, 768, 12)
    problems = [(2, 32)] if quick else [(8, 512), (1, 8192)]
    warmup, steps = (1, 2) if quick else (3, 20)
    ours = lambda q, k, v: adasplash_tune.adasplash(q, k, v, ALPHA, False)  # noqa: E731
    methods = {"adasplash": ours, "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
    if cuda:  # the same model with every kernel through Triton's own dispatch (kernels/launch.py off)
        methods["adasplash_triton_dispatch"] = ours
    rows = []
    for batch, n in problems:
        for name, attend in methods.items():
            torch.manual_seed(0)
            model = _encoder(layers, width, heads, attend, device, dtype)
            x = torch.randn(batch, n, width, device=device, dtype=dtype)
            with _direct_launch(name != "adasplash_triton_dispatch"):
                times, peaks = _train_steps(model, x, warmup, steps, cuda)
            rows.append({"batch": batch, "seq_len": n, "layers": layers, "width": width, "heads": heads,
                         "dtype": str(dtype).replace("torch.", ""), "method": name,
                         "step_ms": statistics.median(times), "step_min_ms": min(times),
                         "peak_mb": max(peaks) if peaks else None})
            model = x = None
            if cuda:
                torch.cuda.empty_cache()
    for row in rows:
        sdpa = next(r for r in rows if r["method"] == "sdpa" and r["seq_len"] == row["seq_len"])
        row["step_ratio_to_sdpa"] = row["step_ms"] / sdpa["step_ms"]
    return rows


# --------------------------------------------------------------------------- fresh processes


def _run_child(kind: str, spec: dict[str, Any], env: dict[str, str], timeout: float = 600) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    return result


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: the caller's PYTHONPATH first (a run that puts another
    tree of the package there, e.g. an A/B against an older commit, measures that tree), then
    this checkout, so a child imports the package even where it is not installed."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=(path + os.pathsep if path else "") + str(REPO), **extra)


HEAVY_MODULES = ("torch._dynamo", "sympy", "sqlalchemy", "optuna", "triton")


def clock_calls(owner: Any, name: str, records: list[tuple[str, float]], label: Callable[..., str]) -> None:
    """Replace ``owner.name`` by a wrapper that appends (label(*args, **kwargs), seconds) to
    ``records`` for every call."""
    inner = getattr(owner, name)

    def clocked(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            records.append((label(*args, **kwargs), time.perf_counter() - start))

    setattr(owner, name, clocked)


def _aside() -> str:
    """" (aside)" in the threads of kernels/first_launch.py (builds that overlap the call's other
    work), else "" (the calling thread: the main one, or autograd's for a backward)."""
    import threading

    return " (aside)" if threading.current_thread().name == "adasplash-triton-warm" else ""


def _triton_clocks() -> tuple[float, dict[str, list[tuple[str, float]]]]:
    """Import Triton (seconds returned) and clock from now on its kernel compiles (by kernel name;
    with a warm cache a compile is a cache lookup), inside them the key of Triton itself (a hash of
    its own library, once per process), and its C builds (the launcher of each new kernel
    signature, the driver's utilities)."""
    start = time.perf_counter()
    import triton.compiler
    import triton.runtime.build
    import triton.runtime.cache

    seconds = time.perf_counter() - start
    clocks: dict[str, list[tuple[str, float]]] = {"compiles": [], "c_builds": [], "triton_key": []}
    clock_calls(triton.compiler, "compile", clocks["compiles"],
                lambda src, *a, **k: getattr(src, "name", type(src).__name__))
    clock_calls(triton.runtime.build, "_build", clocks["c_builds"], lambda name, *a, **k: name + _aside())
    clock_calls(triton.runtime.cache, "triton_key", clocks["triton_key"], lambda *a, **k: "triton_key")
    return seconds, clocks


def child_first_call(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: import torch, import the package, time the first call to its result.
    With ``spec["breakdown"]`` Triton is imported before the clock and its compiles and C builds
    are clocked inside the call (the call's time then excludes Triton's import)."""
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import adasplash_tune

    t2 = time.perf_counter()
    clocks = _triton_clocks() if spec.get("breakdown") else None
    batch, heads, n, dim = spec["shape"]
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype).requires_grad_(spec["backward"])
               for _ in range(3))
    if cuda:
        torch.cuda.synchronize()

    def call() -> float:
        start = time.perf_counter()
        out = adasplash_tune.adasplash(q, k, v, ALPHA, spec["causal"])
        if spec["backward"]:
            out.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = call()
    loaded = [m for m in HEAVY_MODULES if m in sys.modules]
    second = call()
    source = adasplash_tune.select("adasplash", q, k, v, ALPHA, spec["causal"]).source  # after: a memo hit
    result = {"import_torch_s": t1 - t0, "import_package_s": t2 - t1, "first_call_s": first,
              "beyond_torch_s": (t2 - t1) + first, "second_call_s": second, "source": source,
              "heavy_modules_after_first_call": loaded}
    if clocks is not None:
        import_triton_s, clocked = clocks
        compile_s = sum(s for _, s in clocked["compiles"])
        build_s = sum(s for n, s in clocked["c_builds"] if not n.endswith(" (aside)"))
        result["breakdown"] = {
            "import_triton_s": import_triton_s, "compile_s": compile_s, "c_build_s": build_s,
            "c_build_aside_s": sum(s for n, s in clocked["c_builds"] if n.endswith(" (aside)")),
            "triton_key_s": sum(s for _, s in clocked["triton_key"]), "rest_s": first - compile_s - build_s,
            "compiles": [[n, round(s, 3)] for n, s in clocked["compiles"]],
            "c_builds": [[n, round(s, 3)] for n, s in clocked["c_builds"]]}
    return result


def _seed_cache(cache: str, shape: list[int], causal: bool, cuda: bool) -> None:
    """Store the default config under the exact key, as a tuned entry would be (a cache hit)."""
    from adasplash_tune.cache.store import Entry, open_store
    from adasplash_tune.device import fingerprint
    from adasplash_tune.kernels.registry import get_spec
    from adasplash_tune.tuner.problems import AttentionProblem

    b, h, n, d = shape
    backend = "triton" if cuda else "torch"
    problem = AttentionProblem(b, h, h, n, d, ALPHA, causal, "bfloat16" if cuda else "float32")
    spec = get_spec("adasplash", backend)
    with open_store(cache) as store:
        store.upsert_best(Entry("adasplash", backend, fingerprint("cuda" if cuda else "cpu").as_dict(),
                                spec.source_hash(), problem.key(backend), spec.default().as_dict(), time_ms=1.0,
                                error=0.0, trials=1, strategy="first-call-bench",
                                provenance={"problem": problem.to_dict()}))


def import_cost() -> dict[str, Any]:
    """``python -X importtime -c 'import torch; import adasplash_tune'``: cumulative seconds of each."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch; import adasplash_tune"],
                          env=_child_env(), capture_output=True, text=True, timeout=300, check=True)
    cumulative = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)
        if match and match.group(2) in ("torch", "adasplash_tune"):
            cumulative[match.group(2)] = int(match.group(1)) / 1e6
    return {"import_torch_s": cumulative.get("torch"), "import_package_beyond_torch_s": cumulative.get("adasplash_tune")}


def first_call_part(cuda: bool, quick: bool, breakdown: bool = False) -> dict[str, Any]:
    cases = [([1, 2, 128, 64], True, True)] if quick else [([4, 16, 4096, 64], True, False),
                                                        ([4, 16, 4096, 64], False, True)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="first-call-") as tmp:
        cache = str(Path(tmp) / "configs.sqlite")
        for i, (shape, causal, backward) in enumerate(cases):
            _seed_cache(cache, shape, causal, cuda)
            env = _child_env(ADASPLASH_TUNE_CACHE=cache, TRITON_CACHE_DIR=str(Path(tmp) / f"triton-{i}"))
            env.pop("ADASPLASH_TUNE_MODE", None)
            spec = {"shape": shape, "causal": causal, "backward": backward}
            row = {"shape": shape, "causal": causal, "backward": backward}
            if cuda:  # the first child compiles into the empty kernel cache, the second reuses it
                row["cold"] = _run_child("first-call", spec, env)
            row["warm"] = _run_child("first-call", spec, env)
            if cuda and breakdown:  # once more warm, then cold, with Triton's work clocked
                row["warm_breakdown"] = _run_child("first-call", dict(spec, breakdown=True), env)
                env["TRITON_CACHE_DIR"] = str(Path(tmp) / f"triton-{i}-breakdown")
                row["cold_breakdown"] = _run_child("first-call", dict(spec, breakdown=True), env)
            rows.append(row)
    return {"cases": rows, "import": import_cost(),
            "note": None if cuda else "CPU: the torch backend compiles nothing, so only the warm case is run"}


def child_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: peak CUDA memory of one call beyond its inputs, after a warm-up call."""
    import torch
    import torch.nn.functional as F

    import adasplash_tune

    batch, heads, n, dim = spec["shape"]
    backward = spec["mode"] == "forward_backward"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_(backward) for _ in range(3))
    grad = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=gen) if backward else None
    if spec["method"] == "adasplash":
        attend = lambda: adasplash_tune.adasplash(q, k, v, ALPHA, True)  # noqa: E731
    else:
        attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731

    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = attend()
        if backward:
            out.backward(grad)
        del out
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run()  # warm-up: compiles, fills the allocator's pools
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    seconds = run()
    return {"peak_beyond_inputs_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
            "inputs_mb": base / 2**20, "seconds": seconds}


def memory_part(cuda: bool, quick: bool) -> dict[str, Any]:
    if not cuda:
        return {"skipped": "needs CUDA (reads the CUDA caching allocator's peak)"}
    shape = [1, 8, 131072, 64]
    rows = []
    for mode in ("forward_backward", "forward"):
        by_method = {m: _run_child("memory", {"shape": shape, "mode": mode, "method": m}, _child_env())
                     for m in ("adasplash", "sdpa")}
        rows.append({"shape": shape, "causal": True, "mode": mode, **by_method,
                     "ratio_to_sdpa": by_method["adasplash"]["peak_beyond_inputs_mb"]
                     / by_method["sdpa"]["peak_beyond_inputs_mb"]})
    return {"cases": rows}


# --------------------------------------------------------------------------- report


def _table(report: dict[str, Any]) -> str:
    lines = [f"device: {report['environment']['device']}  torch {report['environment']['torch']}  "
             f"triton {report['environment']['triton']}  quick={report['quick']}"]
    host = report.get("host")
    if isinstance(host, dict) and "forward" in host:
        lines += ["", f"host time per call, us ({host['clock']}; {host['backend']} backend, "
                  f"attention {tuple(host['attention_shape'])}, entmax {tuple(host['entmax_shape'])}, {host['dtype']})",
                  f"{'case':<25}{'adasplash':>11}{'sdpa/softmax':>14}{'ratio':>8}{'alone':>9}{'null bknd':>10}"
                  f"{'wall ours':>11}{'wall ref':>10}{'triton path':>13}"]
        for case in ("forward", "forward_backward", "forward_backward_packed", "entmax"):
            r = host.get(case)
            if r is None:  # a report from before the packed case
                continue
            alone = "-" if r["backend_alone"] is None else f"{r['backend_alone']['host_us']:.1f}"
            slow = "-" if not r.get("triton_dispatch") else f"{r['triton_dispatch']['host_us']:.1f}"
            lines.append(f"{case:<25}{r['adasplash']['host_us']:>11.1f}{r['sdpa']['host_us']:>14.1f}"
                         f"{r['ratio_to_sdpa']:>8.2f}{alone:>9}{r['api_overhead_us']:>10.1f}"
                         f"{r['adasplash']['wall_us']:>11.1f}{r['sdpa']['wall_us']:>10.1f}{slow:>13}")
    train = report.get("train")
    if isinstance(train, list):
        lines += ["", "training step (forward, backward, AdamW)",
                  f"{'batch x N':<12}{'method':<11}{'step ms':>9}{'ratio':>7}{'peak MB':>10}"]
        for r in train:
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            lines.append(f"{r['batch']} x {r['seq_len']:<8}{r['method']:<11}{r['step_ms']:>9.1f}"
                         f"{r['step_ratio_to_sdpa']:>7.2f}{peak:>10}")
    first = report.get("first-call")
    if isinstance(first, dict) and "cases" in first:
        imp = first["import"]
        lines += ["", f"import torch {imp['import_torch_s']:.2f} s; import adasplash_tune beyond it "
                  f"{imp['import_package_beyond_torch_s']:.3f} s (-X importtime)",
                  "first call in a fresh process, seconds beyond import torch (import + call to its result)"]
        for r in first["cases"]:
            kind = "fwd+bwd" if r["backward"] else "fwd"
            parts = [f"{name} {r[name]['beyond_torch_s']:.2f} (call {r[name]['first_call_s']:.2f}, "
                     f"source {r[name]['source']})" for name in ("cold", "warm") if name in r]
            lines.append(f"  {tuple(r['shape'])} causal={r['causal']} {kind}: " + "; ".join(parts))
            for name in ("warm", "cold"):
                split = r.get(f"{name}_breakdown", {}).get("breakdown")
                if split:
                    kernels = ", ".join(f"{n} {s:.2f}" for n, s in split["compiles"])
                    lines.append(f"    {name}, split: compile {split['compile_s']:.2f} s ({kernels}; Triton's own key "
                                 f"{split['triton_key_s']:.2f}); C builds {split['c_build_s']:.2f} s "
                                 f"(+{split.get('c_build_aside_s', 0):.2f} s aside, overlapped; "
                                 f"{len(split['c_builds'])} in all); rest {split['rest_s']:.2f} s; import triton "
                                 f"{split['import_triton_s']:.2f} s before the clock")
    memory = report.get("memory")
    if isinstance(memory, dict) and "cases" in memory:
        lines += ["", "peak memory beyond the inputs, MB (fresh process each, after a warm-up)"]
        for r in memory["cases"]:
            lines.append(f"  {tuple(r['shape'])} causal {r['mode']}: adasplash "
                         f"{r['adasplash']['peak_beyond_inputs_mb']:.0f}, sdpa {r['sdpa']['peak_beyond_inputs_mb']:.0f} "
                         f"({r['ratio_to_sdpa']:.2f}x)")
    for part in PARTS:
        value = report.get(part)
        if isinstance(value, dict) and ("error" in value or "skipped" in value):
            lines.append(f"{part}: {value.get('error') or value.get('skipped')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes (automatic without CUDA)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed loop (host part)")
    parser.add_argument("--repeats", type=int, default=None, help="timed loops per case (host part)")
    parser.add_argument("--breakdown", action="store_true",
                        help="first-call part: one more warm and cold run with Triton's work clocked")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        run = {"first-call": child_first_call, "memory": child_memory}[kind]
        print(json.dumps(run(json.loads(spec))))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    sys.path.insert(0, str(REPO))
    import torch

    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    calls = args.calls or (20 if quick else 100)
    repeats = args.repeats or (5 if quick else 15)
    report: dict[str, Any] = {"environment": _environment(cuda), "quick": quick,
                              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    runners = {"host": lambda: host_part(cuda, quick, calls, repeats), "train": lambda: train_part(cuda, quick),
               "first-call": lambda: first_call_part(cuda, quick, args.breakdown), "memory": lambda: memory_part(cuda, quick)}
    for part in parts:
        start = time.perf_counter()
        try:
            report[part] = runners[part]()
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            report[part] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        report.setdefault("part_seconds", {})[part] = time.perf_counter() - start
    print(_table(report), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(isinstance(report[p], dict) and "error" in report[p] for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main())
