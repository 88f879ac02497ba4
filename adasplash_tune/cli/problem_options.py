"""Problem options shared by ``tune`` and ``bench``: shapes, alphas, causality, dtype."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from . import CliError

__all__ = ["problem_options", "build_problems", "resolve_backend", "check_problem_options"]


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


#: Option name -> the kernel it describes (the other options apply to both kernels).
_KERNEL_OF_OPTION = {
    "seq_len": "adasplash", "head_dim": "adasplash", "batch": "adasplash", "heads": "adasplash",
    "kv_heads": "adasplash", "causal_mode": "adasplash", "varlen": "adasplash",
    "rows": "entmax", "cols": "entmax",
}
_SHAPE_OPTIONS = ("seq_len", "head_dim", "batch", "heads", "kv_heads", "alpha", "causal_mode", "varlen", "dtype",
                  "rows", "cols")


def _flag(name: str, values: dict[str, Any]) -> str:
    """The command-line spelling of option ``name`` as given (``causal_mode``: the flag used)."""
    return "--" + (values[name] if name == "causal_mode" else name.replace("_", "-"))


def _causal_mode(causal: bool, non_causal: bool, both: bool) -> str | None:
    """The one of --causal, --non-causal, --both given (None: none); two of them: a usage error."""
    given = [mode for mode, on in (("causal", causal), ("non-causal", non_causal), ("both", both)) if on]
    if len(given) > 1:
        raise click.UsageError(f"--{given[0]} and --{given[1]} contradict each other; give one of "
                               "--causal, --non-causal, --both")
    return given[0] if given else None


def check_problem_options(kernel: str, values: dict[str, Any], *, source: str | None = None) -> None:
    """Usage errors for shape options that would be ignored: another kernel's options, or any
    shape option beside ``source`` (the option naming a file that gives the problems)."""
    given = [name for name in _SHAPE_OPTIONS if values.get(name) not in (None, False)]
    if source and given:
        raise click.UsageError(f"{_flag(given[0], values)} cannot be combined with {source}: the file gives "
                               "the problems")
    foreign = [name for name in given if _KERNEL_OF_OPTION.get(name, kernel) != kernel]
    if foreign:
        own = [f"--{n.replace('_', '-')}" for n, k in _KERNEL_OF_OPTION.items() if k == kernel and n != "causal_mode"]
        if kernel == "adasplash":
            own.append("--causal/--non-causal/--both")
        raise click.UsageError(f"{', '.join(_flag(n, values) for n in foreign)} "
                               f"do{'es' if len(foreign) == 1 else ''} not apply to --kernel {kernel} "
                               f"(its shape options: {', '.join(own)}, --alpha, --dtype)")


def problem_options(command: Callable) -> Callable:
    """The options that describe which problems a command works on. The command receives
    ``causal_mode`` ("causal", "non-causal", "both" or None) in place of the three flags, and
    options of the other kernel are usage errors."""
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
        click.option("--causal", is_flag=True, help="Causal attention only."),
        click.option("--non-causal", is_flag=True, help="Non-causal only (default)."),
        click.option("--both", is_flag=True, help="Causal and non-causal."),
        click.option("--varlen", is_flag=True, help="The variable-length (padded) variant (adasplash)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     help="Input dtype (default: bfloat16 on a GPU, float32 on a CPU)."),
        click.option("--rows", callback=_int_list, help="Rows, comma list (entmax)."),
        click.option("--cols", callback=_int_list, help="Row lengths, comma list (entmax)."),
    ]

    @functools.wraps(command)
    def checked(*args: Any, **kwargs: Any) -> Any:
        kwargs["causal_mode"] = _causal_mode(kwargs.pop("causal"), kwargs.pop("non_causal"), kwargs.pop("both"))
        source = next((f"--{n.replace('_', '-')}" for n in ("from_record", "from_json") if kwargs.get(n)), None)
        check_problem_options(kwargs["kernel"], kwargs, source=source)
        return command(*args, **kwargs)

    for option in reversed(options):
        checked = option(checked)
    return checked
