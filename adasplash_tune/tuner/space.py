"""Search spaces derived from a kernel's declaration, the backend target and the problem.

The spec (``kernels.registry.get_spec``) is the one list of a kernel's knobs. The space takes its
params and constraints as they are and layers on top only what belongs to the target:

* ``rocm``: extra launch knobs per kernel launch (``waves_per_eu``, ``matrix_instr_nonkdim``),
  one pair for every ``*warps`` param of the spec, plus AMD rules (64-wide wavefronts, shallow
  pipelines, MFMA tile divisibility);
* ``cuda`` / ``rocm``: a lower bound on shared memory per block against the device limit;
* any target, torch backend: chunk sizes at or beyond the extent they chunk are one equivalence
  class, so only the smallest such choice is kept.

Everything is pruned here, before any compile. Stages (which params a search step leaves free)
come from the param names: ``fwd_*`` forward, ``bwd_*`` backward, every other param the tau / mask
stage; a spec without forward/backward params has the single stage ``all``.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..kernels.registry import get_spec
from ..kernels.spec import KernelSpec

__all__ = [
    "Dimension", "Rule", "SearchSpace", "build_space", "target_of", "device_context", "TARGETS",
    "STAGE_ORDER", "stage_of",
]

TARGETS = ("cuda", "rocm", "cpu")
STAGE_ORDER = ("tau", "fwd", "bwd", "all")

#: Torch-backend chunk knobs and the problem extent each one chunks.
_CHUNK_EXTENT = {"q_chunk": "seq_len", "k_chunk": "seq_len", "row_chunk": "rows"}

_ROCM_WAVES_PER_EU = (0, 1, 2, 4)
_ROCM_NONKDIM = (0, 16, 32)
_ROCM_MAX_STAGES = 2
_ROCM_MAX_THREADS = 1024
_ROCM_WAVEFRONT = 64


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Dimension:
    """One searchable knob: its (pruned) choices, default, stage and where it was declared."""

    name: str
    choices: tuple[Any, ...]
    default: Any
    stage: str
    accuracy: bool = False
    origin: str = "spec"  # "spec" or the target that added it ("rocm")

    @property
    def numeric(self) -> bool:
        return all(_is_number(c) for c in self.choices)

    def nearest(self, value: Any) -> Any:
        """``value`` itself if allowed, else the closest choice (log scale for positive numbers)."""
        if value in self.choices:
            return value
        if _is_number(value) and self.numeric:
            def dist(c: Any) -> tuple[float, float]:
                if value > 0 and c > 0:
                    return (abs(math.log2(c) - math.log2(value)), -c)
                return (abs(c - value), -c)

            return min(self.choices, key=dist)
        return self.default if self.default in self.choices else self.choices[0]

    def distribution(self):
        """Optuna distribution: the index over the choices (ordered for tiles and counts; the same
        encoding for every strategy, so a study can be resumed with another one)."""
        from optuna.distributions import IntDistribution

        return IntDistribution(0, len(self.choices) - 1)

    def encode(self, value: Any) -> int:
        return self.choices.index(value)

    def decode(self, param: Any) -> Any:
        return self.choices[int(param)]


@dataclass(frozen=True)
class Rule:
    """A target-specific constraint layered on the spec's (same contract as ``Constraint.check``)."""

    params: tuple[str, ...]
    doc: str
    check: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


def stage_of(name: str) -> str:
    if name.startswith("fwd_"):
        return "fwd"
    if name.startswith("bwd_"):
        return "bwd"
    return "tau"


def target_of(backend: str, fingerprint: Any = None) -> str:
    """The target a backend runs on: the fingerprint's 'cuda'/'rocm'/'cpu' (``cpu`` without one)."""
    if fingerprint is None:
        return "cpu"
    kind = fingerprint["backend"] if isinstance(fingerprint, Mapping) else fingerprint.backend
    if kind not in TARGETS:
        raise ValueError(f"unknown device backend {kind!r}; expected one of {list(TARGETS)}")
    return kind


def device_context(fingerprint: Any) -> dict[str, Any]:
    """Device facts the constraints may use (``max_shared_mem`` when the device reports one)."""
    if fingerprint is None:
        return {}
    smem = fingerprint["shared_mem"] if isinstance(fingerprint, Mapping) else fingerprint.shared_mem
    return {"max_shared_mem": int(smem)} if smem else {}


class SearchSpace:
    """The knobs of one kernel on one backend and target, pruned for one problem context."""

    def __init__(
        self,
        spec: KernelSpec,
        target: str,
        context: Mapping[str, Any],
        dims: Sequence[Dimension],
        rules: Sequence[Rule] = (),
    ) -> None:
        self.spec = spec
        self.target = target
        self.context = dict(context)
        self.dims = tuple(dims)
        self.rules = tuple(rules)
        self._by_name = {d.name: d for d in self.dims}
        self._spec_names = frozenset(spec.names)

    # ------------------------------------------------------------------ description

    @property
    def kernel(self) -> str:
        return self.spec.kernel

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    def dim(self, name: str) -> Dimension:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"{self.kernel} ({self.backend}/{self.target}) has no knob {name!r}; "
                             f"knobs: {list(self.names)}") from None

    @property
    def stages(self) -> tuple[str, ...]:
        present = {d.stage for d in self.dims}
        return tuple(s for s in STAGE_ORDER if s in present)

    def stage_names(self, stage: str) -> tuple[str, ...]:
        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r}; this space has {list(self.stages)}")
        return tuple(d.name for d in self.dims if d.stage == stage)

    @property
    def accuracy_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims if d.accuracy)

    def free_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """The names among ``names`` with more than one choice (the others are fixed anyway)."""
        return tuple(n for n in names if len(self.dim(n).choices) > 1)

    def size(self, names: Sequence[str] | None = None) -> int:
        """Points in the Cartesian product over ``names`` (all knobs by default), before pruning."""
        names = self.names if names is None else names
        return math.prod(len(self.dim(n).choices) for n in names)

    def describe(self) -> str:
        lines = [f"{self.kernel} ({self.backend}, target {self.target}), stages {list(self.stages)}"]
        for d in self.dims:
            tag = " [accuracy]" if d.accuracy else ""
            origin = "" if d.origin == "spec" else f" ({d.origin})"
            lines.append(f"  [{d.stage}] {d.name} in {list(d.choices)} (default {d.default!r}){tag}{origin}")
        for doc in [c.doc for c in self.spec.constraints] + [r.doc for r in self.rules]:
            lines.append(f"  constraint: {doc}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ values

    def default_values(self) -> dict[str, Any]:
        """The spec's default config (each value mapped into the pruned choices) plus extras' defaults."""
        return {d.name: d.nearest(d.default) for d in self.dims}

    def canonical(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Complete ``values`` with defaults and map each into its dimension's choices; knobs the
        others make inert (``KernelSpec.inert``) take their defaults, so configs that differ only
        there are one point."""
        out = self.default_values()
        for name, value in values.items():
            if name in self._by_name:
                out[name] = self._by_name[name].nearest(value)
        for name in self.spec.inert_names(out):
            if name in self._by_name:
                dim = self._by_name[name]
                out[name] = dim.nearest(dim.default)
        return out

    def split(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(values the spec declares, extra launch knobs added by the target)."""
        spec_values = {k: v for k, v in values.items() if k in self._spec_names}
        extras = {k: v for k, v in values.items() if k not in self._spec_names}
        return spec_values, extras

    def violations(self, values: Mapping[str, Any]) -> list[str]:
        """Readable list of what ``values`` (a complete mapping) breaks: domains, spec, target rules."""
        problems = [f"{name}={value!r} is not a choice of this space"
                    for name, value in values.items()
                    if name in self._by_name and value not in self._by_name[name].choices]
        missing = [n for n in self.names if n not in values]
        if missing:
            problems.append(f"missing knobs {missing}")
            return problems
        spec_values, _ = self.split(values)
        problems += self.spec.violations(spec_values, self.context)
        inert = self.spec.inert_names(values)
        problems += [r.doc for r in self.rules if inert.isdisjoint(r.params) and not r.check(values, self.context)]
        return problems

    def is_valid(self, values: Mapping[str, Any]) -> bool:
        return not self.violations(values)

    def iter_valid(self, free: Sequence[str], fixed: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Every valid complete config with ``free`` knobs varying and the rest taken from ``fixed``."""
        base = self.canonical(fixed)
        dims = [self.dim(n) for n in free]
        for combo in itertools.product(*(d.choices for d in dims)):
            values = dict(base)
            values.update(zip(free, combo))
            if self.is_valid(values) and self.canonical(values) == values:  # one config per point
                yield values

    def sample(self, rng: random.Random, free: Sequence[str], fixed: Mapping[str, Any],
               tries: int = 1000) -> dict[str, Any] | None:
        """A uniformly drawn valid config (rejection sampling), or None if none was found."""
        base = self.canonical(fixed)
        for _ in range(tries):
            values = dict(base)
            for name in free:
                values[name] = rng.choice(self.dim(name).choices)
            values = self.canonical(values)
            if self.is_valid(values):
                return values
        return None

    def restrict(self, choices: Mapping[str, Sequence[Any]]) -> "SearchSpace":
        """A bounded copy: each named knob keeps only the listed choices (a subset of its own)."""
        dims = []
        for d in self.dims:
            if d.name in choices:
                kept = tuple(c for c in d.choices if c in tuple(choices[d.name]))
                if not kept:
                    raise ValueError(f"restricting {d.name} to {list(choices[d.name])} leaves no "
                                     f"choice; allowed: {list(d.choices)}")
                d = replace(d, choices=kept)
            dims.append(d)
        unknown = set(choices) - set(self.names)
        if unknown:
            raise ValueError(f"cannot restrict unknown knobs {sorted(unknown)}; knobs: {list(self.names)}")
        return SearchSpace(self.spec, self.target, self.context, dims, self.rules)


# ---------------------------------------------------------------------- construction


def _narrow_chunks(name: str, choices: tuple[Any, ...], context: Mapping[str, Any]) -> tuple[Any, ...]:
    """Torch backend: keep choices below the extent plus the smallest one at or beyond it."""
    extent = context.get(_CHUNK_EXTENT.get(name, ""), None)
    if not extent or not all(_is_number(c) for c in choices):
        return choices
    below = tuple(c for c in choices if c < extent)
    above = sorted(c for c in choices if c >= extent)
    return below + tuple(above[:1]) if above else below


def _rocm_dims(spec: KernelSpec) -> list[Dimension]:
    """One waves_per_eu / matrix_instr_nonkdim pair per ``*warps`` param of the spec."""
    extras: list[Dimension] = []
    for p in spec.params:
        if not p.name.endswith("warps"):
            continue
        prefix = p.name[: -len("warps")]
        prefix = prefix[: -len("num_")] if prefix.endswith("num_") else prefix
        stage = stage_of(p.name)
        extras.append(Dimension(f"{prefix}waves_per_eu", _ROCM_WAVES_PER_EU, 0, stage, origin="rocm"))
        extras.append(Dimension(f"{prefix}matrix_instr_nonkdim", _ROCM_NONKDIM, 0, stage, origin="rocm"))
    return [d for d in extras if d.name not in spec.names]


def _tile_prefixes(names: Sequence[str]) -> list[str]:
    """Prefixes p with both ``{p}block_m`` and ``{p}block_n`` knobs (one kernel launch each)."""
    return [n[: -len("block_m")] for n in names if n.endswith("block_m") and n[: -len("block_m")] + "block_n" in names]


def _smem_rule(prefix: str, names: Sequence[str]) -> Rule | None:
    """Lower bound of a launch's shared memory: the pipelined K tiles must fit the device."""
    block_n, stages = f"{prefix}block_n", f"{prefix}stages"
    if block_n not in names or stages not in names:
        return None

    def check(v: Mapping[str, Any], c: Mapping[str, Any]) -> bool:
        if "max_shared_mem" not in c or "head_dim" not in c or "dtype_bytes" not in c:
            return True
        buffers = max(int(v[stages]) - 1, 1)
        return buffers * int(v[block_n]) * int(c["head_dim"]) * int(c["dtype_bytes"]) <= int(c["max_shared_mem"])

    return Rule((block_n, stages), f"max({stages} - 1, 1) * {block_n} * head_dim * dtype_bytes "
                f"<= max_shared_mem", check)


def _rocm_rules(names: Sequence[str]) -> list[Rule]:
    rules: list[Rule] = []
    for prefix in _tile_prefixes(names):
        nonk = f"{prefix}matrix_instr_nonkdim"
        if nonk in names:
            bm, bn = f"{prefix}block_m", f"{prefix}block_n"
            rules.append(Rule(
                (nonk, bm, bn), f"{bm} and {bn} are multiples of {nonk} (MFMA tile)",
                lambda v, c, nonk=nonk, bm=bm, bn=bn: v[nonk] == 0 or (v[bm] % v[nonk] == 0 and v[bn] % v[nonk] == 0),
            ))
    return rules


def _target_choices(name: str, choices: tuple[Any, ...], backend: str, target: str,
                    context: Mapping[str, Any]) -> tuple[Any, ...]:
    if backend == "torch":
        return _narrow_chunks(name, choices, context)
    if target == "rocm":
        if name.endswith("stages"):
            kept = tuple(c for c in choices if c <= _ROCM_MAX_STAGES)
            return kept or choices[:1]
        if name.endswith("warps"):
            kept = tuple(c for c in choices if c * _ROCM_WAVEFRONT <= _ROCM_MAX_THREADS)
            return kept or choices[:1]
    return choices


def build_space(
    kernel: str,
    backend: str,
    *,
    target: str = "cpu",
    context: Mapping[str, Any] | None = None,
) -> SearchSpace:
    """The pruned search space of ``kernel`` on ``backend`` for ``target`` and a problem context.

    ``context`` holds problem and device facts (``head_dim``, ``dtype_bytes``, ``seq_len``,
    ``rows``, ``max_shared_mem``, ...), as given by ``Problem.context()`` | ``device_context()``.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {list(TARGETS)}")
    spec = get_spec(kernel, backend)
    ctx = dict(context or {})
    dims = []
    for p in spec.params:
        choices = _target_choices(p.name, tuple(p.choices), backend, target, ctx)
        dims.append(Dimension(p.name, choices, p.default, stage_of(p.name), p.accuracy))
    if backend == "triton" and target == "rocm":
        dims += _rocm_dims(spec)
    if not any(d.stage in ("fwd", "bwd") for d in dims):
        dims = [replace(d, stage="all") for d in dims]
    names = [d.name for d in dims]
    rules: list[Rule] = []
    if backend == "triton" and target in ("cuda", "rocm"):
        rules += [r for r in (_smem_rule(p, names) for p in _tile_prefixes(names)) if r is not None]
    if backend == "triton" and target == "rocm":
        rules += _rocm_rules(names)
    return SearchSpace(spec, target, ctx, dims, rules)
