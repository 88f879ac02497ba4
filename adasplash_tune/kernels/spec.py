"""Kernel declarations: the one place a kernel's tunable parameters are written down.

A :class:`KernelSpec` lists a kernel's :class:`Param` s (name, allowed values, default) and its
:class:`Constraint` s. Everything else derives from it: the default config, the validation of
configs passed by users or read from a cache, the tuner's search space and the CLI help.

A :class:`Config` is plain, immutable data (a kernel name, a backend and a name -> value mapping)
that round-trips through JSON. It is never pickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

__all__ = ["Param", "Constraint", "KernelSpec", "Config", "ConfigError"]

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config names an unknown field, holds an out-of-domain value or violates a constraint."""


@dataclass(frozen=True)
class Param:
    """One tunable launch parameter.

    ``choices`` is the full domain the kernel accepts; ``default`` must be one of them.
    ``accuracy`` marks knobs that change the result (iterations, initial guess), which the tuner
    may only pick under the accuracy gate.
    """

    name: str
    choices: tuple[Any, ...]
    default: Any
    doc: str = ""
    accuracy: bool = False

    def __post_init__(self) -> None:
        if self.default not in self.choices:
            raise ValueError(f"param {self.name!r}: default {self.default!r} not in {self.choices}")

    def coerce(self, value: Any) -> Any:
        """Return ``value`` as one of the declared choices, or raise ConfigError."""
        for choice in self.choices:
            if type(choice) is bool or type(value) is bool:
                if type(choice) is type(value) and choice == value:
                    return choice
                continue
            if isinstance(choice, (int, float)) and isinstance(value, (int, float)):
                if choice == value:
                    return choice
            elif choice == value:
                return choice
        raise ConfigError(
            f"config field {self.name!r}: {value!r} is not an allowed value; choose one of "
            f"{list(self.choices)}"
        )


@dataclass(frozen=True)
class Constraint:
    """A rule between parameters (and optionally the problem or device).

    ``check(values, context)`` returns True when the config is acceptable. ``context`` may carry
    problem or device facts (``head_dim``, ``dtype_bytes``, ``max_shared_mem``); a check must
    return True when a fact it needs is absent, since it cannot judge without it.
    """

    params: tuple[str, ...]
    doc: str
    check: Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


@dataclass(frozen=True)
class Config:
    """A validated launch config: immutable, hashable, JSON round-trippable."""

    kernel: str
    backend: str
    items: tuple[tuple[str, Any], ...]

    def __hash__(self) -> int:
        """Hashed once per instance: configs key the per-call memos of the launch path."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.kernel, self.backend, self.items))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __reduce__(self) -> tuple:
        # the fields only: a string's hash (hence the cached one) differs between processes, and
        # the lookup dict is rebuilt on demand
        return (Config, (self.kernel, self.backend, self.items))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items)

    def __getitem__(self, name: str) -> Any:
        lookup = self.__dict__.get("_lookup")
        if lookup is None:  # built once per instance (the call path reads knobs on every call)
            lookup = dict(self.items)
            object.__setattr__(self, "_lookup", lookup)
        return lookup[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def replace(self, **changes: Any) -> "Config":
        """A new config with some values changed (not validated: call ``spec.validate``)."""
        values = self.as_dict()
        values.update(changes)
        return Config(self.kernel, self.backend, tuple(sorted(values.items())))

    def to_json(self) -> str:
        return json.dumps(
            {"kernel": self.kernel, "backend": self.backend, "config": self.as_dict()},
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str, spec_of: Callable[[str, str], "KernelSpec"]) -> "Config":
        """Parse a config written by :meth:`to_json` and validate it against
        ``spec_of(kernel, backend)`` (``kernels.registry.config_from_json`` passes the registry's)."""
        try:
            data = json.loads(text)
            kernel, backend, values = data["kernel"], data["backend"], data["config"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"malformed config JSON: {exc}") from None
        return spec_of(kernel, backend).validate(values)


@dataclass(frozen=True)
class KernelSpec:
    """Everything that can be told to one kernel on one backend."""

    kernel: str
    backend: str
    params: tuple[Param, ...]
    constraints: tuple[Constraint, ...] = ()
    sources: tuple[str, ...] = ()
    doc: str = ""
    #: ``inert(values)``: the names whose values make no difference given the others (e.g. the
    #: staged forward's tiles once the forward runs fused): constraints on them do not bind, and
    #: the tuner treats configs that differ only there as one point.
    inert: Callable[[Mapping[str, Any]], Iterable[str]] | None = field(default=None, compare=False, repr=False)
    _by_name: dict[str, Param] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kernel}/{self.backend}: duplicate parameter names")
        self._by_name.update({p.name: p for p in self.params})
        for constraint in self.constraints:
            unknown = set(constraint.params) - set(names)
            if unknown:
                raise ValueError(f"constraint {constraint.doc!r} names unknown {sorted(unknown)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(
                f"unknown config field {name!r} for {self.kernel} ({self.backend}); "
                f"known fields: {list(self.names)}"
            ) from None

    def default(self) -> Config:
        return self._make({p.name: p.default for p in self.params})

    def inert_names(self, values: Mapping[str, Any]) -> frozenset[str]:
        """The names in ``values`` whose values make no difference given the others."""
        return frozenset(self.inert(values)) if self.inert is not None else frozenset()

    def binding(self, values: Mapping[str, Any]) -> tuple[Constraint, ...]:
        """The constraints that apply to ``values``: those on no inert name."""
        inert = self.inert_names(values)
        return self.constraints if not inert else tuple(c for c in self.constraints if inert.isdisjoint(c.params))

    def violations(self, values: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> list[str]:
        """The constraints that ``values`` (a complete mapping) violates, as readable strings."""
        ctx = context or {}
        return [c.doc for c in self.binding(values) if not c.check(values, ctx)]

    def validate(
        self,
        values: Mapping[str, Any] | Config,
        context: Mapping[str, Any] | None = None,
        *,
        partial: bool = True,
    ) -> Config:
        """Check a mapping against the declaration and return a :class:`Config`.

        With ``partial`` (the default) missing fields take their declared defaults; otherwise every
        field must be present. Raises :class:`ConfigError` naming the offending field.
        """
        if isinstance(values, Config):
            if (values.kernel, values.backend) != (self.kernel, self.backend):
                raise ConfigError(
                    f"config is for {values.kernel} ({values.backend}), "
                    f"not {self.kernel} ({self.backend})"
                )
            values = values.as_dict()
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a mapping of field -> value, got {type(values).__name__}")
        merged: dict[str, Any] = {}
        for name, value in values.items():
            merged[name] = self.param(str(name)).coerce(value)
        missing = [p.name for p in self.params if p.name not in merged]
        if missing and not partial:
            raise ConfigError(f"config for {self.kernel} ({self.backend}) lacks fields {missing}")
        for name in missing:
            merged[name] = self._by_name[name].default
        for constraint in self.binding(merged):
            if not constraint.check(merged, context or {}):
                shown = ", ".join(f"{n}={merged[n]!r}" for n in constraint.params)
                raise ConfigError(
                    f"config field {constraint.params[0]!r} violates constraint "
                    f"'{constraint.doc}' ({shown})"
                )
        return self._make(merged)

    def is_valid(self, values: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> bool:
        try:
            self.validate(values, context, partial=False)
        except ConfigError:
            return False
        return True

    def grid(self, context: Mapping[str, Any] | None = None, **fixed: Any) -> Iterator[Config]:
        """Every valid config (the Cartesian product of choices, pruned by the constraints)."""
        import itertools

        free = [p for p in self.params if p.name not in fixed]
        for combo in itertools.product(*(p.choices for p in free)):
            values = dict(zip((p.name for p in free), combo))
            values.update(fixed)
            if not self.violations(values, context):
                yield self._make(values)

    def source_hash(self) -> str:
        """A short hash of the source files that implement this kernel (stale-entry detection),
        read once per process."""
        return _source_hash(self.kernel, self.backend, self.sources)

    def describe(self) -> str:
        """Human-readable listing of parameters and constraints (CLI help)."""
        lines = [f"{self.kernel} ({self.backend})" + (f": {self.doc}" if self.doc else "")]
        for p in self.params:
            tag = " [accuracy]" if p.accuracy else ""
            lines.append(f"  {p.name} in {list(p.choices)} (default {p.default!r}){tag} {p.doc}".rstrip())
        for c in self.constraints:
            lines.append(f"  constraint: {c.doc}")
        return "\n".join(lines)

    def _make(self, values: Mapping[str, Any]) -> Config:
        return Config(self.kernel, self.backend, tuple(sorted(values.items())))


@functools.lru_cache(maxsize=None)
def _source_hash(kernel: str, backend: str, sources: tuple[str, ...]) -> str:
    digest = hashlib.sha256(f"{kernel}/{backend}".encode())
    for rel in sources:
        path = _PACKAGE_ROOT / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(_PACKAGE_ROOT)).encode())
            digest.update(file.read_bytes() if file.exists() else b"<missing>")
    return digest.hexdigest()[:16]


def iter_choices(values: Iterable[Any]) -> tuple[Any, ...]:
    """Small helper for declarations: a tuple of unique choices in the given order."""
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return tuple(seen)
