"""Timing one callable: warm-up, then many reps; median and spread.

CUDA: events around each rep, with the L2 cache flushed (a buffer twice its size is rewritten)
before every rep, so no rep reads what the previous one left in cache. A spin kernel is queued
ahead of each rep, lasting twice the host's measured dispatch time of one call, so that the
device is still busy while Python issues the rep's launches: the events then time the kernels,
not the dispatch (which, for a 0.1 ms kernel or a small forward+backward step, would otherwise be
most of the reading and hide the differences between configs). The dispatch time itself is
reported as ``host_ms``: a call is host-bound when it exceeds ``median_ms``.
CPU: ``perf_counter``.

Reps run in rounds; after each round the reading stops early once it is stable: the median's
95% interval (the box plot's notch, +-1.57 IQR / sqrt(reps)) within ``stable`` of the median
(``TimingOptions.stable``; 0 runs every rep the budget allows).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["TimingOptions", "Timing", "measure"]

_DEFAULT_L2_BYTES = 64 << 20

#: Least GPU clock cycles of the spin kernel queued before each CUDA rep (~0.5 ms at 2 GHz).
_SPIN_CYCLES = 1_000_000
#: Most spin cycles (~0.1 s at 2 GHz), whatever the dispatch time.
_SPIN_CYCLES_MAX = 200_000_000
#: Cycles per millisecond the spin is sized with (2 GHz; a slower clock only spins longer).
_CYCLES_PER_MS = 2_000_000


def _spin_cycles(host_ms: float) -> int:
    """Spin long enough to cover twice the host's dispatch time of one call."""
    return int(min(_SPIN_CYCLES_MAX, max(_SPIN_CYCLES, 2.0 * host_ms * _CYCLES_PER_MS)))


@dataclass(frozen=True)
class TimingOptions:
    """How long to warm up and measure (milliseconds of device time), and the rep bounds."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 5
    max_reps: int = 500
    #: Stop once the median's 95% interval is within this fraction of it (checked every
    #: ``ROUND_REPS`` reps, from ``2 * ROUND_REPS`` on); 0: every rep of the ``rep_ms`` budget.
    stable: float = 0.005

    def to_dict(self) -> dict[str, float]:
        return {"warmup_ms": self.warmup_ms, "rep_ms": self.rep_ms, "min_reps": self.min_reps,
                "max_reps": self.max_reps, "stable": self.stable}


#: Reps per round between stability checks.
ROUND_REPS = 10


def is_stable(times: list[float], stable: float) -> bool:
    """Whether the median of ``times`` is known to within ``stable`` (relative, 95% notch)."""
    if stable <= 0 or len(times) < 2 * ROUND_REPS:
        return False
    q1, median, q3 = statistics.quantiles(times, n=4)
    return median > 0 and 1.57 * (q3 - q1) / math.sqrt(len(times)) <= stable * median


def _rounds(n: int, min_reps: int) -> list[int]:
    """Rep counts of the rounds that make up ``n`` reps (the first at least ``min_reps``)."""
    first = min(n, max(min_reps, 2 * ROUND_REPS))
    return [first] + [min(ROUND_REPS, n - done) for done in range(first, n, ROUND_REPS)]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    spread_ms: float  # interquartile range of the reps
    reps: int
    host_ms: float | None = None  # CUDA: the host's dispatch time of one call (median)


def _summary(times: list[float]) -> Timing:
    times = sorted(times)
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
        spread = q3 - q1
    else:
        spread = times[-1] - times[0]
    return Timing(statistics.median(times), spread, len(times))


def _reps(estimate_ms: float, budget_ms: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, budget_ms / max(estimate_ms, 1e-3))))


def _measure_cpu(fn: Callable[[], object], opts: TimingOptions) -> Timing:
    # warm up for warmup_ms of wall time (at least two calls: the first one is often cold)
    begin = time.perf_counter()
    estimate, calls = 0.0, 0
    while calls < opts.max_reps and (calls < 2 or (time.perf_counter() - begin) * 1e3 < opts.warmup_ms):
        start = time.perf_counter()
        fn()
        estimate = (time.perf_counter() - start) * 1e3
        calls += 1
    times: list[float] = []
    for size in _rounds(_reps(estimate, opts.rep_ms, opts.min_reps, opts.max_reps), opts.min_reps):
        for _ in range(size):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        if is_stable(times, opts.stable):
            break
    return _summary(times)


def _l2_bytes(device) -> int:
    import torch

    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or _DEFAULT_L2_BYTES)


def _measure_cuda(fn: Callable[[], object], device, opts: TimingOptions) -> Timing:
    import torch

    flush = torch.empty(2 * _l2_bytes(device) // 4, dtype=torch.int32, device=device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    host = []
    begin.record()
    for _ in range(3):  # launches are asynchronous: perf_counter sees the host's dispatch alone
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1e3)
    end.record()
    torch.cuda.synchronize(device)
    estimate = begin.elapsed_time(end) / 3
    host_ms = statistics.median(host)
    spin = _spin_cycles(host_ms)
    for _ in range(_reps(estimate, opts.warmup_ms, 1, opts.max_reps)):
        fn()
    times: list[float] = []
    for size in _rounds(_reps(estimate, opts.rep_ms, opts.min_reps, opts.max_reps), opts.min_reps):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(size)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(size)]
        for i in range(size):
            torch.cuda._sleep(spin)
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times += [s.elapsed_time(e) for s, e in zip(starts, ends)]
        if is_stable(times, opts.stable):
            break
    timing = _summary(times)
    return Timing(timing.median_ms, timing.spread_ms, timing.reps, host_ms)


def measure(fn: Callable[[], object], device: str = "cpu", options: TimingOptions | None = None) -> Timing:
    """Median and spread (ms) of ``fn()`` on ``device`` ('cpu' or a CUDA device string)."""
    opts = options or TimingOptions()
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return _measure_cuda(fn, dev, opts)
    return _measure_cpu(fn, opts)
