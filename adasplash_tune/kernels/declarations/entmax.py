"""Declaration of the standalone alpha-entmax kernels (Triton and torch backends)."""

from __future__ import annotations

from typing import Any, Mapping

from ..spec import Constraint, KernelSpec, Param

NITER_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 30)

#: ``tol="auto"``: the early-exit step, relative to the row's support width ``max z - tau``, per
#: precision and alpha class ("int": alpha = 1.5, 4/3, 1.25; "2"; "generic"). The Halley step on
#: the b-norm is cubic: after a step of 0.1 tau is within ~1e-3 of the width, below bf16's own
#: rounding of the output (1.5e-3). Generic alpha in (1.5, 2) has b < 2, where f'' is unbounded
#: near the threshold, and alpha = 2 is Newton on a piecewise-linear function: a small step bounds
#: the remaining error less well there (interpreter runs at 8192 columns, bf16: 1e-2 error for
#: alpha = 1.7 on 0.25 * randn at 0.1 with 32 chunks; alpha = 2 on 0.01 * randn 8e-2 at 0.1 and
#: 4e-3 at 0.03; float32 alpha = 2 needs 0.001 for 1e-4).
TOL_AUTO = {
    ("16bit", "int"): 0.1, ("16bit", "generic"): 0.03, ("16bit", "2"): 0.03,
    ("float32", "int"): 0.01, ("float32", "generic"): 0.01, ("float32", "2"): 0.001,
}
TOL_CHOICES = ("auto", 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0)
CHUNK_CHOICES = (16, 32, 64, 128)
DEFAULT_CHUNKS = 128


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _tile(values: Mapping[str, Any], context: Mapping[str, Any]) -> int:
    """Columns per tile a launch really uses: the row, rounded up to a power of two, capped."""
    cols = context.get("cols")
    return values["block_n"] if cols is None else min(values["block_n"], max(16, _pow2(cols)))


TRITON = KernelSpec(
    kernel="entmax",
    backend="triton",
    doc="row-wise alpha-entmax; each program handles ROWS rows, in tiles of up to BLOCK_N columns",
    params=(
        Param("block_n", (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), 8192,
              "widest tile; a row uses min(block_n, next_pow2(cols)) columns per tile and is swept "
              "tile by tile in every iteration when longer"),
        Param("rows", (1, 2, 4, 8, 16), 1, "rows per program"),
        Param("num_warps", (1, 2, 4, 8, 16, 32), 8, "warps per program (capped at rows * tile / 32)"),
        Param("num_stages", (1, 2, 3, 4), 1, "software-pipelining stages of the multi-tile sweeps"),
        Param("niter", NITER_CHOICES, 10,
              "at most this many Halley sweeps for tau (fewer once every row's step is below tol)",
              accuracy=True),
        Param("init", ("subset", "bracket"), "subset",
              "first tau: the threshold of the row's chunk maxima (a lower bound of the row's, found "
              "in the max pass) or the bracket's lower end max - 1", accuracy=True),
        Param("chunks", CHUNK_CHOICES, DEFAULT_CHUNKS,
              "chunk maxima kept per row for init='subset' (capped at the tile width)", accuracy=True),
        Param("tol", TOL_CHOICES, "auto",
              "stop sweeping once every row's step is at most this fraction of its support width "
              "max z - tau ('auto': per dtype and alpha; 0: until the step is 0 or niter sweeps)",
              accuracy=True),
    ),
    constraints=(
        Constraint(("block_n", "rows"), "rows * block_n <= 65536 (register budget)",
                   lambda v, c: v["rows"] * v["block_n"] <= 65536),
        Constraint(("num_warps", "block_n", "rows"), "num_warps == 1 or num_warps * 32 <= rows * tile",
                   lambda v, c: v["num_warps"] == 1 or v["num_warps"] * 32 <= v["rows"] * _tile(v, c)),
        Constraint(("block_n",), "block_n <= max(64, next_pow2(cols)) (a wider tile repeats a narrower one)",
                   lambda v, c: "cols" not in c or v["block_n"] <= max(64, _pow2(c["cols"]))),
        Constraint(("rows",), "rows per program <= the problem's row count",
                   lambda v, c: "rows" not in c or v["rows"] <= max(1, _pow2(c["rows"]))),
        Constraint(("chunks", "init"), f"chunks only applies to init='subset' (else it stays {DEFAULT_CHUNKS})",
                   lambda v, c: v["init"] == "subset" or v["chunks"] == DEFAULT_CHUNKS),
    ),
    sources=("kernels/entmax.py", "kernels/declarations/entmax.py"),
)

TORCH = KernelSpec(
    kernel="entmax",
    backend="torch",
    doc="alpha-entmax in PyTorch ops, rows processed in chunks",
    params=(
        Param("row_chunk", (256, 1024, 4096, 16384, 65536), 4096, "rows per chunk (bounds memory)"),
        Param("niter", NITER_CHOICES, 8, "Halley-bisection iterations for tau", accuracy=True),
    ),
    sources=("kernels/torch_backend/entmax.py", "kernels/torch_backend/tau.py",
             "kernels/declarations/entmax.py"),
)

SPECS = {"triton": TRITON, "torch": TORCH}
