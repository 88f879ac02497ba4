"""First-call latency: a fresh process's first ``adasplash(...)`` call with a cache hit.

Each measurement starts a new Python process, which imports the package, builds inputs, and times
its first call to the result (compile included): once with an empty Triton kernel cache (cold)
and once reusing it (warm). The user cache holds an entry for the exact problem key, so the call
selects it (source "cache") and nothing is timed or tuned at call time.

    python benchmarks/bench_first_call.py --out benchmarks/results/h200-first-call.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import logging, torch, adasplash_tune
logging.basicConfig(level=logging.DEBUG if "FIRST_CALL_DEBUG" in __import__("os").environ else logging.WARNING)
t_import = time.perf_counter() - t0
B, H, N, D, causal, backward = {shape}
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device="cpu").manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, generator=g).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32)
           for _ in range(3))
for t in (q, k, v):
    t.requires_grad_(backward)
if dev == "cuda":
    torch.cuda.synchronize()
sel = adasplash_tune.select("adasplash", q, k, v, 1.5, causal)
t1 = time.perf_counter()
out = adasplash_tune.adasplash(q, k, v, 1.5, causal)
if backward:
    out.sum().backward()
if dev == "cuda":
    torch.cuda.synchronize()
t_call = time.perf_counter() - t1
t2 = time.perf_counter()
out = adasplash_tune.adasplash(q, k, v, 1.5, causal)
if dev == "cuda":
    torch.cuda.synchronize()
t_second = time.perf_counter() - t2
print(json.dumps({{"import_s": t_import, "first_call_s": t_call, "second_call_s": t_second,
                  "source": sel.source, "process_s": time.perf_counter() - t0}}))
"""


def _seed_cache(cache: str, shape: tuple) -> None:
    """Store the default config under the exact key, as a tuned entry would be."""
    import torch

    from adasplash_tune.cache.store import Entry, open_store
    from adasplash_tune.device import fingerprint
    from adasplash_tune.kernels.registry import get_spec
    from adasplash_tune.tuner.problems import AttentionProblem

    b, h, n, d, causal, _ = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "triton" if dev == "cuda" else "torch"
    problem = AttentionProblem(b, h, h, n, d, 1.5, causal, "bfloat16" if dev == "cuda" else "float32")
    spec = get_spec("adasplash", backend)
    with open_store(cache) as store:
        store.upsert_best(Entry("adasplash", backend, fingerprint(dev).as_dict(), spec.source_hash(),
                                problem.key(backend), spec.default().as_dict(), time_ms=1.0, error=0.0,
                                trials=1, strategy="first-call-bench", provenance={"problem": problem.to_dict()}))


def _child(shape: tuple, env: dict) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(shape=repr(shape))], env=env, stdout=subprocess.PIPE,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (torch backend)")
    args = parser.parse_args()
    shapes = [(1, 2, 128, 64, True, True)] if args.cpu_smoke else [
        (4, 16, 4096, 64, True, False), (4, 16, 4096, 64, False, True)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="first-call-") as tmp:
        env = dict(os.environ, ADASPLASH_TUNE_CACHE=str(Path(tmp) / "configs.sqlite"))
        for i, shape in enumerate(shapes):
            _seed_cache(env["ADASPLASH_TUNE_CACHE"], shape)
            env["TRITON_CACHE_DIR"] = str(Path(tmp) / f"triton-{i}")
            cold = _child(shape, env)
            warm = _child(shape, env)
            rows.append({"shape": list(shape[:4]), "causal": shape[4], "backward": shape[5], "cold": cold,
                         "warm": warm})
            print(f"{shape}: cold first call {cold['first_call_s']:.2f} s (process {cold['wall_s']:.2f} s, "
                  f"source {cold['source']}), warm first call {warm['first_call_s']:.2f} s", flush=True)
    if args.out:
        import torch

        env_info = {"torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        args.out.write_text(json.dumps({"environment": env_info, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
