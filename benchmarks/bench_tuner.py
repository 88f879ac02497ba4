"""Tuner quality study: exhaustive search over a bounded space vs random vs TPE.

For three attention problems the same staged search runs with each strategy on a bounded copy of
the kernel's space (every knob cut to a few choices around its default, accuracy knobs held at
their defaults, at most ``--limit`` points per stage). Reported per run: best time reached
against trials spent (the curve), wall time and trials per minute; and trials per minute of a
random search with and without parallel compile workers (each with an empty Triton cache, so
every config really compiles).

    python benchmarks/bench_tuner.py                 # GPU: Triton kernels (the H200 study)
    python benchmarks/bench_tuner.py --problems 1    # only the second problem (one per GPU, say)
    python benchmarks/bench_tuner.py --merge a.json b.json --out DIR   # one report from parts
    python benchmarks/bench_tuner.py --cpu-smoke     # CPU: torch backend, tiny problems

Random and TPE get ``--fraction`` (default 0.25) of the exhaustive trial count: the target is TPE
within 3% of the exhaustive best in at most a quarter of its trials. The summary also says how far
the default already was, and how much of the default-to-best gap each strategy closed.

Writes ``benchmarks/results/tuner-<device>.json`` and a PNG of the curves (when matplotlib is
importable; otherwise the PNG is skipped with a log line).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

from _tuning_run import run_job

log = logging.getLogger("bench_tuner")

RESULTS = Path(__file__).resolve().parent / "results"


def _throughput_problem(smoke: bool) -> Any:
    """The issue's throughput problem: (4,16,4096,64) non-causal, alpha 1.5, bf16, fwd+bwd."""
    from adasplash_tune.tuner.problems import AttentionProblem

    if smoke:
        return AttentionProblem(1, 2, 2, 96, 32, 1.5, False, "float32")
    return AttentionProblem(4, 16, 16, 4096, 64, 1.5, False, "bfloat16")


def breakdown(run: dict[str, Any]) -> dict[str, float]:
    """Seconds per trial of a run, by where they went: compiling ahead (waiting for the compile
    workers), the timing worker's steps (``first_call`` = compile or load + first run, ``check``,
    ``timing``, ``setup`` = inputs and oracle), its process hop, and the search itself."""
    phases, trials = run.get("phases") or {}, max(1, run["trials"])
    parts = {"compile_ahead": phases.get("compile_wall", 0.0)}
    for name in ("setup", "first_call", "check", "timing"):
        parts[name] = phases.get(f"trial_{name}", 0.0)
    inside = sum(phases.get(f"trial_{n}", 0.0) for n in ("setup", "first_call", "check", "timing"))
    parts["worker_hop"] = max(0.0, phases.get("trial_wall", 0.0) - inside)
    parts["search"] = max(0.0, run.get("search_wall_s", run["wall_s"]) - parts["compile_ahead"]
                          - phases.get("trial_wall", 0.0))
    return {name: round(seconds / trials, 4) for name, seconds in parts.items()}


def _problems(smoke: bool) -> list[Any]:
    from adasplash_tune.tuner.problems import AttentionProblem

    if smoke:
        return [AttentionProblem(1, 2, 2, 96, 32, 1.5, False, "float32"),
                AttentionProblem(1, 2, 1, 160, 32, 1.5, True, "float32"),
                AttentionProblem(1, 1, 1, 256, 16, 2.0, False, "float32")]
    return [AttentionProblem(2, 16, 16, 4096, 64, 1.5, False, "bfloat16"),
            AttentionProblem(2, 16, 16, 8192, 128, 1.5, True, "bfloat16"),
            AttentionProblem(4, 32, 8, 2048, 64, 1.5, True, "bfloat16")]


def bounded_choices(space: Any, limit: int) -> dict[str, tuple]:
    """Each knob cut to <= 3 choices around its default (accuracy knobs: the default only), then
    the widest knobs cut further until every stage has at most ``limit`` points."""
    keep: dict[str, tuple] = {}
    defaults = space.default_values()
    for dim in space.dims:
        if dim.accuracy:
            keep[dim.name] = (defaults[dim.name],)
            continue
        i = dim.choices.index(defaults[dim.name])
        lo = max(0, min(i - 1, len(dim.choices) - 3))
        keep[dim.name] = dim.choices[lo:lo + 3]
    for stage in space.stages:
        names = space.stage_names(stage)
        while math.prod(len(keep[n]) for n in names) > limit:
            widest = max(names, key=lambda n: len(keep[n]))
            if len(keep[widest]) == 1:
                break
            d = defaults[widest]
            # drop the choice farthest from the default
            far = max(keep[widest], key=lambda c: abs(keep[widest].index(c) - keep[widest].index(d))
                      if d in keep[widest] else 0)
            keep[widest] = tuple(c for c in keep[widest] if c != far)
    return keep


def _run(problem: Any, backend: str, device: str, strategy: str, trials: int, restrict: dict, *,
         compile_workers: int, seed: int, fresh_triton_cache: bool) -> dict[str, Any]:
    _, [result], wall = run_job(
        [problem], backend, triton_cache="fresh" if fresh_triton_cache else "keep",
        prefix="bench-tuner-", strategy=strategy, trials=trials, seed=seed, device=device,
        compile_workers=compile_workers, restrict=restrict)
    return {
        "problem": problem.label(), "strategy": strategy, "compile_workers": compile_workers,
        "trials": result.trials, "failures": result.failures, "wall_s": wall,
        "trials_per_min": 60.0 * result.trials / wall if wall > 0 else None,
        "best_ms": result.time_ms, "default_ms": result.default_ms, "config": result.config,
        "curve": [[row.index, row.best] for row in result.trace],
        "phases": dict(result.phases), "search_wall_s": result.wall_s,
    }


def summarize(report: dict[str, Any], within: float = 0.03) -> list[dict[str, Any]]:
    """Per problem and strategy: best time, its ratio to the exhaustive best, the first trial whose
    best was within ``within`` of it, and the share of the default-to-exhaustive gap closed."""
    rows = []
    for problem in report["problems"]:
        runs = [r for r in report["quality"] if r["problem"] == problem["label"]]
        grid = next((r for r in runs if r["strategy"] == "grid" and r["best_ms"]), None)
        if grid is None:
            continue
        best, default = grid["best_ms"], grid["default_ms"]
        gap = default - best if default else None
        for run in runs:
            if not run["best_ms"]:
                continue
            reached = next((i for i, b in run["curve"] if b is not None and b <= best * (1 + within)), None)
            rows.append({
                "problem": problem["label"], "strategy": run["strategy"], "trials": run["trials"],
                "exhaustive_trials": problem["exhaustive_trials"], "best_ms": run["best_ms"],
                "vs_exhaustive": run["best_ms"] / best, "default_ms": run["default_ms"],
                "default_vs_exhaustive": default / best if default else None,
                "trials_to_within": reached,
                "gap_closed": ((run["default_ms"] - run["best_ms"]) / gap) if gap and gap > 0 and run["default_ms"] else None,
                "wall_s": run["wall_s"], "trials_per_min": run["trials_per_min"],
            })
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'problem':<42} {'strategy':<7} {'trials':>9} {'best ms':>8} {'/exh':>6} {'dflt/exh':>8} {'to 3%':>5} {'gap':>5} {'tr/min':>6}"
    lines = [head]
    for r in rows:
        gap = "-" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}"
        lines.append(f"{r['problem']:<42} {r['strategy']:<7} {r['trials']:>4}/{r['exhaustive_trials']:<4} "
                     f"{r['best_ms']:>8.4g} {r['vs_exhaustive']:>6.3f} {r['default_vs_exhaustive'] or float('nan'):>8.3f} "
                     f"{str(r['trials_to_within']):>5} {gap:>5} {r['trials_per_min'] or 0:>6.1f}")
    return "\n".join(lines)


def _merge(paths: list[Path]) -> dict[str, Any]:
    parts = [json.loads(p.read_text()) for p in paths]
    report = {k: v for k, v in parts[0].items() if k not in ("problems", "quality", "throughput", "summary")}
    for key in ("problems", "quality", "throughput"):
        report[key] = [item for part in parts for item in part.get(key, [])]
    return report


def _write(report: dict[str, Any], out: Path, slug: str) -> None:
    report["summary"] = summarize(report)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"tuner-{slug}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log.info("wrote %s", json_path)
    if _plot(report, out / f"tuner-{slug}.png"):
        log.info("wrote %s", out / f"tuner-{slug}.png")
    log.info("summary (/exh: best over the exhaustive best; to 3%%: trials until within 3%% of it; "
             "gap: share of default-to-exhaustive gap closed)\n%s", _table(report["summary"]))


def _plot(report: dict[str, Any], path: Path) -> bool:
    if not report["problems"]:  # a throughput-only run has no quality curves to draw
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not importable; skipping the plot %s", path)
        return False
    labels = [p["label"] for p in report["problems"]]
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for run in report["quality"]:
            if run["problem"] != label or not run["curve"]:
                continue
            xs = [c[0] for c in run["curve"] if c[1] is not None]
            ys = [c[1] for c in run["curve"] if c[1] is not None]
            ax.step(xs, ys, where="post", label=f"{run['strategy']} ({run['trials']} trials)")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel(f"best {report['objective']} time (ms)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="torch backend on the CPU, tiny problems")
    parser.add_argument("--limit", type=int, default=None, help="max points per stage of the bounded space")
    parser.add_argument("--fraction", type=float, default=0.25,
                        help="random/TPE budget as a fraction of the exhaustive trial count")
    parser.add_argument("--throughput-trials", type=int, default=None, help="trials of the compile-throughput runs")
    parser.add_argument("--compile-workers", type=int, default=None, help="parallel compile processes (GPU)")
    parser.add_argument("--throughput-workers", default=None,
                        help="compile-worker counts of the throughput runs (default: 0 and --compile-workers)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the throughput runs, on the (4,16,4096,64) fwd+bwd problem")
    parser.add_argument("--no-throughput", action="store_true", help="only the quality study")
    parser.add_argument("--max-problems", type=int, default=None, help="study only the first N problems")
    parser.add_argument("--problems", default=None, help="study only these problems (0-based indices, e.g. 0,2)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="combine these reports (parts of one study) into one JSON, plot and summary")
    parser.add_argument("--name", default=None, help="file name part (default: from the device name)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("adasplash_tune").setLevel(logging.WARNING)
    if args.merge:
        report = _merge(args.merge)
        _write(report, args.out, args.name or "merged")
        return 0
    import optuna
    import torch

    from adasplash_tune.device import fingerprint
    from adasplash_tune.tuner.options import default_compile_workers
    from adasplash_tune.tuner.space import build_space, device_context, target_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke and not args.cpu_smoke:
        log.warning("no GPU: running the CPU smoke version")
    backend, device = ("torch", "cpu") if smoke else ("triton", "cuda:0")
    limit = args.limit or (8 if smoke else 48)
    workers = args.compile_workers if args.compile_workers is not None else (2 if smoke else default_compile_workers())
    fp = fingerprint(device)
    report: dict[str, Any] = {"device": fp.as_dict(), "backend": backend, "limit": limit, "problems": [],
                              "quality": [], "throughput": [], "objective": None}
    problems = _problems(smoke)[: args.max_problems]
    if args.problems:
        try:
            problems = [problems[int(i)] for i in args.problems.split(",")]
        except (ValueError, IndexError):
            parser.error(f"--problems takes indices 0..{len(problems) - 1}, got {args.problems!r}")
    counts = ([int(c) for c in args.throughput_workers.split(",")] if args.throughput_workers
              else [0, workers])

    def bounded_space(problem: Any) -> tuple[Any, dict, int]:
        space = build_space("adasplash", backend, target=target_of(backend, fp),
                            context={**problem.context(), **device_context(fp)})
        restrict = bounded_choices(space, limit)
        bounded = space.restrict(restrict)
        exhaustive = sum(len(list(bounded.iter_valid(bounded.free_names(bounded.stage_names(s)),
                                                     bounded.default_values()))) for s in bounded.stages)
        report["objective"] = "fwd+bwd" if "bwd" in space.stages else "fwd"
        return space, restrict, exhaustive

    for problem in ([] if args.throughput_only else problems):
        space, restrict, exhaustive = bounded_space(problem)
        budget = max(2, int(round(args.fraction * exhaustive)))
        report["problems"].append({"label": problem.label(), "problem": problem.to_dict(),
                                   "bounded": {k: list(v) for k, v in restrict.items()},
                                   "exhaustive_trials": exhaustive})
        for strategy, trials in (("grid", exhaustive), ("random", budget), ("tpe", budget)):
            log.info("%s: %s, %d trials", problem.label(), strategy, trials)
            run = _run(problem, backend, device, strategy, trials, restrict, compile_workers=0,
                       seed=args.seed, fresh_triton_cache=False)
            report["quality"].append(run)
            log.info("  best %.4g ms after %d trials, %.1f trials/min", run["best_ms"] or float("nan"),
                     run["trials"], run["trials_per_min"] or 0.0)
    if not args.no_throughput:
        problem = _throughput_problem(smoke)
        _, restrict, exhaustive = bounded_space(problem)
        n = args.throughput_trials or min(exhaustive, 8 if smoke else 24)
        for cw in counts:
            run = _run(problem, backend, device, "random", n, restrict, compile_workers=cw, seed=args.seed + 1,
                       fresh_triton_cache=True)
            run["per_trial_s"] = breakdown(run)
            report["throughput"].append(run)
            log.info("%s: %d compile workers: %.1f trials/min; seconds per trial %s", problem.label(), cw,
                     run["trials_per_min"] or 0.0, run["per_trial_s"])
    slug = args.name or re.sub(r"[^a-z0-9]+", "-", fp.name.lower()).strip("-") + ("-cpu-smoke" if smoke else "")
    _write(report, args.out, slug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
