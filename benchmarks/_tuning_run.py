"""Shared by bench_tuner.py and bench_multi_gpu.py: one timed tuning job in a throw-away workspace.

Each run gets an empty study storage and an empty config cache; its Triton kernel cache is an
empty one (``triton_cache="fresh"``: every candidate really compiles), the process's own
(``"keep"``: warm across runs) or a given folder. The final duel
against the default (``TuneOptions.confirm``) is off: these benchmarks measure the search alone
(its trials per minute and the best it reaches), and the duel's re-timings are not trials.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence


def timing_for(device: str) -> Any:
    """The tuner's default timing on a GPU; shorter reps for the CPU smoke runs."""
    from adasplash_tune.tuner.timing import TimingOptions

    if device.startswith("cuda"):
        return TimingOptions()
    return TimingOptions(warmup_ms=5.0, rep_ms=30.0, min_reps=5, max_reps=100)


def run_job(problems: Sequence[Any], backend: str, *, triton_cache: str = "fresh",
            prefix: str = "bench-tuning-", **options: Any) -> tuple[Any, list[Any], float]:
    """(job, results, wall seconds) of one ``TuneJob`` over ``problems`` with ``TuneOptions(**options)``
    (``timing`` defaults to :func:`timing_for` the first device)."""
    from adasplash_tune.cache.store import open_store
    from adasplash_tune.tuner.job import TuneJob, TuneOptions

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        old = os.environ.get("TRITON_CACHE_DIR")
        if triton_cache != "keep":
            os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton") if triton_cache == "fresh" else triton_cache
        try:
            opts = TuneOptions(storage=f"sqlite:///{tmp}/studies.sqlite", confirm=0, **options)
            if "timing" not in options:
                opts.timing = timing_for(opts.device_list[0])
            with open_store(str(Path(tmp) / "cache.sqlite")) as store:
                job = TuneJob(list(problems), kernel="adasplash", backend=backend, store=store, options=opts)
                start = time.monotonic()
                results = job.run()
                wall = time.monotonic() - start
        finally:
            if old is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old
    return job, results, wall
