"""Tuning problems: concrete shapes whose problem keys the tuner fills in the cache.

A problem is plain data (JSON round-trip, sent to worker processes as a dict). It knows its
problem key (built only with ``kernels.problem``, exactly as ``api.py`` builds it at call time),
how to make fresh random inputs, how to run the public op with an explicit config and how to
compute the fp64 oracle.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from ..kernels.problem import DTYPE_NAMES, attention_key, entmax_key
from .inputs import inputs_label, parse_inputs, recorded_inputs, split_inputs, synthetic_inputs

__all__ = [
    "AttentionProblem", "EntmaxProblem", "Problem", "problem_from_dict", "problems_from_record",
    "dtype_bytes", "dedupe", "problem_for_entry", "GENERIC_ALPHA",
]

log = logging.getLogger("adasplash_tune")

#: The alpha a key's "generic" alpha class is tuned with when only the key is known (not of the
#: form 1 + 1/b with an integer b: those have classes of their own).
GENERIC_ALPHA = 1.6

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: Score elements up to which the attention oracle runs in one dense call (2^26 fp64 = 512 MiB).
_DENSE_LIMIT = 1 << 26

#: Score elements the accuracy gate's oracle covers at most. Above it the gate checks a sample of
#: whole (batch, kv-head group) slices: every slice is computed by the same kernels as the rest,
#: and an N = 32768, 64-head oracle would otherwise take minutes per problem.
_ORACLE_LIMIT = 1 << 30


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name ('float32', 'float16', 'bfloat16')."""
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPE_NAMES)}") from None


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    return alpha


@dataclass(frozen=True)
class AttentionProblem:
    """One adasplash call shape: q (batch, heads, seq_len, head_dim), k/v with kv_heads heads."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    alpha: float = 1.5
    causal: bool = False
    dtype: str = "float32"
    varlen: bool = False
    #: What the tuner times and gates on (:mod:`.inputs`): "randn", "randn:S", "local:S",
    #: "recorded:FILE" or a mix "randn+local:2". Not part of the problem key: it is the entry's
    #: provenance.
    inputs: str = "randn"

    kernel = "adasplash"

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "kv_heads", "seq_len", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attention problem: {name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if not 16 <= self.head_dim <= 256:
            raise ValueError(f"head_dim must be in 16..256, got {self.head_dim}")
        _check_alpha(self.alpha)
        dtype_bytes(self.dtype)
        split_inputs(self.inputs)

    def parts(self) -> list["AttentionProblem"]:
        """This problem once per input family of its mix (itself when it has one family)."""
        specs = split_inputs(self.inputs)
        return [self] if len(specs) == 1 else [replace(self, inputs=spec) for spec in specs]

    def key(self, backend: str) -> dict[str, Any]:
        return attention_key(
            backend=backend, dtype=self.dtype, batch=self.batch, q_heads=self.heads,
            kv_heads=self.kv_heads, seq_len=self.seq_len, head_dim=self.head_dim,
            alpha=self.alpha, causal=self.causal, varlen=self.varlen,
        )

    def context(self) -> dict[str, Any]:
        """Problem facts that constraints may use."""
        return {"head_dim": self.head_dim, "dtype_bytes": dtype_bytes(self.dtype),
                "seq_len": self.seq_len, "batch_heads": self.batch * self.heads}

    def label(self) -> str:
        gqa = f" gqa{self.heads // self.kv_heads}" if self.kv_heads != self.heads else ""
        flags = (" causal" if self.causal else "") + (" varlen" if self.varlen else "")
        inputs = "" if self.inputs == "randn" else f" [{inputs_label(self.inputs)}]"
        return (f"B{self.batch} H{self.heads}{gqa} N{self.seq_len} D{self.head_dim} "
                f"a{self.alpha:g} {self.dtype}{flags}{inputs}")

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, **asdict(self)}

    # ----------------------------------------------------------------- running (worker side)

    def make_inputs(self, device: str, seed: int, requires_grad: bool) -> dict[str, Any]:
        """q, k, v of this problem's inputs (fresh randn by default; never zeros), optional varlen
        lengths (a recorded sample's own when it has them) and a randn output gradient."""
        import torch

        if len(split_inputs(self.inputs)) > 1:
            raise ValueError(f"inputs {self.inputs!r} is a mix: make each part's inputs (parts())")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dt = _torch_dtype(self.dtype)
        shape_q = (self.batch, self.heads, self.seq_len, self.head_dim)
        shape_kv = (self.batch, self.kv_heads, self.seq_len, self.head_dim)
        family, value = parse_inputs(self.inputs)
        recorded_lengths = None
        if family == "recorded":
            *tensors, recorded_lengths = recorded_inputs(value, shape_q, self.kv_heads)
            if self.varlen and recorded_lengths is None:
                raise ValueError(f"recorded sample {value} has no varlen lengths; the problem is varlen")
        else:
            tensors = [*synthetic_inputs(family, value, shape_q, self.kv_heads, gen, "cpu"),
                       torch.randn(shape_kv, generator=gen)]
        tensors = [t.to(device=device, dtype=dt).contiguous().requires_grad_(requires_grad) for t in tensors]
        lengths = None
        if self.varlen and recorded_lengths is not None:
            lengths = recorded_lengths.clamp(0, self.seq_len).to(device)
        elif self.varlen:
            low = max(1, self.seq_len // 2)
            lengths = torch.randint(low, self.seq_len + 1, (self.batch,), generator=gen).to(device)
        grad = torch.randn(shape_q, generator=gen).to(device=device, dtype=dt)
        return {"q": tensors[0], "k": tensors[1], "v": tensors[2], "varlen": lengths, "grad": grad}

    def grad_inputs(self, inputs: Mapping[str, Any]) -> tuple:
        return inputs["q"], inputs["k"], inputs["v"]

    def run(self, inputs: Mapping[str, Any], backend: str, config: Mapping[str, Any]):
        from .. import adasplash

        return adasplash(inputs["q"], inputs["k"], inputs["v"], self.alpha, self.causal,
                         inputs["varlen"], backend=backend, config=dict(config))

    def oracle_slices(self) -> list[tuple[int, int]] | None:
        """(batch, kv head) slices the accuracy gate checks; None: all of them.

        Up to ``_ORACLE_LIMIT`` score elements every slice is checked; above it, evenly spaced
        slices (at least one) whose scores fit in the limit.
        """
        group = self.heads // self.kv_heads
        per_slice = group * self.seq_len ** 2
        pairs = [(b, kv) for b in range(self.batch) for kv in range(self.kv_heads)]
        if per_slice * len(pairs) <= _ORACLE_LIMIT:
            return None
        count = max(1, _ORACLE_LIMIT // per_slice)
        return [pairs[i * len(pairs) // count] for i in range(count)]

    def oracle_view(self, out, grads):
        """``out`` (and grads w.r.t. q, k, v) restricted to :meth:`oracle_slices`, laid out as
        :meth:`reference` returns them."""
        import torch

        slices = self.oracle_slices()
        if slices is None:
            return out, grads
        group = self.heads // self.kv_heads

        def q_part(t):
            return torch.stack([t[b, kv * group:(kv + 1) * group] for b, kv in slices])

        def kv_part(t):
            return torch.stack([t[b, kv:kv + 1] for b, kv in slices])

        if grads is None:
            return q_part(out), None
        return q_part(out), (q_part(grads[0]), kv_part(grads[1]), kv_part(grads[2]))

    def reference(self, inputs: Mapping[str, Any], with_grad: bool):
        """fp64 oracle output and (optionally) gradients w.r.t. q, k, v, over :meth:`oracle_slices`
        (compare with :meth:`oracle_view` of the kernel's results).

        The dense oracle holds (B, H, N, N) fp64 scores; above ``_DENSE_LIMIT`` score elements it
        runs one (batch, query head) at a time (rows and heads are independent; k/v gradients of
        the heads sharing a kv head are summed).
        """
        import torch

        from ..kernels.reference import attention_reference

        q, k, v, varlen, grad = inputs["q"], inputs["k"], inputs["v"], inputs["varlen"], inputs["grad"]
        slices = self.oracle_slices()
        if slices is None and self.batch * self.heads * self.seq_len ** 2 <= _DENSE_LIMIT:
            return _oracle(lambda q_, k_, v_: attention_reference(q_, k_, v_, self.alpha, self.causal, varlen),
                           (q, k, v), grad, with_grad)
        group = self.heads // self.kv_heads
        full = slices is None
        if full:
            slices = [(b, kv) for b in range(self.batch) for kv in range(self.kv_heads)]
        # compact layout: slice i holds q heads (i, 0..group) and kv head (i, 0)
        shape_q = (len(slices), group, self.seq_len, self.head_dim)
        shape_kv = (len(slices), 1, self.seq_len, self.head_dim)
        out = torch.empty(shape_q, dtype=torch.float64, device=q.device)
        grads = ([torch.zeros(s, dtype=torch.float64, device=q.device) for s in (shape_q, shape_kv, shape_kv)]
                 if with_grad else None)
        for i, (b, kv) in enumerate(slices):
            lengths = None if varlen is None else varlen[b:b + 1]
            for g in range(group):
                h = kv * group + g
                part, part_grads = _oracle(
                    lambda q_, k_, v_: attention_reference(q_, k_, v_, self.alpha, self.causal, lengths),
                    (q[b:b + 1, h:h + 1], k[b:b + 1, kv:kv + 1], v[b:b + 1, kv:kv + 1]),
                    grad[b:b + 1, h:h + 1], with_grad,
                )
                out[i, g] = part[0, 0]
                if grads is not None:
                    grads[0][i, g] = part_grads[0][0, 0]
                    grads[1][i, 0] += part_grads[1][0, 0]
                    grads[2][i, 0] += part_grads[2][0, 0]
        if full:  # back to (B, H, N, D) / (B, Hkv, N, D)
            out = out.reshape(self.batch, self.heads, self.seq_len, self.head_dim)
            if grads is not None:
                grads = [grads[0].reshape(out.shape),
                         grads[1].reshape(self.batch, self.kv_heads, self.seq_len, self.head_dim),
                         grads[2].reshape(self.batch, self.kv_heads, self.seq_len, self.head_dim)]
        return out, (tuple(grads) if grads is not None else None)


@dataclass(frozen=True)
class EntmaxProblem:
    """One entmax call shape: ``rows`` independent rows of length ``cols``."""

    rows: int
    cols: int
    alpha: float = 1.5
    dtype: str = "float32"

    kernel = "entmax"

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"entmax problem: {name} must be a positive int, got {value!r}")
        _check_alpha(self.alpha)
        dtype_bytes(self.dtype)

    def key(self, backend: str) -> dict[str, Any]:
        return entmax_key(backend=backend, dtype=self.dtype, rows=self.rows, cols=self.cols,
                          alpha=self.alpha)

    def context(self) -> dict[str, Any]:
        return {"dtype_bytes": dtype_bytes(self.dtype), "rows": self.rows, "cols": self.cols}

    def label(self) -> str:
        return f"rows{self.rows} cols{self.cols} a{self.alpha:g} {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, **asdict(self)}

    def make_inputs(self, device: str, seed: int, requires_grad: bool) -> dict[str, Any]:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(seed)
        dt = _torch_dtype(self.dtype)
        x = (2.0 * torch.randn(self.rows, self.cols, generator=gen)).to(device=device, dtype=dt)
        x.requires_grad_(requires_grad)
        grad = torch.randn(self.rows, self.cols, generator=gen).to(device=device, dtype=dt)
        return {"x": x, "grad": grad}

    def grad_inputs(self, inputs: Mapping[str, Any]) -> tuple:
        return (inputs["x"],)

    def run(self, inputs: Mapping[str, Any], backend: str, config: Mapping[str, Any]):
        from .. import entmax

        return entmax(inputs["x"], self.alpha, -1, backend=backend, config=dict(config))

    def oracle_view(self, out, grads):
        """The results the oracle covers (all of them)."""
        return out, grads

    def reference(self, inputs: Mapping[str, Any], with_grad: bool):
        from ..kernels.reference import entmax_reference

        return _oracle(lambda x: entmax_reference(x, self.alpha), (inputs["x"],), inputs["grad"], with_grad)


Problem = Union[AttentionProblem, EntmaxProblem]


def _oracle(fn, tensors: tuple, grad, with_grad: bool):
    """(fp64 output, fp64 gradients or None) of ``fn`` on detached float64 copies of ``tensors``."""
    import torch

    leaves = [t.detach().to(torch.float64).requires_grad_(with_grad) for t in tensors]
    with torch.enable_grad() if with_grad else torch.no_grad():
        out = fn(*leaves)
        grads = None
        if with_grad:
            grads = torch.autograd.grad(out, leaves, grad.to(torch.float64))
    return out.detach(), grads


def problem_from_dict(data: Mapping[str, Any]) -> Problem:
    """Inverse of ``Problem.to_dict`` (ValueError on anything malformed)."""
    values = dict(data)
    kernel = values.pop("kernel", None)
    cls = {"adasplash": AttentionProblem, "entmax": EntmaxProblem}.get(kernel)
    if cls is None:
        raise ValueError(f"unknown problem kernel {kernel!r}; expected 'adasplash' or 'entmax'")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"malformed {kernel} problem {dict(data)}: {exc}") from None


def _alpha_of(record: Mapping[str, Any], key: Mapping[str, Any]) -> float:
    shape = record.get("shape") or {}
    for value in (shape.get("alpha"), record.get("alpha")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    cls = str(key.get("alpha", "1.5"))
    return {"1.5": 1.5, "2": 2.0, "4/3": 4.0 / 3.0, "1.25": 1.25}.get(cls, GENERIC_ALPHA)


def _problem_from_key(kernel: str, key: Mapping[str, Any], record: Mapping[str, Any]) -> Problem:
    """A representative problem for a recorded key (shape fields of the record win when present)."""
    shape = record.get("shape") or {}
    alpha = _alpha_of(record, key)
    if kernel == "adasplash":
        bh = int(key["bh"])
        gqa = max(int(key.get("gqa", 1)), 1)
        heads = int(shape.get("heads", shape.get("q_heads", bh)))
        batch = int(shape.get("batch", max(bh // heads, 1)))
        kv_heads = int(shape.get("kv_heads", max(heads // gqa, 1)))
        if heads % kv_heads:
            heads, kv_heads = gqa, 1
        return AttentionProblem(
            batch=batch, heads=heads, kv_heads=kv_heads,
            seq_len=int(shape.get("seq_len", key["seq"])), head_dim=int(shape.get("head_dim", key["head_dim"])),
            alpha=alpha, causal=bool(key["causal"]), dtype=str(key["dtype"]), varlen=bool(key.get("varlen", False)),
        )
    return EntmaxProblem(rows=int(shape.get("rows", key["rows"])), cols=int(shape.get("cols", key["cols"])),
                         alpha=alpha, dtype=str(key["dtype"]))


def problem_for_entry(entry: Any) -> Problem:
    """The problem a cache entry was tuned on (its provenance), else one representative of its key."""
    stored = (getattr(entry, "provenance", None) or {}).get("problem")
    if isinstance(stored, Mapping):
        try:
            problem = problem_from_dict(stored)
            if problem.kernel == entry.kernel:
                return _inputs_available(problem)
        except ValueError:
            log.debug("entry provenance holds a malformed problem %s; using its key", stored)
    return _problem_from_key(entry.kernel, entry.key, {})


def _inputs_available(problem: Problem) -> Problem:
    """``problem``, on randn inputs instead when its recorded sample file is gone (logged)."""
    if isinstance(problem, AttentionProblem) and len(split_inputs(problem.inputs)) == 1:
        family, value = parse_inputs(problem.inputs)
        if family == "recorded" and not Path(value).is_file():
            log.warning("recorded sample %s is gone; using randn inputs for %s", value, problem.label())
            return replace(problem, inputs="randn")
    return problem


def problems_from_record(path: str | Path, kernel: str | None = None) -> list[tuple[Problem, int]]:
    """Problems from an ``ADASPLASH_TUNE_RECORD`` file, most frequent key first, with counts.

    Each line is a JSON object with at least ``kernel`` and ``key`` (the problem key the runtime
    looked up); optional ``shape``/``alpha`` fields give the exact call, ``count`` how many calls
    the line stands for (default 1). A line with ``sample`` (a file written with
    ``ADASPLASH_TUNE_RECORD_SAMPLES``) makes its key's problem tune on those inputs
    (``inputs="recorded:FILE"``; the newest sample of a key wins; relative paths are relative to
    the record file). Malformed lines are skipped with a warning. ``kernel`` keeps only that
    kernel's lines.
    """
    counts: Counter[str] = Counter()
    first: dict[str, Problem] = {}
    order: dict[str, int] = {}
    samples: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rec_kernel = record["kernel"]
            key = record["key"]
            if kernel is not None and rec_kernel != kernel:
                continue
            problem = _problem_from_key(rec_kernel, key, record)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s:%d: skipping malformed record line (%s)", path, lineno, exc)
            continue
        ident = json.dumps({"kernel": rec_kernel, "key": key}, sort_keys=True)
        count = record.get("count", 1)
        counts[ident] += count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 1
        first.setdefault(ident, problem)
        order.setdefault(ident, len(order))
        sample = record.get("sample")
        if isinstance(sample, str) and sample and rec_kernel == "adasplash":
            samples[ident] = str(Path(path).parent / sample)  # an absolute sample path stays as it is
    ranked = sorted(counts, key=lambda ident: (-counts[ident], order[ident]))
    out = []
    for ident in ranked:
        problem = first[ident]
        if ident in samples and isinstance(problem, AttentionProblem):
            problem = replace(problem, inputs=f"recorded:{samples[ident]}")
        out.append((problem, counts[ident]))
    return out


def dedupe(problems: Iterable[Problem], backend: str) -> list[Problem]:
    """Drop problems whose key repeats an earlier one (they would tune the same cache entry)."""
    seen: set[str] = set()
    out: list[Problem] = []
    for problem in problems:
        ident = json.dumps({"kernel": problem.kernel, "key": problem.key(backend)}, sort_keys=True)
        if ident not in seen:
            seen.add(ident)
            out.append(problem)
    return out
