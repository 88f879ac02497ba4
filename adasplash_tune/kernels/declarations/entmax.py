"""Declaration of the standalone alpha-entmax kernels (Triton and torch backends)."""

from __future__ import annotations

from typing import Any, Mapping

from ..spec import Constraint, KernelSpec, Param

NITER_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 30)

#: ``tau_tol="auto"``: the early-exit Halley step relative to the row's support width -tau, per
#: dtype and alpha class. Measured (interpreter, the kernel's own arithmetic) on randn rows of 8192
#: at scales 0.25, 1 and 4, alpha 1.5 / 2 / 1.3, from the subset start: 16-bit outputs stay at
#: their own rounding (bf16 <= 3.6e-3, fp16 <= 3.6e-4; gate 1e-2) and float32 below 6e-5 (gate
#: 1e-4). The worst rows are flat ones at alpha = 2 (Newton, support of most of the row): there
#: 0.01 leaves 3e-4 in float32 and 0.1 leaves 3e-2, hence 0.003 and, in 16 bits, 0.03 for every
#: alpha but 1.5, whose Halley steps converge fastest (0.1: <= 4e-5 in float32 terms).
#: Above alpha = 1.7 ("near2") the gradient gates 16 bits at 0.003 too: its weight
#: s = u^((2 - alpha)/(alpha - 1)) jumps at the support's edge as alpha nears 2, so a key that an
#: early exit leaves inside (or outside) the support weighs in full. On flat rows (x * 1e-3 to
#: 0.1, 1000-4097 columns, fp16 and bf16) 0.03 left gradient errors of 2e-2 at 1.8, 6e-2 at 1.85
#: and 8e-2 at 2 (gate 2e-2; forwards within theirs); 0.003 keeps them at 16-bit rounding.
TAU_TOL_AUTO = {("16bit", "1.5"): 0.1, ("16bit", "other"): 0.03, ("16bit", "near2"): 0.003,
                ("float32", "any"): 0.003}
#: alpha above this takes TAU_TOL_AUTO's ("16bit", "near2") in 16 bits.
NEAR2_ALPHA = 1.7


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
              "at most this many Halley-bisection iterations for tau (fewer once the step is below tau_tol)",
              accuracy=True),
        Param("tau_tol", ("auto", 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0), "auto",
              "stop iterating once every row's Halley step is at most this fraction of its support "
              "width max z - tau (auto: per dtype and alpha, TAU_TOL_AUTO; 0: always niter iterations)",
              accuracy=True),
        Param("tau_init", ("subset", "lo"), "subset",
              "first tau: the threshold of the row's chunk maxima (a lower bound of the root, found "
              "with the row max) or the bracket's lower end max - 1", accuracy=True),
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
