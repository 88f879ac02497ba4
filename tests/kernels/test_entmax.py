"""adasplash_tune.entmax on the torch and triton backends against the fp64 oracle.

On a machine without CUDA the triton backend runs under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so these cases stay tiny: a few rows, at most 255 columns.
"""

from __future__ import annotations

import pytest
import torch

import adasplash_tune
from adasplash_tune.kernels import entmax as triton_entmax_module
from adasplash_tune.kernels.entmax import entmax_triton, launch_params
from adasplash_tune.kernels.reference import entmax_reference, relative_error, tolerance
from adasplash_tune.kernels.registry import get_spec
from adasplash_tune.kernels.spec import ConfigError
from adasplash_tune.kernels.torch_backend.entmax import entmax_torch

ALPHAS = (1.25, 1.5, 2.0)
COLS = (1, 7, 100, 255)

#: Two or more launch configs per backend. For triton the second one sweeps rows of 100 and 255
#: columns in 64-column tiles (multi-tile path) with two rows per program over an odd row count.
CONFIGS = {
    "torch": [None, {"row_chunk": 256, "niter": 12}],
    "triton": [None, {"block_n": 64, "rows": 2, "num_warps": 2, "niter": 12}],
}
#: Rows per case, per config: 260 rows make two chunks of 256 on the torch backend.
ROWS = {"torch": [3, 260], "triton": [3, 3]}


def _input(shape, dtype, device, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)


def _check(out, x, grad, alpha, dim=-1):
    """Forward and input gradient of ``out`` (computed from leaf ``x``) vs the oracle."""
    (gx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().to(torch.float64).requires_grad_()
    ref = entmax_reference(x64, alpha, dim=dim)
    (gref,) = torch.autograd.grad(ref, x64, grad.to(torch.float64))
    assert out.dtype == x.dtype and out.shape == x.shape
    fwd_err = relative_error(out, ref)
    grad_err = relative_error(gx, gref)
    assert fwd_err <= tolerance(x.dtype), f"forward error {fwd_err:.2e}"
    assert grad_err <= tolerance(x.dtype, grad=True), f"gradient error {grad_err:.2e}"


@pytest.fixture(params=["torch", "triton"])
def backend_device(request, triton_device):
    return request.param, ("cpu" if request.param == "torch" else triton_device)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_forward_and_grad_match_oracle(backend_device, alpha, cols, dtype):
    backend, device = backend_device
    for i, config in enumerate(CONFIGS[backend]):
        seed = 1000 * i + 10 * cols + int(10 * alpha) + (7 if dtype == torch.bfloat16 else 0)
        shape = (ROWS[backend][i], cols)
        x = _input(shape, dtype, device, seed).requires_grad_()
        grad = _input(shape, dtype, device, seed + 1, scale=1.0)
        out = adasplash_tune.entmax(x, alpha, backend=backend, config=config)
        _check(out, x, grad, alpha)


def test_float16_once(backend_device):
    backend, device = backend_device
    x = _input((3, 37), torch.float16, device, seed=5).requires_grad_()
    grad = _input((3, 37), torch.float16, device, seed=6, scale=1.0)
    _check(adasplash_tune.entmax(x, 1.5, backend=backend), x, grad, 1.5)


@pytest.mark.parametrize("alpha", (1.25, 2.0))
def test_dim_not_last(backend_device, alpha):
    backend, device = backend_device
    x = _input((2, 19, 3), torch.float32, device, seed=9).requires_grad_()
    grad = _input((2, 19, 3), torch.float32, device, seed=10, scale=1.0)
    _check(adasplash_tune.entmax(x, alpha, dim=1, backend=backend), x, grad, alpha, dim=1)


def test_niter_override(backend_device):
    """niter takes precedence over the config; too few iterations are visibly inaccurate."""
    backend, device = backend_device
    # small-scale scores over 255 columns: a dense output, the slowest case for tau; the triton
    # kernel starts at max - 1 here (its subset start is already close after one iteration)
    base = {"tau_init": "lo"} if backend == "triton" else {}
    x = _input((2, 255), torch.float32, device, seed=12, scale=0.3)
    ref = entmax_reference(x.cpu().double(), 2.0)
    rough = adasplash_tune.entmax(x, 2.0, niter=1, backend=backend, config=base)
    fine = adasplash_tune.entmax(x, 2.0, niter=40, backend=backend, config=base)  # beyond the declared choices
    assert relative_error(rough.cpu(), ref) > 1e-2
    assert relative_error(fine.cpu(), ref) <= tolerance(torch.float32)
    explicit = adasplash_tune.entmax(x, 2.0, backend=backend, config={**base, "niter": 1})
    assert torch.equal(explicit, rough)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_torch_backend_gradcheck_fp64(alpha):
    cfg = get_spec("entmax", "torch").validate({"niter": 30})
    x = _input((3, 8), torch.float64, "cpu", seed=13).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: entmax_torch(t, alpha, cfg), (x,))


def test_torch_backend_keeps_fp64():
    cfg = get_spec("entmax", "torch").validate({"niter": 30})
    x = _input((4, 50), torch.float64, "cpu", seed=14)
    out = entmax_torch(x, 1.5, cfg)
    assert out.dtype == torch.float64
    assert relative_error(out, entmax_reference(x, 1.5)) <= tolerance(torch.float64)


@pytest.fixture
def fresh_plans():
    """Launches are planned once per problem: plan this test's with its flags, and forget them."""
    planned = (triton_entmax_module._forward_launch, triton_entmax_module._backward_launch)
    for fn in planned:
        fn.cache_clear()
    yield
    for fn in planned:
        fn.cache_clear()


@pytest.mark.parametrize("alpha", (1.5, 1.3))
def test_triton_fused_reduction_path(triton_device, monkeypatch, alpha, fresh_plans):
    """The tuple reductions used on GPUs (the interpreter normally takes plain tl.sum)."""
    if triton_device == "cpu":
        monkeypatch.setattr(triton_entmax_module, "_hardware_flags",
                            lambda is_cuda, interpreted: {"FUSED": True, "FAST_LOG": False})
    spec = get_spec("entmax", "triton")
    for cols, config in ((7, {"rows": 2}), (70, {"block_n": 64, "num_warps": 1})):
        x = _input((3, cols), torch.float32, triton_device, seed=cols).requires_grad_()
        grad = _input((3, cols), torch.float32, triton_device, seed=cols + 1, scale=1.0)
        _check(entmax_triton(x, alpha, spec.validate(config)), x, grad, alpha)


def test_launch_params_derive_from_config():
    spec = get_spec("entmax", "triton")
    lp = launch_params(spec.default(), 100)
    assert (lp.block_n, lp.num_warps, lp.single) == (128, 4, True)
    lp = launch_params(spec.validate({"block_n": 1024, "num_warps": 16}), 255)
    assert (lp.block_n, lp.rows, lp.num_warps, lp.single) == (256, 1, 8, True)
    lp = launch_params(spec.validate({"block_n": 64, "rows": 4, "num_warps": 4}), 255)
    assert (lp.block_n, lp.rows, lp.num_warps, lp.single) == (64, 4, 4, False)
    lp = launch_params(spec.default(), 8192)
    assert (lp.block_n, lp.num_warps, lp.single, lp.niter) == (8192, 8, True, 10)
    assert (lp.tau_tol, lp.subset_start, lp.chunks) == ("auto", True, 2048)  # chunks of 4 columns
    assert launch_params(spec.validate({"block_n": 64, "rows": 4, "num_warps": 4}), 255).chunks == 32
    assert launch_params(spec.default(), 1).block_n == 16


@pytest.mark.parametrize(
    "backend,config,match",
    [
        ("triton", {"block_n": 100}, "block_n"),
        ("triton", {"bogus": 1}, "bogus"),
        ("triton", {"row_chunk": 256}, "row_chunk"),
        ("triton", {"rows": 16, "block_n": 16384}, "rows"),
        ("triton", {"niter": 0}, "niter"),
        ("torch", {"block_n": 64}, "block_n"),
        ("torch", {"row_chunk": 3}, "row_chunk"),
    ],
)
def test_explicit_config_errors(backend, config, match, triton_device):
    device = "cpu" if backend == "torch" else triton_device
    x = _input((2, 5), torch.float32, device, seed=15)
    with pytest.raises(ConfigError, match=match):
        adasplash_tune.entmax(x, 1.5, backend=backend, config=config)


def test_config_type_and_backend_mismatch(triton_device):
    x = _input((2, 5), torch.float32, triton_device, seed=16)
    with pytest.raises(TypeError, match="config"):
        adasplash_tune.entmax(x, 1.5, backend="triton", config="fast")
    with pytest.raises(ConfigError, match="entmax/triton"):
        entmax_triton(x, 1.5, get_spec("entmax", "torch").default())
    with pytest.raises(ConfigError, match="entmax/torch"):
        entmax_torch(x.cpu(), 1.5, get_spec("entmax", "triton").default())
    with pytest.raises(ValueError, match="2-D"):
        entmax_triton(x.reshape(-1), 1.5, get_spec("entmax", "triton").default())


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("alpha", (1.25, 1.5, 2.0, 1.75))
@pytest.mark.parametrize(
    "shape,config",
    [
        ((512, 8192), None),
        ((1000, 1000), {"block_n": 256, "rows": 2, "num_warps": 4}),
        ((77, 3000), {"block_n": 1024, "num_warps": 8, "num_stages": 2}),
        ((4096, 100), {"block_n": 128, "rows": 8, "num_warps": 4}),
    ],
)
def test_gpu_larger_shapes(alpha, dtype, shape, config):
    x = _input(shape, dtype, "cuda", seed=shape[1]).requires_grad_()
    grad = _input(shape, dtype, "cuda", seed=shape[1] + 1, scale=1.0)
    out = adasplash_tune.entmax(x, alpha, backend="triton", config=config)
    _check(out, x, grad, alpha)


# --------------------------------------------------------------------------- early exit, start


def _forward_error(out: torch.Tensor, x: torch.Tensor, alpha: float) -> float:
    return relative_error(out.cpu(), entmax_reference(x.cpu().double(), alpha))


#: (rows, cols, config): the single-tile path (odd columns, 2 rows per program over 5 rows: the
#: last program holds one padded row) and the tiled path (64-column tiles, 4 rows per program).
EXIT_CASES = [
    (5, 37, {"rows": 2, "num_warps": 1}),
    (3, 255, {}),
    (5, 200, {"block_n": 64, "rows": 4, "num_warps": 2}),
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("alpha", (1.5, 2.0, 1.3))
@pytest.mark.parametrize("init", ("subset", "lo"))
def test_early_exit_matches_oracle(triton_device, dtype, alpha, init):
    """The default tau_tol ("auto") passes the forward gate in every dtype, from either start,
    on both paths, and for scores from flat (scale 0.25, large support) to peaked (scale 8)."""
    spec = get_spec("entmax", "triton")
    for i, (rows, cols, values) in enumerate(EXIT_CASES):
        cfg = spec.validate({**values, "tau_init": init})
        for scale in (0.25, 2.0, 8.0):
            x = _input((rows, cols), dtype, triton_device, seed=100 * i + int(4 * scale), scale=scale)
            err = _forward_error(entmax_triton(x, alpha, cfg), x, alpha)
            assert err <= tolerance(dtype), f"{cols} cols, scale {scale}: error {err:.2e}"


def _degenerate_rows(cols: int) -> torch.Tensor:
    """All equal (zeros, then a constant), one-hot, two-hot, and a very peaked row (randn x 100)."""
    gen = torch.Generator().manual_seed(cols)
    rows = torch.zeros(6, cols)
    rows[1] = 3.0
    rows[2, cols // 2] = 10.0
    rows[3, 0] = rows[3, -1] = 10.0
    rows[4] = 100.0 * torch.randn(cols, generator=gen)
    rows[5] = torch.linspace(-1.0, 1.0, cols)
    return rows


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("alpha", (1.5, 2.0, 1.3))
def test_degenerate_rows(triton_device, dtype, alpha):
    """Rows whose tau sits on a bracket end (all equal: hi; one-hot: lo, f = 0 there) or that
    stop at once share programs with rows that go on; none spoils the other."""
    spec = get_spec("entmax", "triton")
    for cols, values in ((37, {"rows": 2, "num_warps": 1}), (100, {"block_n": 64, "rows": 4, "num_warps": 2})):
        x = _degenerate_rows(cols).to(device=triton_device, dtype=dtype)
        out = entmax_triton(x, alpha, spec.validate(values))
        assert torch.isfinite(out).all()
        ref = entmax_reference(x.cpu().double(), alpha)
        for r in range(x.shape[0]):
            err = relative_error(out[r].cpu(), ref[r])
            assert err <= tolerance(dtype), f"row {r} ({cols} cols): error {err:.2e}"
        assert torch.allclose(out[0].float(), torch.full((cols,), 1.0 / cols, device=out.device), rtol=1e-2)
        assert out[2, cols // 2] == 1 and out[2].sum() == 1


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("alpha", (2.0, 1.9))
def test_default_early_exit_keeps_gradients_near_alpha_2(triton_device, dtype, alpha):
    """Near alpha = 2 the backward weight s = p^(2 - alpha) jumps at the support's edge: a flat
    row of 4097 columns left with keys wrongly in or out of the support by an early exit at
    tau_tol 0.03 (16-bit "auto" before) had gradient errors of 4e-2 to 8e-2 (gate 2e-2)."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-3, 1e-2, 0.1] * 3).view(9, 1)
    x = (scales * torch.randn(9, 4097, generator=gen)).to(device=triton_device, dtype=dtype).requires_grad_()
    y = adasplash_tune.entmax(x, alpha, backend="triton")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=triton_device, dtype=dtype)
    (dx,) = torch.autograd.grad(y, (x,), grad)
    xr = x.detach().cpu().double().requires_grad_()
    ref = entmax_reference(xr, alpha)
    (want,) = torch.autograd.grad(ref, (xr,), grad.cpu().double())
    for r in range(x.shape[0]):
        assert relative_error(y[r].cpu(), ref[r]) <= tolerance(dtype), f"row {r}"
        assert relative_error(dx[r].cpu(), want[r]) <= tolerance(dtype, grad=True), f"row {r}"


#: Forward error allowed on flat float32 rows per tau_tol: from 0.01 down the float32 gate, 0.03
#: the 16-bit gate; 0.3 and 0.1 are rough (0.1 is the 16-bit default of alpha = 1.5 only).
TOL_BOUNDS = {0.3: 0.1, 0.1: 0.05, 0.03: 1e-2, 0.01: 1e-4, 0.003: 1e-4, 0.001: 1e-4, 0.0: 1e-4}


@pytest.mark.parametrize("tol", sorted(TOL_BOUNDS))
def test_tau_tol_choices(triton_device, tol):
    """Every declared tau_tol runs on both paths, within its bound on flat rows (scale 0.25: a
    support of most of the row, the slowest case)."""
    spec = get_spec("entmax", "triton")
    assert set(spec.param("tau_tol").choices) == set(TOL_BOUNDS) | {"auto"}
    x = _input((3, 255), torch.float32, triton_device, seed=21, scale=0.25)
    for alpha in (1.5, 2.0, 1.3):
        for values in ({}, {"block_n": 64, "rows": 2, "num_warps": 2}):
            out = entmax_triton(x, alpha, spec.validate({**values, "tau_tol": tol}))
            assert torch.allclose(out.sum(-1), torch.ones(3, device=out.device), atol=1e-5)
            err = _forward_error(out, x, alpha)
            assert err <= TOL_BOUNDS[tol], f"alpha {alpha} {values}: error {err:.2e}"


def test_early_exit_stops_early_and_tol_zero_runs_niter(triton_device):
    """With a loose step the result equals a run capped at few iterations (it stopped there);
    tau_tol = 0 runs all niter iterations: niter = 1 and 3 then differ."""
    spec = get_spec("entmax", "triton")
    x = _input((2, 255), torch.float32, triton_device, seed=22, scale=0.3)
    for alpha in (1.5, 2.0, 1.3):
        loose = entmax_triton(x, alpha, spec.validate({"tau_tol": 0.3, "niter": 30, "tau_init": "lo"}))
        capped = [entmax_triton(x, alpha, spec.validate({"tau_tol": 0.3, "niter": n, "tau_init": "lo"}))
                  for n in (1, 2, 3, 4, 5, 6)]
        assert any(torch.equal(loose, c) for c in capped), f"alpha {alpha}: no early stop within 6 iterations"
        one = entmax_triton(x, alpha, spec.validate({"tau_tol": 0.0, "niter": 1, "tau_init": "lo"}))
        three = entmax_triton(x, alpha, spec.validate({"tau_tol": 0.0, "niter": 3, "tau_init": "lo"}))
        assert not torch.equal(one, three)


@pytest.mark.parametrize("values", ({"rows": 4, "num_warps": 1}, {"block_n": 64, "rows": 4, "num_warps": 2}))
def test_padded_rows_do_not_hold_the_exit(triton_device, values):
    """A program with one valid row and three padded ones (zeros: an all-equal row, slow to
    converge) stops when the valid row does: its output is the one-row-per-program output."""
    spec = get_spec("entmax", "triton")
    x = _input((5, 100), torch.float32, triton_device, seed=23, scale=2.0)
    for alpha in (1.5, 2.0, 1.3):
        common = {"tau_tol": 0.3, "tau_init": "lo"}
        many = entmax_triton(x, alpha, spec.validate({**values, **common}))
        alone = entmax_triton(x[4:], alpha, spec.validate({**values, **common, "rows": 1}))
        assert torch.equal(many[4:], alone)


def test_subset_start_needs_fewer_iterations(triton_device):
    """The chunk-maxima start is close: one capped iteration from it beats three from max - 1."""
    spec = get_spec("entmax", "triton")
    x = _input((4, 255), torch.float32, triton_device, seed=24, scale=0.5)
    for alpha in (1.5, 2.0, 1.3):
        sub = entmax_triton(x, alpha, spec.validate({"tau_init": "subset", "niter": 1, "tau_tol": 0.0}))
        lo = entmax_triton(x, alpha, spec.validate({"tau_init": "lo", "niter": 3, "tau_tol": 0.0}))
        assert _forward_error(sub, x, alpha) < _forward_error(lo, x, alpha)


def test_accuracy_knobs_declared_and_old_configs_load():
    """tau_tol and tau_init are accuracy knobs with defaults; a stored config from before they
    existed validates with them filled in, and a Config built without them still launches."""
    from adasplash_tune.kernels.entmax import resolve_tol
    from adasplash_tune.kernels.spec import Config

    spec = get_spec("entmax", "triton")
    assert spec.param("tau_tol").accuracy and spec.param("tau_init").accuracy
    assert spec.param("tau_tol").default == "auto" and spec.param("tau_init").default == "subset"
    old = {"block_n": 4096, "niter": 3, "num_stages": 3, "num_warps": 2, "rows": 1}  # a shipped entry
    cfg = spec.validate(old)
    assert cfg["tau_tol"] == "auto" and cfg["tau_init"] == "subset" and cfg["niter"] == 3
    bare = Config("entmax", "triton", tuple(sorted(old.items())))
    lp = launch_params(bare, 8192)
    assert (lp.tau_tol, lp.subset_start, lp.niter) == ("auto", True, 3)
    assert resolve_tol("auto", torch.float32, 1.5) == 0.003
    assert resolve_tol("auto", torch.bfloat16, 1.5) == 0.1
    assert resolve_tol("auto", torch.float16, 1.3) == 0.03
    assert resolve_tol("auto", torch.float16, 2.0) == resolve_tol("auto", torch.bfloat16, 1.8) == 0.003
    assert resolve_tol(0.0, torch.float32, 1.5) < 0
    with pytest.raises(ConfigError, match="tau_tol"):
        spec.validate({"tau_tol": 0.5})
    with pytest.raises(ConfigError, match="tau_init"):
        launch_params(Config("entmax", "triton", tuple(sorted({**old, "tau_init": "mid"}.items()))), 100)


def test_launch_plans_are_per_dtype():
    """A plan re-launches the kernel compiled for its first call's pointer types, so the same
    shape in another dtype must get a plan of its own (on the H200 a shared backward plan read
    bfloat16 gradients through the float16 kernel, and float32 ones out of bounds)."""
    cfg = get_spec("entmax", "triton").default()
    plans = {dtype: triton_entmax_module._backward_launch(cfg, 4, 16, 16, 16, 16, 1.5, (dtype, dtype), True, False)
             for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    assert len({id(p) for p in plans.values()}) == 3
    fwd = {dtype: triton_entmax_module._forward_launch(cfg, 4, 16, 16, 16, 1.5, dtype, True, False)
           for dtype in (torch.float32, torch.bfloat16)}
    assert fwd[torch.float32] is not fwd[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gpu_warm_forward_matches_the_general_path(dtype, monkeypatch):
    """A repeated entmax call takes the planned launch with raw addresses; same values as Triton's
    own launch path, for a contiguous input and a strided one (which the short path leaves alone)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(300, 700, device="cuda", dtype=dtype, generator=gen)
    inputs = [x, x[:, :500]]
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "0")
    want = [adasplash_tune.entmax(t, alpha=1.5) for t in inputs]
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "1")
    triton_entmax_module._WARM_FORWARD.clear()
    for _ in range(3):
        for t, w in zip(inputs, want):
            assert torch.equal(adasplash_tune.entmax(t, alpha=1.5), w)
    keys = list(triton_entmax_module._WARM_FORWARD)
    assert [key[1] for key in keys] == [x.shape]  # the contiguous input only


# --------------------------------------------------------------------------- the certified start


@pytest.mark.parametrize("per_chunk", (2, 4, 8))
def test_chunk_top2_counts_ties_and_padding(triton_device, per_chunk):
    """Each chunk's largest and second largest value, a tie counted twice, -inf padding kept, for
    chunks of 2 and 4 columns (max/min networks) and of 8 (the general path)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, C1, C2, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
        r = tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_N)
        z = tl.load(X + r[:, None] * BLOCK_N + c[None, :])
        c1, c2 = triton_entmax_module._chunk_top2(z, ROWS, BLOCK_N, CHUNKS)
        k = tl.arange(0, CHUNKS)
        tl.store(C1 + r[:, None] * CHUNKS + k[None, :], c1)
        tl.store(C2 + r[:, None] * CHUNKS + k[None, :], c2)

    rows, chunks = 2, 4
    cols = chunks * per_chunk
    x = torch.randn(rows, cols)
    x[0, 1] = x[0, 1 + chunks * (per_chunk - 1)] = 9.0  # chunk 1 holds a tie at its max
    x[1, 3] = x[1, 3 + chunks] = -9.0  # chunk 3 of row 1: a tie at the bottom
    x[1, 2::chunks] = float("-inf")  # chunk 2 of row 1: all padding
    x = x.to(triton_device)
    c1 = torch.empty(rows, chunks, device=triton_device)
    c2 = torch.empty_like(c1)
    probe[(1,)](x, c1, c2, ROWS=rows, BLOCK_N=cols, CHUNKS=chunks)
    strided = x.cpu().reshape(rows, cols // chunks, chunks)  # chunk k: the columns = k mod chunks
    top = strided.sort(dim=1, descending=True).values
    assert torch.equal(c1.cpu(), top[:, 0]) and torch.equal(c2.cpu(), top[:, 1])
    assert c2[0, 1] == 9.0 and c2[1, 2] == float("-inf")


@pytest.mark.parametrize("alpha", (1.5, 2.0, 1.3))
@pytest.mark.parametrize("config", [None, {"block_n": 64, "rows": 4, "num_warps": 2}])
def test_rows_solved_by_their_chunk_maxima_and_rows_that_are_not_share_a_launch(triton_device, alpha, config):
    """Sharp rows (the chunk maxima hold the whole support: a multi-tile row is never swept again)
    and flat ones (it is) in the same programs, multi-tile (certified) and one-tile, in float32
    against the oracle; also a sharp row whose two largest scores share a chunk."""
    spec = get_spec("entmax", "triton")
    cfg = spec.validate(config or {})
    rows, cols = 8, 200
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    x[0::2] *= 40.0  # sharp: a support of one or two scores
    x[1::2] *= 0.01  # ... flat
    x[2, 0] = x[2, 128] = 300.0  # two equal maxima in one chunk (chunk 0 in both tilings)
    x = x.to(triton_device).requires_grad_()
    grad = torch.randn(rows, cols, generator=torch.Generator().manual_seed(4)).to(triton_device)
    _check(entmax_triton(x, alpha, cfg), x, grad, alpha)


@pytest.mark.parametrize("case", ["all_equal", "minus_inf_columns", "ties_at_the_top", "max_in_ragged_tile"])
@pytest.mark.parametrize("alpha", (1.5, 1.3))
def test_certified_rows_with_ties_and_masked_scores(triton_device, case, alpha):
    """The multi-tile (certified) path on rows that stress the second-maximum bookkeeping: every
    score equal, -inf columns, many equal top scores, the max in the last, partial tile."""
    spec = get_spec("entmax", "triton")
    x = torch.randn(5, 301, generator=torch.Generator().manual_seed(11))
    if case == "all_equal":
        x = torch.full((5, 301), 0.7)
    elif case == "minus_inf_columns":
        x[:, ::3] = float("-inf")
    elif case == "ties_at_the_top":
        x = torch.round(x * 2) * 5.0
    else:
        x[:, -1] = 1e4
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(device=triton_device, dtype=dtype)
        out = entmax_triton(xi, alpha, spec.validate({"block_n": 64, "rows": 2, "num_warps": 2}))
        assert torch.isfinite(out).all()
        assert relative_error(out, entmax_reference(xi.double(), alpha)) <= tolerance(dtype)
