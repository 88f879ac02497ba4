"""The attention and entmax kernels compile for Hopper (sm_90) on this CPU machine (tau: for every start).

The Triton interpreter runs the kernels' arithmetic but not the compiler: layouts, the register
chains of the subset start, reductions and joins are only lowered by a real compile. Triton's
wheel carries ptxas, so ``triton.compile`` to a cubin needs no GPU; this catches a kernel that
would fail to build on the H200 before it reaches one. The signature comes from the plan the
library itself makes (``tau_launch``), so it is the launch a call would compile. Each compile runs
in a child process: this test session decorates kernels for the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[2]

#: element types of the kernels' pointer parameters (by name) for bf16 inputs
_POINTERS = {"Q": "bf16", "K": "bf16", "V": "bf16", "O": "bf16", "O2": "bf16", "DO": "bf16", "DK": "bf16",
             "DV": "bf16", "DQ": "bf16", "TAU": "fp32", "INVL": "fp32", "DELTA": "fp32", "GALPHA": "fp32",
             "MASK": "i8", "ROWS": "fp32", "LIST": "i32", "COUNT": "i32", "LENS": "i32", "STATS": "i32",
             "X": "bf16", "Y": "bf16"}
#: where a kernel's pointer differs (the fused backward adds dQ by atomics into float32)
_OVERRIDES = {"_bwd_fused_kernel": {"DQ": "fp32"}}


def _compile(launch) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = launch.fn.arg_names
    options = {k: launch.meta[k] for k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in launch.meta.items() if k not in options}
    n_pointers = len(names) - len(launch.scalars) - len(constexprs)
    types = {**_POINTERS, **_OVERRIDES.get(launch.fn.__name__, {})}
    signature = {name: "*" + types[name] for name in names[:n_pointers]}
    for name, value in zip(names[n_pointers:], launch.scalars):
        signature[name] = "fp32" if isinstance(value, float) else "i32"
    signature.update({name: "constexpr" for name in constexprs})
    assert set(signature) == set(names), "the plan does not cover the kernel's parameters"
    signature = {name: signature[name] for name in names}
    source = ASTSource(launch.fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm


def compile_tau(init: str, alpha: float) -> None:
    """Compile the tau kernel a default-config call with ``tau_init=init`` plans (the child's job)."""
    import torch

    from adasplash_tune.kernels.attention.common import Geometry
    from adasplash_tune.kernels.attention.tau import tau_launch
    from adasplash_tune.kernels.declarations.attention import TRITON

    q = torch.empty(1, 4, 1000, 64, dtype=torch.bfloat16)
    geo = Geometry.of(q, q[:, :2])
    config = TRITON.default().replace(tau_init=init)
    fused = init != "lo"  # the fused forward (the default) and the tau-only kernel of the staged one
    launch = tau_launch(geo, config, alpha, 0.125, True, init == "subset16", torch.bfloat16, False, fused)
    asm = _compile(launch)
    assert asm["cubin"] and ".target sm_90" in asm["ptx"]
    # One loop body per pass: QK^T in the dense pass and in the sweep, QK^T and P.V in the fused
    # forward. Every extra copy of a loop (a masked twin, a separate first sweep) adds its products
    # here and costs Triton's Coalesce pass (memory ops) x (kernel size)^2 of compile time: 2.6 s of
    # a 4 s first call on the H200 before the copies were merged (README, "Compile time").
    dots = asm["ttir"].count(" = tt.dot ")
    assert dots == (4 if fused else 2), f"{dots} tt.dot ops: a pass has more than one loop body"


def compile_products(kind: str) -> None:
    """Compile the staged forward (``kind="fwd"``) or one backward kernel ("q", "kv", "fused") of a
    default-config GQA call with varlen (the child's job)."""
    import torch

    from adasplash_tune.kernels.attention.backward import backward_launch
    from adasplash_tune.kernels.attention.common import Geometry
    from adasplash_tune.kernels.attention.forward import forward_launch
    from adasplash_tune.kernels.declarations.attention import TRITON

    q = torch.empty(2, 4, 1000, 80, dtype=torch.bfloat16)
    geo = Geometry.of(q, q[:, :2])
    config = TRITON.default()
    if kind == "fwd":
        launch = forward_launch(geo, config, 1.5, 0.1, True, True, torch.bfloat16, True, True)
    else:
        launch = backward_launch(kind, geo, config, 4 / 3, 0.1, True, True, torch.bfloat16, kind == "q")
    asm = _compile(launch)
    assert asm["cubin"] and ".target sm_90" in asm["ptx"]


def compile_entmax(cols: int, alpha: float) -> None:
    """Compile the standalone entmax forward a default-config call on (64, cols) bf16 rows plans
    (one tile for 8192 columns, several for more)."""
    import torch

    from adasplash_tune.kernels.declarations.entmax import TRITON
    from adasplash_tune.kernels.entmax import _forward_launch

    launch = _forward_launch(TRITON.default(), 64, cols, cols, cols, alpha, torch.bfloat16, True, False)
    asm = _compile(launch)
    assert asm["cubin"] and ".target sm_90" in asm["ptx"]
    # alpha = 1.5 and 2 count the support with one set.gt a score (a select there compiles to
    # packed predicate bit masks: kernels/entmax.py, _indicator)
    assert ("set.gt.f32.f32" in asm["ptx"]) == (alpha in (1.5, 2.0))


def _run_child(code: str) -> None:
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.fail("this Triton wheel carries no ptxas: the Hopper compile check cannot run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", "from tests.kernels.test_compile_hopper import *; " + code],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("alpha", [1.5, 1.7])
@pytest.mark.parametrize("init", ["subset", "subset16", "lo"])
def test_tau_kernel_compiles_for_sm90(init, alpha):
    _run_child(f"compile_tau({init!r}, {alpha!r})")


@pytest.mark.parametrize("kind", ["fwd", "q", "kv", "fused"])
def test_product_kernels_compile_for_sm90(kind):
    _run_child(f"compile_products({kind!r})")


@pytest.mark.parametrize("cols,alpha", [(8192, 1.5), (8192, 1.3), (32768, 2.0)])
def test_entmax_kernel_compiles_for_sm90(cols, alpha):
    _run_child(f"compile_entmax({cols!r}, {alpha!r})")
