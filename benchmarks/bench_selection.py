"""Cost of call-time config selection (no GPU needed: CPU tensors, torch backend).

Measures
  * warm: the per-call cost once a call signature has been seen (memo hit), for the selection
    inside ``adasplash()`` / ``entmax()``, for the public ``select()`` (which also validates its
    inputs) and for ``cache.loader.resolve`` on its own memo;
  * cold: the first lookup of a key against a user cache of ``--entries`` entries written with
    the store: with the store still closed (open + exact query), with the store open (exact
    query; nearest query for an unseen sequence length).

    python benchmarks/bench_selection.py --out benchmarks/results/cpu-selection.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

TARGET_WARM_US = 2.0


def _per_call_us(fn: Callable[[], Any], calls: int, repeats: int) -> dict[str, float]:
    """Per-call microseconds over ``repeats`` loops of ``calls`` calls: median and best loop."""
    loops = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter_ns() - start) / calls / 1e3)
    return {"median_us": statistics.median(loops), "min_us": min(loops), "calls": calls,
            "repeats": repeats}


def _summary(samples_us: list[float]) -> dict[str, float]:
    ordered = sorted(samples_us)
    return {"median_us": statistics.median(ordered), "min_us": ordered[0],
            "p90_us": ordered[int(0.9 * (len(ordered) - 1))], "samples": len(ordered)}


def _keys(count: int) -> list[dict[str, Any]]:
    from adasplash_tune.kernels.problem import attention_key

    grid = itertools.product(
        ("float16", "bfloat16", "float32"), (64, 128, 96, 80, 32, 256), (True, False),
        (1.5, 2.0, 1.25), (1, 2, 4, 8), (False, True),
        [2 ** i for i in range(4, 17)], [2 ** i for i in range(0, 10)],
    )
    keys = []
    for dtype, head_dim, causal, alpha, gqa, varlen, seq, bh in grid:
        keys.append(attention_key(backend="torch", dtype=dtype, batch=1, q_heads=bh * gqa,
                                  kv_heads=bh, seq_len=seq, head_dim=head_dim, alpha=alpha,
                                  causal=causal, varlen=varlen))
        if len(keys) == count:
            break
    # bh was folded into q_heads above; keep only distinct keys
    unique = {json.dumps(k, sort_keys=True): k for k in keys}
    return list(unique.values())


def _write_cache(path: str, n_entries: int, seed: int) -> tuple[list[dict[str, Any]], float]:
    from adasplash_tune.cache.store import Entry, open_store
    from adasplash_tune.device import fingerprint
    from adasplash_tune.kernels.registry import get_spec

    rng = random.Random(seed)
    spec = get_spec("adasplash", "torch")
    digest, device = spec.source_hash(), fingerprint("cpu").as_dict()
    keys = _keys(n_entries * 2)[:n_entries]
    entries = [Entry("adasplash", "torch", device, digest, key,
                     {p.name: rng.choice(p.choices) for p in spec.params},
                     time_ms=rng.uniform(0.05, 20.0), error=rng.uniform(1e-7, 1e-4),
                     trials=rng.randint(1, 100), strategy="tpe") for key in keys]
    start = time.perf_counter()
    with open_store(path) as store:
        report = store.upsert_many(entries)
        assert report.added == len(entries), report
    return keys, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", type=int, default=30, help="cold lookups to sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-selection-")
    os.environ["ADASPLASH_TUNE_CACHE"] = os.path.join(tmp, "configs.sqlite")
    os.environ.pop("ADASPLASH_TUNE_RECORD", None)
    os.environ.pop("ADASPLASH_TUNE_MODE", None)

    import adasplash_tune
    from adasplash_tune import api, selection
    from adasplash_tune.cache import loader, locations
    from adasplash_tune.kernels.registry import get_spec

    locations.SHIPPED_DIR = Path(tmp) / "no-shipped"  # measure the user cache alone
    keys, write_s = _write_cache(os.environ["ADASPLASH_TUNE_CACHE"], args.entries, args.seed)
    spec, cpu = get_spec("adasplash", "torch"), torch.device("cpu")
    rng = random.Random(args.seed + 1)

    # ---------------------------------------------------------------- cold lookups
    names = ("first_lookup_store_closed", "first_nearest_store_open", "new_key_exact_store_open",
             "new_key_nearest_store_open")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.cold):
        api.clear_memo()  # forget selections and close the store
        exact_a, exact_b, far_a, far_b = rng.sample(keys, 4)
        plan = [(exact_a, "cache"), (dict(far_a, seq=2 ** 24), "nearest"),
                (exact_b, "cache"), (dict(far_b, seq=2 ** 24), "nearest")]
        for name, (key, expected) in zip(names, plan):
            start = time.perf_counter_ns()
            _, source = loader.resolve(spec, key, cpu)
            samples[name].append((time.perf_counter_ns() - start) / 1e3)
            assert source == expected, (name, source)

    # ---------------------------------------------------------------- warm calls
    api.clear_memo()
    q = torch.randn(2, 8, 1000, 64, dtype=torch.float16)
    k = torch.randn(2, 2, 1000, 64, dtype=torch.float16)
    x = torch.randn(64, 777)
    first = adasplash_tune.select("adasplash", q, k, k, alpha=1.5, is_causal=True, backend="torch")
    assert first.source in ("cache", "nearest"), first.source
    adasplash_tune.select("entmax", x, alpha=1.5, backend="torch")
    key = first.key
    loader.resolve(spec, key, cpu)
    warm = {
        "adasplash_call_selection": _per_call_us(
            lambda: selection.attention_selection(q, k, 1.5, True, False, "torch"),
            args.calls, args.repeats),
        "entmax_call_selection": _per_call_us(
            lambda: selection.entmax_selection(x, 1.5, 1, "torch"), args.calls, args.repeats),
        "select_adasplash_public": _per_call_us(
            lambda: adasplash_tune.select("adasplash", q, k, k, alpha=1.5, is_causal=True,
                                          backend="torch"),
            args.calls // 10, args.repeats),
        "loader_resolve_memo_hit": _per_call_us(
            lambda: loader.resolve(spec, key, cpu), args.calls // 10, args.repeats),
    }
    hot = warm["adasplash_call_selection"]["median_us"]
    result = {
        "benchmark": "selection",
        "description": "per-call cost of call-time config selection (warm memo) and first-lookup "
                       "cost against a cache of N entries written with the store",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": os.getloadavg()[0]},
        "versions": {"adasplash_tune": adasplash_tune.__version__, "torch": torch.__version__,
                     "sqlalchemy": __import__("sqlalchemy").__version__},
        "cache": {"entries": len(keys), "backend": "sqlite file (WAL)", "write_s": write_s},
        "first_selection_source": first.source,
        "cold_us": {name: _summary(values) for name, values in samples.items()},
        "cold_notes": "first_lookup_store_closed opens the store (engine, schema check) and "
                      "compiles the exact query; first_nearest compiles the nearest query; "
                      "new_key_* are later first lookups of other keys in the same process",
        "warm_us": warm,
        "target_warm_us": TARGET_WARM_US,
        "meets_target": hot <= TARGET_WARM_US,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    api.clear_memo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
