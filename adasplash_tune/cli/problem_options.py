"""Problem options shared by ``tune`` and ``bench``: shapes, alphas, causality, dtype."""

from __future__ import annotations

from typing import Any, Callable

import click

from . import CliError

__all__ = ["problem_options", "build_problems", "resolve_backend"]


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of integers, got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return items


def _alpha_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of numbers, got {value!r}") from None
    bad = [a for a in items if not 1.0 < a <= 2.0]
    if not items or bad:
        raise click.BadParameter(f"alpha must be in (1, 2], got {value!r}")
    return items


def resolve_backend(backend: str, has_gpu: bool) -> str:
    import os

    if backend == "auto":
        return "triton" if has_gpu else "torch"
    if backend == "triton" and not has_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise CliError("--backend triton needs a GPU (or TRITON_INTERPRET=1 for the slow interpreter); "
                       "use --backend torch on a CPU")
    return backend


def build_problems(kernel: str, has_gpu: bool, defaults: dict[str, Any], opts: dict[str, Any]) -> list[Any]:
    """Problems from the option values; unset options take ``defaults``."""
    from ..tuner.problems import AttentionProblem, EntmaxProblem

    dtype = opts["dtype"] or defaults["dtype"]
    alphas = opts["alpha"] or defaults["alpha"]
    if kernel == "entmax":
        rows = opts["rows"] or defaults["rows"]
        cols = opts["cols"] or defaults["cols"]
        return [EntmaxProblem(rows=r, cols=c, alpha=a, dtype=dtype) for r in rows for c in cols for a in alphas]
    heads = opts["heads"] or defaults["heads"]
    kv_heads = opts["kv_heads"] or heads
    if heads % kv_heads:
        raise click.BadParameter(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
    causal_mode = opts["causal_mode"] or "non-causal"
    causals = {"causal": (True,), "non-causal": (False,), "both": (False, True)}[causal_mode]
    try:
        return [
            AttentionProblem(batch=opts["batch"] or defaults["batch"], heads=heads, kv_heads=kv_heads,
                             seq_len=n, head_dim=d, alpha=a, causal=c, dtype=dtype, varlen=opts["varlen"])
            for n in (opts["seq_len"] or defaults["seq_len"])
            for d in (opts["head_dim"] or defaults["head_dim"])
            for a in alphas for c in causals
        ]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None




def problem_options(command: Callable) -> Callable:
    """The options that describe which problems a command works on."""
    options = [
        click.option("--kernel", type=click.Choice(["adasplash", "entmax"]), default="adasplash", show_default=True),
        click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
                     help="auto: triton on a GPU, torch otherwise."),
        click.option("--seq-len", callback=_int_list, help="Sequence lengths, comma list (adasplash)."),
        click.option("--head-dim", callback=_int_list, help="Head dims, comma list (adasplash)."),
        click.option("--batch", type=click.IntRange(min=1), help="Batch size (adasplash)."),
        click.option("--heads", type=click.IntRange(min=1), help="Query heads (adasplash)."),
        click.option("--kv-heads", type=click.IntRange(min=1), help="Key/value heads (default: --heads)."),
        click.option("--alpha", callback=_alpha_list, help="Alphas in (1, 2], comma list."),
        click.option("--causal", "causal_mode", flag_value="causal", help="Causal attention only."),
        click.option("--non-causal", "causal_mode", flag_value="non-causal", help="Non-causal only (default)."),
        click.option("--both", "causal_mode", flag_value="both", help="Causal and non-causal."),
        click.option("--varlen", is_flag=True, help="The variable-length (padded) variant (adasplash)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     help="Input dtype (default: bfloat16 on a GPU, float32 on a CPU)."),
        click.option("--rows", callback=_int_list, help="Rows, comma list (entmax)."),
        click.option("--cols", callback=_int_list, help="Row lengths, comma list (entmax)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
