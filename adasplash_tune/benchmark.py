"""Side-by-side timing of one problem under several methods (what ``adasplash-tune bench`` runs).

Methods: ``selected`` (the config the loader picks for the call, source included), ``default``
(the declared default), ``upstream`` (the ``adasplash`` package, when installed and on CUDA) and
``sdpa`` / ``softmax`` (dense PyTorch attention / softmax: the speed a user gives up for sparsity).
Each is timed forward and forward+backward with the tuner's timing (events, L2 flushed, median).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

from .tuner.problems import AttentionProblem, EntmaxProblem, Problem
from .tuner.timing import TimingOptions, measure

__all__ = ["BenchRow", "bench_problem", "bench_problems", "default_problems", "plot_rows"]

log = logging.getLogger("adasplash_tune")


@dataclass
class BenchRow:
    problem: dict[str, Any]
    label: str
    method: str
    passes: str  # "fwd" or "fwd+bwd"
    time_ms: float | None
    spread_ms: float | None
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    host_ms: float | None = None  # the host's dispatch time of one call (CUDA; above time_ms: host-bound)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_problems(kernel: str, device: str) -> list[Problem]:
    """A small grid on CPU; the anchor-like grid on a GPU."""
    if kernel == "entmax":
        if device == "cpu":
            return [EntmaxProblem(rows=64, cols=c, alpha=1.5, dtype="float32") for c in (128, 512)]
        return [EntmaxProblem(rows=r, cols=c, alpha=1.5, dtype="bfloat16") for r, c in ((4096, 8192), (8192, 1024))]
    if device == "cpu":
        return [AttentionProblem(1, 2, 2, n, 64, 1.5, causal, "float32") for n in (128, 256) for causal in (False, True)]
    return [
        AttentionProblem(b, 16, 16, n, d, 1.5, causal, "bfloat16")
        for (b, n) in ((4, 1024), (4, 4096), (1, 16384)) for d in (64, 128) for causal in (False, True)
    ]


def _upstream() -> Any | None:
    try:
        import adasplash  # the upstream package, for comparison only

        return adasplash
    except Exception:
        return None


@dataclass
class _Method:
    name: str
    run: Callable[[dict], Any]
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    probe: Callable[[dict], Any] | None = None  # -> Selection, for the "selected" method


def _methods(problem: Problem, backend: str, device: str, with_upstream: bool, with_dense: bool) -> list[_Method]:
    """Every method that applies to ``problem`` on this device."""
    from . import adasplash, entmax, select
    from .kernels.registry import get_spec

    default = get_spec(problem.kernel, backend).default().as_dict()
    if isinstance(problem, EntmaxProblem):
        a = problem.alpha
        methods = [
            _Method("selected", lambda x: entmax(x["x"], a, backend=backend),
                    probe=lambda x: select("entmax", x["x"], a, backend=backend)),
            _Method("default", lambda x: entmax(x["x"], a, backend=backend, config=default), "default", default),
        ]
        if with_dense:
            methods.append(_Method("softmax", lambda x: torch.softmax(x["x"], dim=-1)))
        return methods

    p = problem

    def call(x: dict, **kw: Any) -> Any:
        return adasplash(x["q"], x["k"], x["v"], p.alpha, p.causal, x["varlen"], backend=backend, **kw)

    methods = [
        _Method("selected", call,
                probe=lambda x: select("adasplash", x["q"], x["k"], x["v"], p.alpha, p.causal, x["varlen"], backend=backend)),
        _Method("default", lambda x: call(x, config=default), "default", default),
    ]
    ups = _upstream() if with_upstream and device != "cpu" else None
    if ups is not None and p.kv_heads == p.heads and not p.varlen:
        if p.causal and p.alpha == 1.5:
            methods.append(_Method("upstream-v2", lambda x: ups.adasplash_v2(x["q"], x["k"], x["v"])))
        methods.append(_Method("upstream-v1", lambda x: ups.adasplash_v1(x["q"], x["k"], x["v"], alpha=p.alpha,
                                                                          is_causal=p.causal)))
    if with_dense:
        gqa = p.kv_heads != p.heads
        methods.append(_Method("sdpa", lambda x: torch.nn.functional.scaled_dot_product_attention(
            x["q"], x["k"], x["v"], is_causal=p.causal, enable_gqa=gqa)))
    return methods


def bench_problem(problem: Problem, *, backend: str, device: str, backward: bool = True,
                  with_upstream: bool = True, with_dense: bool = True,
                  options: TimingOptions | None = None, seed: int = 0) -> list[BenchRow]:
    """Time every applicable method on ``problem`` (forward, and forward+backward if asked)."""
    inputs = problem.make_inputs(device, seed, requires_grad=backward)
    grad = inputs["grad"]
    tensors = problem.grad_inputs(inputs)
    rows: list[BenchRow] = []
    for method in _methods(problem, backend, device, with_upstream, with_dense):
        name, run, source, config, note = method.name, method.run, method.source, method.config, ""
        if method.probe is not None:
            sel = method.probe(inputs)
            source, config = sel.source, dict(sel.config)
        try:
            start = time.perf_counter()
            with torch.no_grad():
                run(inputs)
            if device != "cpu":
                torch.cuda.synchronize()
            first = time.perf_counter() - start
            if first > 5.0:
                note = f"first call {first:.1f} s"
            with torch.no_grad():
                fwd = measure(lambda: run(inputs), device, options)
            rows.append(BenchRow(problem.to_dict(), problem.label(), name, "fwd", fwd.median_ms, fwd.spread_ms,
                                 source, config, note, fwd.host_ms))
            if backward:
                def step():
                    out = run(inputs)
                    torch.autograd.grad(out, tensors, grad)

                both = measure(step, device, options)
                rows.append(BenchRow(problem.to_dict(), problem.label(), name, "fwd+bwd", both.median_ms,
                                     both.spread_ms, source, config, note, both.host_ms))
        except Exception as exc:  # one failing method must not end the comparison
            log.warning("bench %s / %s failed: %s", problem.label(), name, exc)
            rows.append(BenchRow(problem.to_dict(), problem.label(), name, "fwd", None, None, source, config,
                                 f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))
    return rows


def bench_problems(problems: Iterable[Problem], **kwargs: Any) -> list[BenchRow]:
    rows: list[BenchRow] = []
    for problem in problems:
        rows.extend(bench_problem(problem, **kwargs))
    return rows


def speedups(rows: list[BenchRow]) -> dict[str, float]:
    """Geometric-mean speed-up of 'selected' over 'default', per pass kind."""
    out: dict[str, float] = {}
    for passes in ("fwd", "fwd+bwd"):
        ratios = []
        for label in {r.label for r in rows}:
            t = {r.method: r.time_ms for r in rows if r.label == label and r.passes == passes}
            if t.get("selected") and t.get("default"):
                ratios.append(t["default"] / t["selected"])
        if ratios:
            out[passes] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return out


def plot_rows(rows: list[dict[str, Any]], path: str) -> None:
    """Time vs N, log scale: one panel per (head dim, causal) and pass kind (a grid of rows by
    head dim x causal, columns by pass), one line per method and alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = [r for r in rows if r["problem"].get("kernel") == "adasplash" and r["time_ms"]]
    if not att:
        raise ValueError("no attention timings to plot")
    groups = sorted({(r["problem"]["head_dim"], r["problem"]["causal"]) for r in att})
    passes_all = sorted({r["passes"] for r in att})
    alphas = sorted({r["problem"]["alpha"] for r in att})
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(len(groups), len(passes_all), figsize=(5.0 * len(passes_all), 3.4 * len(groups)),
                             squeeze=False)
    for row, (d, causal) in enumerate(groups):
        for col, passes in enumerate(passes_all):
            ax = axes[row][col]
            sub = [r for r in att if (r["problem"]["head_dim"], r["problem"]["causal"], r["passes"]) ==
                   (d, causal, passes)]
            for m_index, method in enumerate(sorted({r["method"] for r in sub})):
                for a_index, alpha in enumerate(alphas):
                    pts = sorted((r["problem"]["seq_len"], r["time_ms"]) for r in sub
                                 if r["method"] == method and r["problem"]["alpha"] == alpha)
                    if not pts:
                        continue
                    dense = method in ("sdpa", "softmax")  # alpha does not apply to them
                    if dense and a_index > 0:
                        continue
                    label = method if dense or len(alphas) == 1 else f"{method} a={alpha:g}"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                            color=f"C{m_index}", linestyle=styles[0 if dense else a_index % len(styles)],
                            label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"D={d} {'causal' if causal else 'non-causal'} {passes}", fontsize=9)
            ax.set_xlabel("N")
            ax.set_ylabel("ms")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
