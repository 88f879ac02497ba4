"""What a fresh process imports: ``import adasplash_tune`` and a first eager call on CPU must not pull
in the compiler (torch._dynamo, sympy, Inductor), the tuner (optuna), the ORM (SQLAlchemy) or,
on the torch backend, Triton. A behavioural check (which modules are in ``sys.modules``), not a
timing: the import times are ``benchmarks/bench_host.py``'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

HEAVY = ("torch._dynamo", "torch._inductor", "sympy", "optuna", "sqlalchemy", "triton")

CHILD = r"""
import json, sys
heavy = {heavy!r}
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
import torch
before = loaded()
import adasplash_tune
after_import = loaded()
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 2, 24, 16, generator=g, requires_grad=True) for _ in range(3))
out = adasplash_tune.adasplash(q, k, v, 1.5, True, torch.tensor([24, 9]))
out.sum().backward()
alpha = torch.tensor(1.3, requires_grad=True)
adasplash_tune.adasplash(q, k, v, alpha).sum().backward()
with torch.no_grad():
    adasplash_tune.adasplash(q, k, v, 2.0)
x = torch.randn(5, 40, generator=g, requires_grad=True)
adasplash_tune.entmax(x, 1.25).sum().backward()
adasplash_tune.select("adasplash", q, k, v)
print(json.dumps({{"before": before, "after_import": after_import, "after_calls": loaded(),
                  "grads": [t.grad is not None for t in (q, k, v, alpha, x)]}}))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> dict:
    """One child process: import, then eager calls in the default mode with a real user cache file."""
    from adasplash_tune.cache.store import open_store

    cache = tmp_path_factory.mktemp("imports") / "configs.sqlite"
    open_store(str(cache)).close()
    env = dict(os.environ, ADASPLASH_TUNE_CACHE=str(cache), PYTHONPATH=str(REPO))
    for name in ("ADASPLASH_TUNE_MODE", "ADASPLASH_TUNE_RECORD", "ADASPLASH_TUNE_SHIPPED_DIR", "TRITON_INTERPRET"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", CHILD.format(heavy=HEAVY)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_calls_ran_with_gradients(fresh_process):
    assert fresh_process["grads"] == [True] * 5


@pytest.mark.parametrize("stage", ["after_import", "after_calls"])
def test_no_compiler_tuner_or_triton_on_the_eager_cpu_path(fresh_process, stage):
    unexpected = {"torch._dynamo", "torch._inductor", "sympy", "optuna", "triton"} - set(fresh_process["before"])
    assert not unexpected & set(fresh_process[stage]), fresh_process


def test_no_sqlalchemy_after_import(fresh_process):
    assert "sqlalchemy" not in fresh_process["after_import"]


def test_no_sqlalchemy_after_eager_calls(fresh_process):
    assert "sqlalchemy" not in fresh_process["after_calls"]


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the adasplash_tune modules a source file imports (anywhere in it)."""
    import ast

    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("adasplash_tune")}


@pytest.mark.parametrize("layer,above", [
    ("adasplash_tune/selection.py", ("adasplash_tune.api", "adasplash_tune.ops", "adasplash_tune.compiled")),
    ("adasplash_tune/ops.py", ("adasplash_tune.api", "adasplash_tune.compiled")),
    ("adasplash_tune/compiled.py", ("adasplash_tune.api",)),
])
def test_the_call_path_imports_point_down(layer, above):
    """api -> compiled -> ops -> selection -> kernels / cache.loader: nothing imports a layer above it."""
    imported = _imported_modules(REPO / layer)
    assert not {name for name in imported if name.startswith(above)}, imported
