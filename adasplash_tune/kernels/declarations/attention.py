"""Declaration of the AdaSplash attention kernels (Triton pipeline and blockwise torch backend)."""

from __future__ import annotations

from typing import Any, Mapping

from ..spec import Config, Constraint, KernelSpec, Param

__all__ = ["TORCH", "TRITON", "SPECS", "triton_smem_estimates", "fit_triton_config", "TAU_TOL_AUTO"]

NITER_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 30)
TILES = (16, 32, 64, 128)

TORCH = KernelSpec(
    kernel="adasplash",
    backend="torch",
    doc="blockwise PyTorch AdaSplash: query chunks x key chunks, memory O(q_chunk x N) per head",
    params=(
        Param("q_chunk", (16, 32, 64, 128, 256, 512, 1024, 2048), 256, "queries per chunk"),
        Param("k_chunk", (64, 128, 256, 512, 1024, 2048, 4096), 1024, "keys per chunk"),
        Param("niter", NITER_CHOICES, 8, "Halley-bisection iterations for tau", accuracy=True),
    ),
    sources=("kernels/torch_backend/attention.py", "kernels/torch_backend/tau.py",
             "kernels/declarations/attention.py"),
)

#: ``tau_tol="auto"``: the early-exit Halley step, relative to the row's support width
#: ``max z - tau``, per dtype and alpha class, so that tau's share of the output error stays near
#: 1e-3 for 16-bit inputs and 1e-6 for float32. alpha = 1.5 converges fastest; alpha = 2 is
#: Newton (quadratic) and other alphas need a tighter step. Relative, because flat rows (a support
#: of thousands of keys, width down to n^(1-alpha)) lost 5% accuracy at N = 16384 under an
#: absolute step in z units (benchmarks/results/h200-sparsity.json, "local" inputs at s = 1).
TAU_TOL_AUTO = {("16bit", "1.5"): 0.1, ("16bit", "other"): 0.03, ("float32", "any"): 0.003}

# Stages (tuner): "tau_*", "niter" and "mask_*" are the tau / mask stage, "fwd_*" the sparse
# forward, "bwd_*" the dK/dV kernel and "bwd_q_*" the dQ kernel.
_TRITON_PARAMS = (
    Param("tau_block_m", TILES, 64, "query rows per tau program"),
    Param("tau_block_n", TILES, 64, "keys per tau sweep step"),
    Param("tau_warps", (2, 4, 8), 4),
    Param("tau_stages", (1, 2, 3, 4), 3),
    Param("niter", NITER_CHOICES, 8,
          "at most this many Halley-bisection sweeps for tau (fewer once the step is below tau_tol)",
          accuracy=True),
    Param("tau_sweep_block_n", TILES, 64,
          "keys per step of the sparse Halley sweeps: the granularity at which they skip key tiles "
          "that hold no score above the current tau"),
    Param("tau_dense_passes", (1, 2), 1,
          "1: the pass that finds each row's max also bounds every chunk, so the first Halley sweep "
          "already skips; 2: that pass finds the max only and the first sweep visits every key "
          "tile (cheaper first pass, exact bounds from the start)"),
    Param("tau_init", ("subset", "subset16", "mid", "lo"), "subset",
          "first tau: the threshold of the row's 8 (subset) or 16 (subset16) largest tile maxima (a "
          "lower bound of the root), or the midpoint / lower end of the bracket [max-1, max-n^(1-alpha)]",
          accuracy=True),
    Param("tau_tol", ("auto", 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0), "auto",
          "stop sweeping once every row's Halley step is at most this fraction of its support "
          "width max z - tau (0: always niter sweeps)",
          accuracy=True),
    Param("mask_m", TILES, 64, "query rows per block-mask tile"),
    Param("mask_n", TILES, 64, "keys per block-mask tile"),
    Param("mask_source", ("sweeps", "max"), "sweeps",
          "chunk bounds behind the block mask from the dense pass only (against the running max) "
          "or made exact by every sweep that visits the chunk (tighter mask, one more reduction "
          "per visited score)"),
    Param("fwd_mode", ("staged", "fused"), "fused",
          "staged: the tau kernel, a tile-list kernel and the forward kernel (three launches, forward "
          "tiles of their own); fused: each tau program runs the forward of its rows itself, one "
          "launch, on tau's tiles (tau_block_m x tau_sweep_block_n), warps and stages (fwd_block_*, "
          "fwd_warps and fwd_stages unused)"),
    Param("fwd_block_m", TILES, 64),
    Param("fwd_block_n", TILES, 64),
    Param("fwd_warps", (2, 4, 8), 4),
    Param("fwd_stages", (1, 2, 3, 4), 3),
    Param("bwd_mode", ("split", "fused"), "split",
          "split: a dQ kernel (which finds delta on the way) then a dK/dV kernel, eight products per "
          "visited tile; fused: one kernel per key tile adds dQ by atomics, five products, with delta "
          "from a support-weighted mean the forward keeps (one more product there; bwd_q_* "
          "unused); dQ's summation order then varies between runs"),
    Param("bwd_block_m", TILES, 64, "dK/dV kernel: query rows per step"),
    Param("bwd_block_n", TILES, 64, "dK/dV kernel: keys per program"),
    Param("bwd_warps", (2, 4, 8), 4),
    Param("bwd_stages", (1, 2, 3, 4), 2),
    Param("bwd_q_block_m", TILES, 64, "dQ kernel: query rows per program"),
    Param("bwd_q_block_n", TILES, 64, "dQ kernel: keys per step"),
    Param("bwd_q_warps", (2, 4, 8), 4),
    Param("bwd_q_stages", (1, 2, 3, 4), 2),
)


def _pow2_dim(head_dim: int) -> int:
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def triton_smem_estimates(values: Mapping[str, Any], head_dim: int, dtype_bytes: int) -> dict[str, int]:
    """Shared-memory estimate in bytes of each launch: resident tiles + pipelined tiles
    (``max(stages - 1, 1)`` buffers) + scratch for the score tiles' layout changes. Checked against
    sm_90 builds: at or above the measured use for float32 and 16-bit inputs, head dims 64-256."""
    d, eb = _pow2_dim(head_dim), int(dtype_bytes)

    def bufs(stages: int) -> int:
        return max(int(stages) - 1, 1)

    v = values
    tau = (eb * d * (v["tau_block_m"] + bufs(v["tau_stages"]) * max(v["tau_block_n"], v["tau_sweep_block_n"]))
           + 4 * v["tau_block_m"] * max(v["tau_block_n"], v["tau_sweep_block_n"]))
    if v.get("fwd_mode") == "fused":  # the forward loop's K and V tiles on tau's tiles (buffers reused between loops)
        tau = max(tau, eb * d * (v["tau_block_m"] + 2 * bufs(v["tau_stages"]) * v["tau_sweep_block_n"])
                  + 2 * eb * v["tau_block_m"] * v["tau_sweep_block_n"])
    return {
        "tau": tau,
        "fwd": eb * d * (v["fwd_block_m"] + 2 * bufs(v["fwd_stages"]) * v["fwd_block_n"])
        + 2 * eb * v["fwd_block_m"] * v["fwd_block_n"],
        "bwd": eb * d * (2 * v["bwd_block_n"] + 2 * bufs(v["bwd_stages"]) * v["bwd_block_m"])
        + 2 * eb * v["bwd_block_m"] * v["bwd_block_n"],
        "bwd_q": eb * d * (2 * v["bwd_q_block_m"] + 2 * bufs(v["bwd_q_stages"]) * v["bwd_q_block_n"])
        + 2 * eb * v["bwd_q_block_m"] * v["bwd_q_block_n"],
    }


def _smem_ok(stage: str):
    def check(v: Mapping[str, Any], c: Mapping[str, Any]) -> bool:
        if not all(key in c for key in ("head_dim", "dtype_bytes", "max_shared_mem")):
            return True
        return triton_smem_estimates(v, c["head_dim"], c["dtype_bytes"])[stage] <= int(c["max_shared_mem"])

    return check


def _multiple(a: str, b: str) -> Constraint:
    return Constraint((a, b), f"{a} % {b} == 0", lambda v, c, a=a, b=b: v[a] % v[b] == 0)


_STAGE_PARAMS = {
    "tau": ("tau_block_m", "tau_block_n", "tau_sweep_block_n", "tau_stages", "fwd_mode"),
    "fwd": ("fwd_block_m", "fwd_block_n", "fwd_stages"),
    "bwd": ("bwd_block_m", "bwd_block_n", "bwd_stages"),
    "bwd_q": ("bwd_q_block_m", "bwd_q_block_n", "bwd_q_stages"),
}

_TRITON_CONSTRAINTS = (
    # the block mask is written by the tau sweeps, so a tau tile holds whole mask tiles
    _multiple("tau_block_m", "mask_m"),
    _multiple("tau_block_n", "mask_n"),
    _multiple("tau_sweep_block_n", "mask_n"),
    # compute tiles OR whole mask tiles (a coarser compute tile visits a tile if any part is active)
    _multiple("fwd_block_m", "mask_m"),
    _multiple("fwd_block_n", "mask_n"),
    _multiple("bwd_block_m", "mask_m"),
    _multiple("bwd_block_n", "mask_n"),
    _multiple("bwd_q_block_m", "mask_m"),
    _multiple("bwd_q_block_n", "mask_n"),
) + tuple(
    Constraint(params, f"{stage} shared-memory estimate <= max_shared_mem", _smem_ok(stage))
    for stage, params in _STAGE_PARAMS.items()
)

def _inert(values: Mapping[str, Any]) -> tuple[str, ...]:
    """Knobs that make no difference given the modes: the staged forward's (``fwd_*``, target
    extras included) once the forward runs fused in the tau kernel, the dQ kernel's (``bwd_q_*``)
    once the backward is fused."""
    names: list[str] = []
    if values.get("fwd_mode") == "fused":
        names += [n for n in values if n.startswith("fwd_") and n != "fwd_mode"]
    if values.get("bwd_mode") == "fused":
        names += [n for n in values if n.startswith("bwd_q_")]
    return tuple(names)


TRITON = KernelSpec(
    kernel="adasplash",
    backend="triton",
    doc="Triton AdaSplash: tau sweeps (writing the block mask) -> tile lists -> sparse forward / "
        "sparse backward (dK/dV per key tile, dQ per query tile)",
    params=_TRITON_PARAMS,
    constraints=_TRITON_CONSTRAINTS,
    sources=("kernels/attention", "kernels/declarations/attention.py"),
    inert=_inert,
)

SPECS = {"triton": TRITON, "torch": TORCH}

_STAGE_PREFIX = {"tau": "tau_", "fwd": "fwd_", "bwd": "bwd_", "bwd_q": "bwd_q_"}


def fit_triton_config(config: Config, context: Mapping[str, Any]) -> Config:
    """``config`` shrunk (fewer stages, then smaller tiles, in the launches that do not fit) until
    it satisfies every constraint in ``context``. Used for the built-in default on problems it does
    not fit (large head dims in float32). Raises ConfigError when nothing fits."""
    from ..spec import ConfigError

    values = config.as_dict()
    for _ in range(64):
        bad = TRITON.violations(values, context)
        if not bad:
            return TRITON.validate(values, context)
        stages = [s for s in _STAGE_PREFIX if f"{s} shared-memory estimate" in " ".join(bad)]
        if not stages:
            break
        prefix = _STAGE_PREFIX[stages[0]]
        extra = ("tau_sweep_block_n",) if stages[0] == "tau" else ()
        for name in (f"{prefix}stages", f"{prefix}block_n", *extra, f"{prefix}block_m"):
            choices = TRITON.param(name).choices
            idx = choices.index(values[name])
            if idx > 0:
                values = dict(values, **{name: choices[idx - 1]})
                break
        else:
            break
        # the mask tile must keep dividing every compute tile (all are powers of two)
        values["mask_m"] = min(values["mask_m"], *(values[f"{p}block_m"] for p in _STAGE_PREFIX.values()))
        values["mask_n"] = min(values["mask_n"], values["tau_sweep_block_n"],
                               *(values[f"{p}block_n"] for p in _STAGE_PREFIX.values()))
    raise ConfigError(f"no smaller variant of the config fits this problem ({dict(context)})")
