"""Declaration of the standalone alpha-entmax kernels (Triton and torch backends)."""

from __future__ import annotations

from ..spec import Constraint, KernelSpec, Param

NITER_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 30)

TRITON = KernelSpec(
    kernel="entmax",
    backend="triton",
    doc="row-wise alpha-entmax; each program handles ROWS rows, sweeping the row in BLOCK_N tiles",
    params=(
        Param("block_n", (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), 1024,
              "columns per tile; a row longer than this is swept several times"),
        Param("rows", (1, 2, 4, 8, 16), 1, "rows per program"),
        Param("num_warps", (1, 2, 4, 8, 16, 32), 4),
        Param("num_stages", (1, 2, 3, 4), 1),
        Param("niter", NITER_CHOICES, 10, "Halley-bisection iterations for tau", accuracy=True),
    ),
    constraints=(
        Constraint(("block_n", "rows"), "rows * block_n <= 65536 (register/shared budget)",
                   lambda v, c: v["rows"] * v["block_n"] <= 65536),
        Constraint(("num_warps", "block_n", "rows"), "num_warps * 32 <= rows * block_n",
                   lambda v, c: v["num_warps"] * 32 <= v["rows"] * v["block_n"]),
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
