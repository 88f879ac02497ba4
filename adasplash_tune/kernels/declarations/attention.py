"""Declaration of the AdaSplash attention kernels (Triton pipeline and blockwise torch backend)."""

from __future__ import annotations

from ..spec import Constraint, KernelSpec, Param

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

# The Triton pipeline's declaration is owned by kernels/attention/ (see its README section);
# this draft is replaced there as the kernels take shape.
TRITON = KernelSpec(
    kernel="adasplash",
    backend="triton",
    doc="Triton AdaSplash: tau sweeps -> block mask -> sparse forward / backward",
    params=(
        Param("tau_block_m", TILES, 64),
        Param("tau_block_n", TILES, 64),
        Param("tau_warps", (2, 4, 8), 4),
        Param("tau_stages", (1, 2, 3, 4), 2),
        Param("niter", NITER_CHOICES, 8, "tau iterations", accuracy=True),
        Param("mask_m", TILES, 64),
        Param("mask_n", TILES, 64),
        Param("fwd_block_m", TILES, 64),
        Param("fwd_block_n", TILES, 64),
        Param("fwd_warps", (2, 4, 8), 4),
        Param("fwd_stages", (1, 2, 3, 4), 2),
        Param("bwd_block_m", TILES, 64),
        Param("bwd_block_n", TILES, 64),
        Param("bwd_warps", (2, 4, 8), 4),
        Param("bwd_stages", (1, 2, 3, 4), 2),
    ),
    constraints=(
        Constraint(("fwd_block_m", "mask_m"), "fwd_block_m % mask_m == 0",
                   lambda v, c: v["fwd_block_m"] % v["mask_m"] == 0),
        Constraint(("fwd_block_n", "mask_n"), "fwd_block_n % mask_n == 0",
                   lambda v, c: v["fwd_block_n"] % v["mask_n"] == 0),
    ),
    sources=("kernels/attention", "kernels/declarations/attention.py"),
)

SPECS = {"triton": TRITON, "torch": TORCH}
