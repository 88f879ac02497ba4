"""Tuning throughput with one evaluation worker per GPU (``tune --gpus``): trials per minute for
1, 2, 4, ... GPUs of one host on the same problems, budget and seed.

Each run starts from an empty study, an empty cache and (by default) an empty Triton cache, so
every candidate really compiles, as on a first tuning run; ``--warm-triton`` shares one Triton
cache that a first pass fills (timing only). Reported per GPU count: trials, wall time,
trials per minute, speed-up over one GPU, trials timed on each GPU, and the best time found.

    python benchmarks/bench_multi_gpu.py                   # GPU: Triton kernels, 1..all GPUs
    python benchmarks/bench_multi_gpu.py --gpus 1,2,4      # chosen GPU counts
    python benchmarks/bench_multi_gpu.py --cpu-smoke       # CPU: torch backend, "cpu" x 1 and x 2

Writes ``benchmarks/results/multi-gpu-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from _tuning_run import run_job

log = logging.getLogger("bench_multi_gpu")

RESULTS = Path(__file__).resolve().parent / "results"


def _problems(smoke: bool) -> list[Any]:
    from adasplash_tune.tuner.problems import AttentionProblem

    if smoke:
        return [AttentionProblem(1, 2, 1, 96, 32, 1.5, True, "float32")]
    # four problems of similar cost: with several problems ``--gpus`` spreads whole problems
    return [AttentionProblem(2, 16, 16, 2048, d, 1.5, causal, "bfloat16")
            for d in (64, 128) for causal in (False, True)]


def _run(problems: list[Any], backend: str, devices: tuple[str, ...], trials: int, *, seed: int,
         compile_workers: int, triton_cache: str | None) -> dict[str, Any]:
    job, results, wall = run_job(problems, backend, triton_cache=triton_cache or "fresh", prefix="bench-multi-gpu-",
                                 strategy="random", trials=trials, seed=seed, devices=devices,
                                 compile_workers=compile_workers)
    done = sum(r.evaluated for r in results)
    return {
        "gpus": len(devices), "devices": list(devices), "trials": done, "wall_s": wall,
        "trials_per_min": 60.0 * done / wall if wall > 0 else None, "per_device": job.device_usage or [done],
        "failures": sum(r.failures for r in results),
        "best": [{"problem": r.problem.label(), "status": r.status, "time_ms": r.time_ms, "config": r.config}
                 for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help='torch backend, devices "cpu" x 1 and x 2')
    parser.add_argument("--gpus", default=None, help="comma list of GPU counts (default: 1, 2, 4, ... up to all)")
    parser.add_argument("--trials", type=int, default=None, help="trials per problem (default 12; smoke 8)")
    parser.add_argument("--compile-workers", type=int, default=None, help="parallel compile processes")
    parser.add_argument("--warm-triton", action="store_true", help="share one pre-filled Triton cache")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("adasplash_tune").setLevel(logging.WARNING)
    import optuna
    import torch

    from adasplash_tune.device import fingerprint
    from adasplash_tune.tuner.options import default_compile_workers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke and not args.cpu_smoke:
        log.warning("no GPU: running the CPU smoke version")
    visible = 2 if smoke else torch.cuda.device_count()
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else \
        [c for c in (1, 2, 4, 8) if c <= visible] + ([visible] if visible not in (1, 2, 4, 8) else [])
    if any(c < 1 or c > visible for c in counts):
        parser.error(f"GPU counts must be within 1..{visible}")
    backend = "torch" if smoke else "triton"
    trials = args.trials or (8 if smoke else 12)
    workers = args.compile_workers
    if workers is None:
        workers = 0 if smoke else default_compile_workers()
    problems = _problems(smoke)
    fp = fingerprint("cpu" if smoke else "cuda:0")
    shared = None
    if args.warm_triton and not smoke:
        shared = tempfile.mkdtemp(prefix="bench-multi-gpu-triton-")
        log.info("filling the Triton cache %s (one GPU)", shared)
        _run(problems, backend, ("cuda:0",), trials, seed=args.seed, compile_workers=workers, triton_cache=shared)
    # the worker server (which imports torch once) starts with the first job: not part of any run
    first = ("cpu",) if smoke else ("cuda:0",)
    _run(problems[:1], backend, first, 1, seed=args.seed, compile_workers=0, triton_cache=shared)
    report: dict[str, Any] = {"device": fp.as_dict(), "backend": backend, "trials_per_problem": trials,
                              "problems": [p.to_dict() for p in problems], "compile_workers": workers,
                              "triton_cache": "warm" if shared else "cold", "runs": []}
    for count in counts:
        devices = ("cpu",) * count if smoke else tuple(f"cuda:{i}" for i in range(count))
        log.info("%d device(s): %s", count, ", ".join(devices))
        run = _run(problems, backend, devices, trials, seed=args.seed, compile_workers=workers, triton_cache=shared)
        base = report["runs"][0]["trials_per_min"] if report["runs"] else run["trials_per_min"]
        run["speedup"] = run["trials_per_min"] / base if base and run["trials_per_min"] else None
        report["runs"].append(run)
        log.info("  %d trials in %.1f s: %.1f trials/min (x%.2f), per device %s", run["trials"], run["wall_s"],
                 run["trials_per_min"] or 0.0, run["speedup"] or 0.0, run["per_device"])
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", fp.name.lower()).strip("-") + ("-cpu-smoke" if smoke else "")
    path = args.out / f"multi-gpu-{slug}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
