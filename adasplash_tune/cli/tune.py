"""``adasplash-tune tune``: tune problems on this machine and write the best configs to the cache.

With no flags it tunes a small default problem set: on a GPU the Triton kernels at training
sizes, on a CPU-only machine the torch backend at small sizes (a couple of minutes on 2 cores).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import click

from . import CliError
from .problem_options import build_problems, problem_options, resolve_backend

log = logging.getLogger("adasplash_tune")

__all__ = ["register", "tune", "format_summary"]

CACHE_HELP = "Cache path or SQLAlchemy URL (overrides ADASPLASH_TUNE_CACHE)."

#: Default problem sets and trial budgets: (kernel, on a GPU?) -> settings.
_DEFAULTS: dict[tuple[str, bool], dict[str, Any]] = {
    ("adasplash", True): {"seq_len": (1024, 2048, 4096, 8192), "head_dim": (64, 128), "batch": 2,
                          "heads": 16, "alpha": (1.5,), "dtype": "bfloat16", "trials": 60},
    ("adasplash", False): {"seq_len": (128, 512), "head_dim": (64,), "batch": 1, "heads": 2,
                           "alpha": (1.5,), "dtype": "float32", "trials": 12},
    ("entmax", True): {"rows": (4096,), "cols": (1024, 4096, 16384), "alpha": (1.5,), "dtype": "bfloat16",
                       "trials": 40},
    ("entmax", False): {"rows": (256,), "cols": (128, 512), "alpha": (1.5,), "dtype": "float32", "trials": 12},
}


def register(main: click.Group) -> None:
    main.add_command(tune)


def _gpu_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        gpus = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of GPU indices, got {value!r}") from None
    if not gpus or any(g < 0 for g in gpus):
        raise click.BadParameter(f"expected GPU indices >= 0, got {value!r}")
    if len(set(gpus)) != len(gpus):
        raise click.BadParameter(f"GPU indices repeat in {value!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise click.BadParameter("no CUDA/ROCm GPU on this machine")
    missing = [g for g in gpus if g >= count]
    if missing:
        raise click.BadParameter(f"GPU {missing[0]} does not exist (this machine has {count})")
    return gpus



def _space_list(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
    """``("niter=2,3,8", "fwd_warps=4")`` -> {"niter": (2, 3, 8), "fwd_warps": (4,)} (values parsed
    as JSON numbers where they are numbers, else kept as text)."""
    out: dict[str, tuple[Any, ...]] = {}
    for item in value:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name or not raw.strip():
            raise click.BadParameter(f"expected KNOB=V1,V2,..., got {item!r}")
        choices = []
        for token in (t.strip() for t in raw.split(",") if t.strip()):
            try:
                choices.append(json.loads(token))
            except ValueError:
                choices.append(token)
        out[name] = tuple(choices)
    return out


def _check_space_knobs(kernel: str, backend: str, device: str, space: dict[str, tuple[Any, ...]]) -> None:
    """A usage error naming a ``--space`` knob the kernel does not have, with the known ones."""
    if not space:
        return
    from ..device import fingerprint
    from ..tuner.space import build_space, target_of

    full = build_space(kernel, backend, target=target_of(backend, fingerprint(device).as_dict()))
    known = full.names
    unknown = [name for name in space if name not in known]
    if unknown:
        raise click.BadParameter(f"unknown knob {unknown[0]!r} for {kernel} ({backend}); known knobs: "
                                 f"{', '.join(known)}", param_hint="'--space'")
    for name, values in space.items():
        allowed = full.dim(name).choices
        bad = [v for v in values if v not in allowed or isinstance(v, bool) != isinstance(allowed[0], bool)]
        if bad:
            raise click.BadParameter(f"{name}={','.join(map(str, bad))}: not a choice of {name} for {kernel} "
                                     f"({backend}); choices: {', '.join(map(str, allowed))}", param_hint="'--space'")


def _sqlite_file(location: str) -> Path | None:
    """The file behind a cache or storage location (a path or ``sqlite:///`` URL); None for
    in-memory databases and database servers."""
    from ..cache.locations import is_url

    if not is_url(location):
        return Path(location).expanduser()
    from sqlalchemy.engine import make_url

    try:
        url = make_url(location)
    except Exception:  # noqa: BLE001 - a bad URL is reported when it is opened
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or url.query.get("mode") == "memory":
        return None
    return Path(url.database).expanduser()


def _check_writable(location: str, what: str) -> None:
    """Fail before any tuning, naming the file, when the results could not be written there
    (a read-only file, or a folder where its journal cannot be made). Database servers are not
    checked here. ``os.access`` answers for the real user; the open probe catches what it misses
    (e.g. a read-only mount)."""
    import os

    path = _sqlite_file(location)
    if path is None:
        return
    path = path.absolute()
    if path.is_file():
        reason = None if os.access(path, os.W_OK) else "read-only"
        if reason is None:
            try:
                with open(path, "r+b"):
                    pass
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
        if reason is not None:
            raise CliError(f"{path}: the {what} is not writable ({reason}); nothing was tuned")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"{path}: the {what} cannot be written in {folder} (read-only folder); nothing was tuned")


# --------------------------------------------------------------------------- output


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _short_config(config: dict[str, Any] | None) -> str:
    if not config:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(config.items()))


#: How the trials column names each kind of rejected trial (other statuses print as they are).
_FAILURE_WORDS = {"accuracy": "inaccurate"}


def _trials_cell(result: Any) -> str:
    """"12", or "12 (3 inaccurate, 1 timeout)": gate rejections and crashes told apart."""
    if not result.failures:
        return str(result.trials)
    parts = [f"{n} {_FAILURE_WORDS.get(kind, kind)}" for kind, n in result.failure_kinds.most_common()]
    return f"{result.trials} ({', '.join(parts)})"


def format_summary(results: Sequence[Any]) -> str:
    """The end-of-run table: problem, status, best config, time, default, speed-up, error, trials."""
    from .cache_cmds import format_table

    headers = ["problem", "status", "best config", "time ms", "default ms", "speed-up", "error", "trials"]
    rows = []
    for r in results:
        speedup = r.speedup
        rows.append([r.problem.label(), r.status, _short_config(r.config), _fmt(r.time_ms), _fmt(r.default_ms),
                     "-" if speedup is None else f"{speedup:.2f}x", _fmt(r.error, ".2e"),
                     _trials_cell(r)])
    return format_table(headers, rows)


def _format_front(result: Any) -> str:
    from .cache_cmds import format_table

    rows = [[_short_config(p["config"]), _fmt(p["time_ms"]), _fmt(p["error"], ".2e"),
             "yes" if p["ok"] else "no"] for p in result.front]
    return format_table(["config", "time ms", "error", "within tolerance"], rows)


class _Progress:
    """Progress on stderr: on a terminal one line rewritten in place (problem i/n, stage, trial j/k,
    best so far); a permanent line per finished problem, also when stderr is a log file. Events may
    come from several device threads (``--gpus``): each finished problem still prints once."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.live = False

    def _width(self) -> int:
        import shutil

        return max(20, shutil.get_terminal_size().columns - 1)

    def __call__(self, event: Any) -> None:
        head = f"[{event.problem_index}/{event.problems}] {event.label}"
        if event.stage == "done":
            line = f"{head}: {event.trial} trials, best {_fmt(event.best_ms)} ms"
            if event.status != "tuned":
                line += f" ({event.status})"
            click.echo(("\r" + line.ljust(self._width())) if self.tty else line, err=True)
            self.live = False
        elif self.tty:
            line = f"{head}  stage {event.stage}  trial {event.trial}/{event.trials}  best {_fmt(event.best_ms)} ms"
            click.echo("\r" + line[:self._width()].ljust(self._width()), err=True, nl=False)
            self.live = True

    def close(self) -> None:
        if self.tty and self.live:
            click.echo("", err=True)


# --------------------------------------------------------------------------- the command


@click.command()
@problem_options
@click.option("--strategy", type=click.Choice(["tpe", "random", "grid", "cmaes", "nsga2"]), default="tpe",
              show_default=True, help="Search strategy; nsga2 explores the time x error Pareto front of the "
              "accuracy knobs.")
@click.option("--trials", type=click.IntRange(min=1), help="Evaluated configs per problem, split over the stages "
              "(default: 60 on a GPU, 12 on a CPU).")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), help="Seconds for the whole run.")
@click.option("--cache", default=None, help=CACHE_HELP)
@click.option("--from-record", type=click.Path(exists=True, dir_okay=False),
              help="Tune the problems in an ADASPLASH_TUNE_RECORD file, most frequent first.")
@click.option("--inputs", "inputs_spec", default=None, metavar="SPEC",
              help="adasplash: what trials are timed and accuracy-gated on: randn, randn:S (q x S), local:S "
              "(sink + local band, sparser as S grows), a mix of those joined by + (each trial timed on every "
              "family, geometric mean: e.g. randn+randn:16+local:2), or recorded (the samples an "
              "ADASPLASH_TUNE_RECORD_SAMPLES run saved; with --from-record). Default: randn, or with "
              "--from-record each problem's recorded sample when it has one.")
@click.option("--gpus", callback=_gpu_list, help="GPU indices, comma list: one evaluation worker per GPU (several "
              "problems are spread over the GPUs; one problem's trials are timed on all of them), one "
              "study storage and one cache (the GPUs must be the same model; default: GPU 0).")
@click.option("--storage", default=None, help="Optuna storage URL for the studies (default: studies.sqlite "
              "beside the cache). Re-running the same command resumes from it; tuners on several hosts "
              "pointed at one database server share the trials.")
@click.option("--space", "space", multiple=True, callback=_space_list, metavar="KNOB=V1,V2",
              help="Bound the search space: KNOB keeps only the listed choices (repeatable; see the knobs "
              "and their choices with --debug or in the kernel declarations).")
@click.option("--confirm", type=click.IntRange(min=0), default=3, show_default=True,
              help="Re-time the winner and the default alternately this many times each at the end; the "
              "winner is stored only if its median beats the default's (0: store the search's fastest).")
@click.option("--seed", type=int, default=None, help="Seed for inputs and samplers (default: fresh).")
@click.option("--backward/--forward-only", default=None,
              help="Tune forward+backward time (default: when the kernel declares backward knobs).")
@click.option("--compile-workers", type=click.IntRange(min=0), default=None,
              help="Parallel compile processes (default: one per CPU core, up to 16, for triton on a GPU; else 0).")
@click.option("--trial-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds one trial may take before its worker is killed.")
@click.option("--skip-tuned", is_flag=True,
              help="Skip problems the cache already holds a finished entry for (duel-confirmed, this device, "
              "this kernel code, tuned on the same inputs): resumes a campaign from its cache alone, e.g. "
              "after importing an earlier session's export.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def tune(kernel: str, backend: str, seq_len, head_dim, batch, heads, kv_heads, alpha, causal_mode, varlen,
         dtype, rows, cols, strategy, trials, time_budget, cache, from_record, inputs_spec, gpus, storage, space,
         confirm, seed, backward, compile_workers, trial_timeout, skip_tuned, as_json) -> None:
    """Tune problems on this machine and write the best configs to the cache."""
    import optuna
    import torch

    from ..cache.locations import user_cache_location
    from ..cache.store import StoreError, open_store
    from ..tuner.job import TuneJob, TuneOptions
    from ..tuner.options import default_compile_workers
    from ..tuner.problems import dedupe, problems_from_record
    from ..tuner.studies import default_storage_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    has_gpu = torch.cuda.is_available()
    backend = resolve_backend(backend, has_gpu)
    devices = tuple(f"cuda:{g}" for g in gpus) if gpus else (("cuda:0",) if has_gpu else ("cpu",))
    if from_record:
        try:
            recorded = problems_from_record(from_record, kernel)
        except OSError as exc:
            raise CliError(f"cannot read {from_record}: {exc}") from None
        problems = [p for p, _ in recorded]
        if not problems:
            raise CliError(f"{from_record} holds no {kernel} problems")
    else:
        problems = build_problems(kernel, has_gpu, _DEFAULTS[(kernel, has_gpu)], {
            "seq_len": seq_len, "head_dim": head_dim, "batch": batch, "heads": heads, "kv_heads": kv_heads,
            "alpha": alpha, "causal_mode": causal_mode, "varlen": varlen, "dtype": dtype, "rows": rows,
            "cols": cols,
        })
    problems = dedupe(_with_inputs(problems, kernel, inputs_spec, bool(from_record)), backend)
    _check_space_knobs(kernel, backend, devices[0], space)
    _check_writable(user_cache_location(cache), "cache")
    _check_writable(storage or default_storage_url(cache), "study storage")
    if compile_workers is None:
        compile_workers = default_compile_workers() if (backend == "triton" and has_gpu) else 0
    options = TuneOptions(
        strategy=strategy, trials=trials or _DEFAULTS[(kernel, has_gpu)]["trials"], time_budget=time_budget,
        seed=seed, backward=backward, storage=storage, cache=cache, devices=devices,
        compile_workers=compile_workers, trial_timeout=trial_timeout, restrict=space, confirm=confirm,
    )
    try:
        store = open_store(cache)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    progress = _Progress()
    try:
        with store:
            if skip_tuned:
                problems = _untuned(problems, store, kernel, backend, devices[0])
                if not problems:
                    click.echo("every problem already has a finished entry in the cache (--skip-tuned)")
                    return
            job = TuneJob(problems, kernel=kernel, backend=backend, store=store, options=options, progress=progress)
            results = job.run()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    finally:
        progress.close()
    from ..cache.locations import display_location

    _report(results, as_json, display_location(store.location),
            display_location(options.storage or default_storage_url(cache)))
    if not any(r.status == "tuned" for r in results):
        raise CliError("no valid config found for any problem (see the failures with --debug)")


def _with_inputs(problems: list[Any], kernel: str, spec: str | None, from_record: bool) -> list[Any]:
    """The problems on the inputs ``--inputs`` names (None: as built, recorded samples included)."""
    from dataclasses import replace

    from ..tuner.inputs import split_inputs

    if spec is None:
        return problems
    if kernel != "adasplash":
        raise click.UsageError("--inputs applies to --kernel adasplash (entmax tunes on randn rows)")
    if spec == "recorded":
        if not from_record:
            raise click.UsageError("--inputs recorded needs --from-record FILE (the samples are named there)")
        kept = [p for p in problems if p.inputs.startswith("recorded:")]
        if not kept:
            raise CliError("the record holds no input samples: record with ADASPLASH_TUNE_RECORD_SAMPLES=DIR set")
        if len(kept) < len(problems):
            log.warning("--inputs recorded: %d of %d recorded problems have no sample and are skipped",
                        len(problems) - len(kept), len(problems))
        return kept
    try:
        split_inputs(spec)
    except ValueError as exc:
        raise click.UsageError(f"--inputs: {exc}") from None
    return [replace(p, inputs=spec) for p in problems]


def _untuned(problems: list[Any], store: Any, kernel: str, backend: str, device: str) -> list[Any]:
    """The problems without a finished entry (duel-confirmed, same device, kernel code and inputs)."""
    from ..device import fingerprint
    from ..kernels.registry import get_spec
    from ..tuner.cache_writer import is_confirmed
    from ..tuner.inputs import inputs_label

    device_id = fingerprint(device).device_id
    kernel_hash = get_spec(kernel, backend).source_hash()
    left = []
    for problem in problems:
        entry = store.get_exact(device_id, kernel, backend, kernel_hash, problem.key(backend))
        inputs = inputs_label(getattr(problem, "inputs", "randn"))
        if entry is not None and is_confirmed(entry) and entry.provenance.get("inputs", "randn") == inputs:
            log.info("%s: already tuned (%.4g ms), skipped", problem.label(), entry.time_ms or float("nan"))
        else:
            left.append(problem)
    if len(left) < len(problems):
        click.echo(f"--skip-tuned: {len(problems) - len(left)} of {len(problems)} problems already tuned", err=True)
    return left


def _report(results: Sequence[Any], as_json: bool, location: str, storage: str) -> None:
    if as_json:
        click.echo(json.dumps([{
            "problem": r.problem.to_dict(), "key": r.key, "status": r.status, "config": r.config,
            "time_ms": r.time_ms, "spread_ms": r.spread_ms, "default_ms": r.default_ms, "speedup": r.speedup,
            "error": r.error, "grad_error": r.grad_error, "trials": r.trials, "evaluated": r.evaluated,
            "failures": r.failures, "failure_kinds": dict(r.failure_kinds), "objective": r.objective,
            "stored": r.stored, "confirmed": r.confirmed,
            "front": r.front,
        } for r in results], indent=2, default=str))
        return
    click.echo(format_summary(results))
    for r in results:
        if r.front:
            click.echo(f"\nPareto front (time x error) for {r.problem.label()}:")
            click.echo(_format_front(r))
    stored = sum(r.stored for r in results)
    objective = results[0].objective if results else "fwd"
    click.echo(f"\ntimes are {objective} medians; {stored} entr{'y' if stored == 1 else 'ies'} written to {location}")
    click.echo(f"trials are kept in {storage}: re-running the same command resumes them")
