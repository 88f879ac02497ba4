"""The value of tuning, measured on problems nobody tuned on.

A held-out grid (sequence lengths and head dims off the campaign's grid, and input families the
campaign did not time) is timed with three configs per problem: the default, the one the call
would select from the caches (user -> shipped -> nearest -> default), and the best single fixed
config -- of every distinct config in the cache under test plus the default, the one fastest in
geometric mean over the whole grid. The per-problem fastest candidate bounds what selection among
these configs could gain. Every reading passes the same fp64 accuracy gate as a tuning
trial (``tuner.worker``); forward+backward medians.

    python benchmarks/bench_tuning_value.py --cache campaign/cache.sqlite      # GPU
    python benchmarks/bench_tuning_value.py --cpu-smoke                        # CPU, torch backend

Writes ``tuning-value-<name>.json``: per problem the three times, and the geometric means of
default / tuned and best-fixed / tuned (the issue's targets: >= 1.3 and >= 1.15).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_tuning_value")

RESULTS = Path(__file__).resolve().parent / "results"


def held_out(smoke: bool, families: list[str]) -> list[Any]:
    """Shapes off the campaign grid (N not a power of two, D = 96), each input family."""
    from adasplash_tune.tuner.problems import AttentionProblem

    if smoke:
        shapes = [(1, 2, 80, 16, True), (1, 2, 120, 24, False)]
        return [AttentionProblem(b, h, h, n, d, 1.5, c, "float32", inputs=f) for b, h, n, d, c in shapes
                for f in families]
    shapes = [(2, 16, 3000, 64, True), (2, 16, 3000, 96, True), (1, 16, 12000, 64, True),
              (1, 16, 12000, 96, True), (2, 16, 6000, 64, False)]
    return [AttentionProblem(b, h, h, n, d, 1.5, c, "bfloat16", inputs=f) for b, h, n, d, c in shapes
            for f in families]


def selected_config(problem: Any, backend: str, device: str) -> tuple[dict[str, Any], str]:
    """(config, source) the call on ``problem``'s shape would select (nothing is run)."""
    import torch

    import adasplash_tune

    dt = getattr(torch, problem.dtype)
    q = torch.empty(problem.batch, problem.heads, problem.seq_len, problem.head_dim, dtype=dt, device=device)
    kv = torch.empty(problem.batch, problem.kv_heads, problem.seq_len, problem.head_dim, dtype=dt, device=device)
    sel = adasplash_tune.select("adasplash", q, kv, kv, alpha=problem.alpha, is_causal=problem.causal,
                                backend=backend)
    return dict(sel.config), sel.source


def candidates(cache: str | None, backend: str, default: dict[str, Any]) -> list[dict[str, Any]]:
    """The default, then every distinct config of the cache's attention entries for ``backend``."""
    out = [dict(default)]
    if cache:
        from adasplash_tune.cache.store import open_store

        with open_store(cache) as store:
            for entry in store.entries(kernel="adasplash"):
                config = {**default, **dict(entry.config)}
                if entry.backend == backend and not entry.failed_verify and config not in out:
                    out.append(config)
    return out


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="the tuned cache under test (also its configs are the "
                        "fixed-config candidates); default: the shipped caches only")
    parser.add_argument("--families", default="randn,randn:16,local:2", help="input families, comma list")
    parser.add_argument("--cpu-smoke", action="store_true", help="torch backend on the CPU, tiny problems")
    parser.add_argument("--max-candidates", type=int, default=16, help="fixed-config candidates at most")
    parser.add_argument("--name", default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from adasplash_tune.kernels.registry import get_spec
    from adasplash_tune.tuner.evaluate import Evaluator, TrialRequest
    from adasplash_tune.tuner.timing import TimingOptions

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    backend, device = ("torch", "cpu") if smoke else ("triton", "cuda:0")
    timing = TimingOptions(warmup_ms=5.0, rep_ms=20.0, min_reps=3, max_reps=50) if smoke else TimingOptions()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    problems = held_out(smoke, families)
    default = get_spec("adasplash", backend).default().as_dict()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ADASPLASH_TUNE_CACHE"] = args.cache or str(Path(tmp) / "empty.sqlite")
        pool = candidates(args.cache, backend, default)[: args.max_candidates]
        rows: list[dict[str, Any]] = []
        with Evaluator(device, in_process=True) as ev:
            for problem in problems:
                config, source = selected_config(problem, backend, device)
                if config not in pool:
                    pool.append(config)
                times = {}
                for index, candidate in enumerate(pool):
                    result = ev.evaluate(TrialRequest(problem, backend, candidate, backward=True, seed=args.seed,
                                                      timing=timing))
                    times[index] = result.time_ms if result.ok else None
                    if not result.ok:
                        log.info("  %s: candidate %d %s (%s)", problem.label(), index, result.status, result.detail)
                tuned = times[pool.index(config)]
                rows.append({"problem": problem.label(), "inputs": problem.inputs, "source": source,
                             "tuned_ms": tuned, "default_ms": times[0], "times": times})
                log.info("%s: tuned (%s) %s ms, default %s ms", problem.label(), source, tuned, times[0])
    # the best fixed config: fastest in geometric mean over the problems every candidate ran on
    usable = [i for i in range(len(pool)) if all(r["times"].get(i) for r in rows)]
    if not usable:
        log.warning("no candidate passed the gate on every problem: no best fixed config")
    best = min(usable, key=lambda i: geomean([r["times"][i] for r in rows])) if usable else None
    for r in rows:
        r["best_fixed_ms"] = r["times"][best] if best is not None else None
        r["per_problem_best_ms"] = min((t for t in r["times"].values() if t), default=None)
    rows_ok = [r for r in rows if r["tuned_ms"] and r["default_ms"] and r["best_fixed_ms"]]
    summary = {
        # headroom: what picking the fastest candidate for each problem would give over the default
        "default_over_per_problem_best": geomean([r["default_ms"] / r["per_problem_best_ms"] for r in rows_ok]),
        "default_over_tuned": geomean([r["default_ms"] / r["tuned_ms"] for r in rows_ok]),
        "best_fixed_over_tuned": geomean([r["best_fixed_ms"] / r["tuned_ms"] for r in rows_ok]),
        "problems_compared": len(rows_ok),
        "best_fixed_index": best, "candidates": len(pool), "problems": len(rows),
    }
    for family in families:
        sub = [r for r in rows_ok if r["inputs"] == family]
        summary[f"default_over_tuned[{family}]"] = geomean([r["default_ms"] / r["tuned_ms"] for r in sub])
        summary[f"best_fixed_over_tuned[{family}]"] = geomean([r["best_fixed_ms"] / r["tuned_ms"] for r in sub])
    report = {"device": torch.cuda.get_device_name(0) if not smoke else "cpu", "backend": backend,
              "cache": args.cache, "families": families, "candidates": pool, "rows": rows, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("cpu-smoke" if smoke else "h200")
    path = args.out / f"tuning-value-{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log.info("wrote %s\n%s", path, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
