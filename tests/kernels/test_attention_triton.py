"""The Triton AdaSplash pipeline (backend="triton") against the fp64 oracle.

On CPU the kernels run under Triton's interpreter at tiny sizes; the ``gpu`` tests repeat the cases
on CUDA in every dtype and add long sequences. Every case runs at two or more config points (tile
shapes decoupled from the mask tile, early exit on or off), so a knob that breaks correctness shows.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import pytest
import torch

import adasplash_tune
from adasplash_tune.kernels.attention import op
from adasplash_tune.kernels.declarations.attention import TRITON, fit_triton_config
from adasplash_tune.kernels.reference import attention_reference, relative_error, tolerance
from adasplash_tune.kernels.torch_backend.alpha_grad import attention_alpha_grad
from adasplash_tune.kernels.spec import ConfigError

# (B, Hq, Hkv, N, D, alpha, causal, varlen lengths or None)
CASES = [
    (1, 1, 1, 1, 16, 1.5, False, None),
    (1, 2, 1, 33, 16, 1.5, True, None),
    (2, 2, 2, 100, 48, 1.25, False, (100, 37)),
    (1, 2, 2, 100, 80, 2.0, True, None),
    (2, 4, 2, 33, 80, 1.25, True, (0, 20)),
    (1, 1, 1, 100, 16, 2.0, False, (63,)),
    (1, 2, 1, 64, 48, 1.5, False, None),
    (1, 2, 1, 77, 96, 4 / 3, True, None),
    (1, 1, 1, 50, 16, 1.7, False, None),
    # N a multiple of every tile (EVEN_N: unbounded loads) with lengths that still mask tiles
    (2, 2, 1, 64, 32, 1.5, True, (64, 23)),
]

#: The configs below pin ``fwd_mode="staged"`` (their forward tiles are part of what they test);
#: the declared default and FUSED / FUSED_O2 run the one-launch forward.
#: every tile 16 (mask tile = compute tiles), fixed iteration count from the bracket's lower end
SMALL = dict(tau_block_m=16, tau_block_n=16, tau_sweep_block_n=16, mask_m=16, mask_n=16, fwd_block_m=16,
             fwd_block_n=16, bwd_block_m=16, bwd_block_n=16, bwd_q_block_m=16, bwd_q_block_n=16, niter=10,
             tau_tol=0.0, tau_init="lo", mask_source="sweeps", fwd_mode="staged")
#: compute tiles decoupled from a non-square mask tile, chunk bounds from the dense pass only,
#: sweeps coarser than the dense pass, early exit on
MIXED = dict(tau_block_m=32, tau_block_n=32, tau_sweep_block_n=64, mask_m=16, mask_n=32, fwd_block_m=32,
             fwd_block_n=64, bwd_block_m=16, bwd_block_n=64, bwd_q_block_m=64, bwd_q_block_n=32, niter=12,
             tau_tol=0.003, tau_init="mid", mask_source="max", fwd_warps=2, bwd_warps=2, tau_stages=1,
             fwd_mode="staged")
#: the subset start with sweeps finer than the dense pass and a 16 x 16 mask under 64-row tiles,
#: the fused backward (dQ by atomics)
SUBSET = dict(tau_block_m=64, tau_block_n=64, tau_sweep_block_n=16, mask_m=16, mask_n=16, fwd_block_m=32,
              fwd_block_n=16, bwd_block_m=32, bwd_block_n=16, bwd_q_block_m=16, bwd_q_block_n=32, niter=8,
              tau_tol=0.003, tau_init="subset", mask_source="sweeps", tau_warps=2, bwd_mode="fused",
              fwd_mode="staged")
#: the sixteen-maxima start over 16-key dense-pass tiles (fewer tiles than slots on short rows:
#: empty slots), tau, mask and forward in one launch, the split backward
SUBSET16 = dict(tau_block_m=32, tau_block_n=16, tau_sweep_block_n=32, mask_m=16, mask_n=16, fwd_mode="fused",
                bwd_block_m=16, bwd_block_n=32, bwd_q_block_m=32, bwd_q_block_n=16, niter=8, tau_tol=0.003,
                tau_init="subset16")
#: a second dense pass instead of chunk codes in the first, the fused backward on 64-key tiles
DENSE2 = dict(tau_block_m=32, tau_block_n=64, tau_sweep_block_n=32, mask_m=16, mask_n=32, fwd_block_m=64,
              fwd_block_n=32, bwd_block_m=16, bwd_block_n=64, niter=8, tau_tol=0.003, tau_dense_passes=2,
              bwd_mode="fused", fwd_mode="staged")
#: tau, mask and forward in one launch (fwd_mode="fused", forward on tau's 32 x 32 tiles over a
#: 16 x 16 mask; the fwd_* tiles are ignored), with the split backward
FUSED = dict(tau_block_m=32, tau_block_n=16, tau_sweep_block_n=32, mask_m=16, mask_n=16, fwd_mode="fused",
             fwd_block_m=16, fwd_block_n=64, bwd_block_m=32, bwd_block_n=16, niter=8, tau_tol=0.003,
             tau_init="mid")
#: the fused forward keeping O2 for the fused backward, after a second dense pass
FUSED_O2 = dict(DENSE2, fwd_mode="fused")
CONFIGS = {"small": SMALL, "mixed": MIXED, "subset": SUBSET, "subset16": SUBSET16, "dense2": DENSE2, "fused": FUSED,
           "fused_o2": FUSED_O2}


def _inputs(case, dtype, device, seed=0):
    batch, hq, hkv, n, d, alpha, causal, lens = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
               for h in (hq, hkv, hkv))
    varlen = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, alpha, causal, varlen


def _check(case, config, dtype, device, *, poison=False, grads=True):
    q, k, v, alpha, causal, varlen = _inputs(case, dtype, device)
    with op.poison_outputs() if poison else nullcontext():
        out = adasplash_tune.adasplash(q, k, v, alpha, causal, varlen, backend="triton", config=config)
        grad = torch.randn_like(out)
        if grads:
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "output element left unwritten (NaN)"
    ref = attention_reference(q, k, v, alpha, causal, varlen)
    err = relative_error(out, ref)
    assert err <= tolerance(dtype), f"forward error {err:.2e}"
    if varlen is not None:  # rows past a length are exactly zero
        for b, length in enumerate(varlen.tolist()):
            assert torch.all(out[b, :, length:] == 0)
    if not grads:
        return
    refs = torch.autograd.grad(ref, (q, k, v), grad)
    for name, got, want in zip("qkv", (dq, dk, dv), refs):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert not torch.isnan(got).any(), f"d{name} element left unwritten (NaN)"
        gerr = relative_error(got, want)
        assert gerr <= tolerance(dtype, grad=True), f"d{name} error {gerr:.2e}"


def _case_id(case):
    batch, hq, hkv, n, d, alpha, causal, lens = case
    return f"B{batch}H{hq}/{hkv}N{n}D{d}a{alpha}{'c' if causal else ''}{'v' if lens else ''}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_gradients_match_oracle(case, name, triton_device):
    _check(case, CONFIGS[name], torch.float32, triton_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype, triton_device):
    _check((1, 2, 1, 33, 48, 1.5, True, None), MIXED, dtype, triton_device)


def test_every_output_element_is_written(triton_device):
    """Outputs and gradients allocated NaN-filled come back without NaN (ragged N, empty rows)."""
    _check((2, 2, 1, 37, 80, 1.5, True, (0, 29)), MIXED, torch.float32, triton_device, poison=True)


def test_every_output_element_is_written_by_the_fused_forward(triton_device):
    _check((2, 2, 1, 37, 80, 1.5, True, (0, 29)), FUSED, torch.float32, triton_device, poison=True)


@pytest.mark.parametrize("causal,lens", [(False, None), (True, (45, 0)), (False, (70, 33))])
def test_fused_forward_matches_the_staged_pipeline(causal, lens, triton_device):
    """fwd_mode="fused" runs the staged forward's arithmetic on the same tiles: same tau, mask,
    1 / sum p and output, O2 included."""
    case = (len(lens) if lens else 1, 3, 1, 70, 48, 1.5, causal, lens)
    q, k, v, alpha, causal, varlen = _inputs(case, torch.float32, triton_device, seed=3)
    staged = dict(FUSED_O2, fwd_mode="staged", fwd_block_m=FUSED_O2["tau_block_m"],
                  fwd_block_n=FUSED_O2["tau_sweep_block_n"])
    runs = [op._forward(q.detach(), k.detach(), v.detach(), alpha, causal, varlen, 0.125,
                        op.checked_config(cfg, q), True) for cfg in (FUSED_O2, staged)]
    (out_f, stats_f, mask_f, o2_f), (out_s, stats_s, mask_s, o2_s) = runs
    assert torch.equal(stats_f[0], stats_s[0]) and torch.equal(mask_f, mask_s)
    torch.testing.assert_close(out_f, out_s, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats_f[1], stats_s[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(o2_f, o2_s, rtol=1e-6, atol=1e-7)


def test_default_config_with_accuracy_knobs(triton_device):
    """The declared default (128-row tiles on a 100-row problem) and an explicit niter override."""
    _check((1, 2, 1, 100, 16, 1.5, False, None), None, torch.float32, triton_device)
    q, k, v, alpha, causal, _ = _inputs((1, 1, 1, 50, 16, 1.75, True, None), torch.float32, triton_device)
    ref = attention_reference(q, k, v, alpha, causal)
    out = adasplash_tune.adasplash(q, k, v, alpha, causal, niter=12, backend="triton",
                                   config={"tau_tol": 0.0, "tau_init": "lo"})
    assert relative_error(out, ref) <= tolerance(torch.float32)


@pytest.mark.parametrize("init", ["subset", "subset16", "mid"])
@pytest.mark.parametrize("source", ["max", "sweeps"])
def test_block_mask_covers_the_support(source, init, triton_device):
    """Every (query, key) pair with p > 0 lies in an active mask tile; lists match the mask."""
    case = (1, 2, 1, 100, 16, 1.5, False, None)
    q, k, v, alpha, causal, _ = _inputs(case, torch.float32, triton_device)
    q = q.detach() * 2
    k = q[:, :1].detach().clone()  # each query attends mostly to its own key: a sparse support
    cfg = TRITON.validate(dict(MIXED, mask_source=source, tau_init=init))
    stages = op.forward_stages(q, k, v.detach(), alpha, causal, None, 0.25, cfg)
    mask = stages["mask"].cpu()
    z = 0.25 * (q.double() @ k.double().transpose(-1, -2)).cpu()
    from adasplash_tune.kernels.reference import entmax_reference

    p = entmax_reference(z, alpha)[0]
    tiles = mask.repeat_interleave(cfg["mask_m"], 1).repeat_interleave(cfg["mask_n"], 2)[:, :100, :100]
    assert torch.all(tiles[(p > 0)]), "a supported pair lies in an inactive mask tile"
    density = op.block_density(stages["mask"], 100, (cfg["mask_m"], cfg["mask_n"]), causal)
    assert 0 < density < 1
    # query-major lists: entries are the active compute tiles, sorted, within the counts
    lists = stages["lists"]
    count = lists.count.cpu()
    index = lists.index.cpu()
    r_m, r_n = cfg["fwd_block_m"] // cfg["mask_m"], cfg["fwd_block_n"] // cfg["mask_n"]
    for bh in range(mask.shape[0]):
        for qt in range(lists.n_own):
            block = mask[bh, qt * r_m:(qt + 1) * r_m]
            want = [j for j in range(lists.n_cand) if block[:, j * r_n:(j + 1) * r_n].any()]
            total, lead = count[bh, qt].tolist()
            assert index[bh, qt, :total].tolist() == want
            assert 0 <= lead <= total


def test_tau_threshold_matches_oracle(triton_device):
    """The returned tau (z units) gives rows summing to one."""
    q, k, v, alpha, causal, _ = _inputs((1, 1, 1, 64, 16, 1.25, False, None), torch.float32, triton_device)
    cfg = TRITON.validate(SMALL)
    tau = op.forward_stages(q.detach(), k.detach(), v.detach(), alpha, causal, None, 0.25, cfg)["tau"].cpu()
    z = (alpha - 1) * 0.25 * (q.detach() @ k.detach().transpose(-1, -2)).cpu().double()[0, 0]
    mass = (z - tau.double()[0, :, None]).clamp(min=0).pow(1 / (alpha - 1)).sum(-1)
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-4)


def test_custom_op_pair_matches_autograd_function(triton_device):
    case = (2, 2, 1, 33, 48, 1.5, True, (33, 12))
    q, k, v, alpha, causal, varlen = _inputs(case, torch.float32, triton_device)
    cfg = TRITON.validate(MIXED)
    out = op.adasplash_triton(q, k, v, alpha, causal, varlen, 0.2, cfg)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), grad)
    with torch.no_grad():
        out2, residuals = op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, 0.2, cfg)
        shapes = op.adasplash_triton_residuals(q, k, v, cfg)
        assert [(tuple(r.shape), r.dtype) for r in residuals] == shapes
        got = op.adasplash_triton_backward(grad, q, k, v, out2, residuals, alpha, causal, varlen, 0.2, cfg)
    assert torch.equal(out2, out.detach())
    for a, b in zip(got, want):
        assert relative_error(a, b) <= 1e-6
    # the config-free layout a compiled graph that selects at run time is traced with
    for name in ("mixed", "subset"):
        cfg = TRITON.validate(CONFIGS[name])
        with torch.no_grad():
            out3, fixed = op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, 0.2, cfg, fixed_residuals=True)
            assert [(tuple(r.shape), r.dtype) for r in fixed] == op.adasplash_triton_residuals(q, k, v, None)
            got = op.adasplash_triton_backward(grad, q, k, v, out3, fixed, alpha, causal, varlen, 0.2, cfg)
        ref = attention_reference(q, k, v, alpha, causal, varlen, scale=0.2)
        for a, b in zip(got, torch.autograd.grad(ref, (q, k, v), grad)):
            assert relative_error(a, b) <= tolerance(torch.float32, grad=True)


@pytest.mark.parametrize("init", ["subset", "subset16", "lo"])
def test_sparse_sweeps_skip_tiles_and_stay_exact(init, triton_device):
    """On a peaked input the Halley sweeps visit only some key tiles (kernel counters), the mask
    is sparse, and tau still gives rows summing to one."""
    from adasplash_tune.kernels.attention.common import Geometry
    from adasplash_tune.kernels.attention.tau import STATS_SLOTS, solve_tau

    gen = torch.Generator().manual_seed(3)
    n, d = 160, 16
    k = torch.randn(1, 1, n, d, generator=gen)
    q = (4.0 * k + 0.1 * torch.randn(1, 2, n, d, generator=gen)).to(triton_device)  # each row: its own key
    k = k.to(triton_device)
    cfg = TRITON.validate(dict(SUBSET, tau_init=init, tau_tol=0.0, niter=6))
    geo = Geometry.of(q, k)
    mask = op._new_mask(geo, cfg, q.device)
    stats = torch.zeros(STATS_SLOTS, dtype=torch.int32, device=q.device)
    tau = solve_tau(q, k, None, 1.5, 0.25, False, cfg, mask, stats=stats).cpu().double()
    st = stats.cpu().tolist()
    programs, half = st[0], (STATS_SLOTS - 1) // 2
    assert programs == 2 * triton_cdiv(n, cfg["tau_block_m"])
    ran = st[1 + half: 1 + half + 6]  # programs that ran sweep k (early exit once the step is 0)
    assert ran[0] == ran[1] == programs and all(a >= b for a, b in zip(ran, ran[1:]))
    per_program = triton_cdiv(n, cfg["tau_sweep_block_n"])
    visited = st[1:7]
    assert all(v <= r * per_program for v, r in zip(visited, ran))
    assert visited[1] < ran[1] * per_program  # the sweeps after the first skip key tiles
    z = 0.5 * 0.25 * (q.double() @ k.double().transpose(-1, -2)).cpu()[0]
    mass = (z - tau.view(2, n, 1)).clamp(min=0).pow(2).sum(-1)
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-4)
    assert 0 < op.block_density(mask, n, (16, 16), False) < 0.5


def test_sixteen_maxima_start_closer_than_eight(triton_device):
    """tau_init="subset16" starts Halley nearer the root than "subset" when a row's support spans
    more tiles than eight (randn, ~39 keys in the support over 32 tiles): after one sweep from each
    start the rows' mass is an order of magnitude nearer one."""
    from adasplash_tune.kernels.attention.common import Geometry
    from adasplash_tune.kernels.attention.tau import solve_tau

    gen = torch.Generator().manual_seed(5)
    n, d, scale = 512, 16, 0.15
    q = torch.randn(1, 1, n, d, generator=gen).to(triton_device)
    k = torch.randn(1, 1, n, d, generator=gen).to(triton_device)
    z = 0.5 * scale * (q.double() @ k.double().transpose(-1, -2)).cpu()[0, 0]
    errors = {}
    for init in ("subset", "subset16"):
        cfg = TRITON.validate(dict(tau_block_m=16, tau_block_n=16, tau_sweep_block_n=16, mask_m=16, mask_n=16,
                                   tau_init=init, tau_tol=0.0, niter=1, tau_warps=2))
        mask = op._new_mask(Geometry.of(q, k), cfg, q.device)
        tau = solve_tau(q, k, None, 1.5, scale, False, cfg, mask).cpu().double()[0]
        mass = (z - tau[:, None]).clamp(min=0).pow(2).sum(-1)
        errors[init] = (mass - 1).abs().mean().item()
    assert errors["subset16"] < 0.3 * errors["subset"], errors


@pytest.mark.parametrize("name", ["mixed", "subset"])
def test_block_mask_ignores_the_buffers_prior_content(name, triton_device):
    """The tau kernel writes every mask entry from what it computed, never from what the buffer
    held: sweep tiles wider than the dense pass's tiles (MIXED: 64 vs 32 keys) reach chunks the
    dense pass never coded, past a causal block's last key."""
    from adasplash_tune.kernels.attention.common import Geometry
    from adasplash_tune.kernels.attention.tau import solve_tau

    q, k, _, alpha, causal, varlen = _inputs((2, 2, 1, 37, 16, 1.5, True, (37, 20)), torch.float32, triton_device)
    q, k = q.detach(), k.detach()
    cfg = TRITON.validate(CONFIGS[name])
    geo = Geometry.of(q, k)
    runs = []
    for fill in (127, -127):
        mask = op._new_mask(geo, cfg, q.device).fill_(fill)
        runs.append((solve_tau(q, k, varlen, alpha, 0.2, causal, cfg, mask), mask))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("causal,lens", [(False, None), (True, None), (True, (70, 0)), (False, (129, 33))])
def test_list_pair_matches_one_tiling_at_a_time(causal, lens, triton_device):
    """The backward's two tilings from one launch are exactly the lists of two separate launches
    (entries up to each tile's count, and both counts)."""
    from adasplash_tune.kernels.attention.common import Geometry
    from adasplash_tune.kernels.attention.mask import tile_list_pair, tile_lists

    gen = torch.Generator().manual_seed(5)
    n = 129
    q = torch.empty(2, 3, n, 16, device=triton_device)
    geo = Geometry.of(q, q)
    mask_tile, q_block, kv_block = (16, 32), (32, 64), (64, 32)
    tm, tn = triton_cdiv(n, 16), triton_cdiv(n, 32)
    mask = (torch.rand(geo.rows, tm, tn, generator=gen) < 0.4).to(torch.int8).to(triton_device)
    varlen = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=triton_device)
    pair = tile_list_pair(mask, geo, varlen, causal, mask_tile, q_block, kv_block)
    alone = (tile_lists(mask, geo, varlen, causal, mask_tile, q_block, transposed=False),
             tile_lists(mask, geo, varlen, causal, mask_tile, kv_block, transposed=True))
    for got, want in zip(pair, alone):
        assert (got.n_own, got.n_cand) == (want.n_own, want.n_cand)
        assert torch.equal(got.count.cpu(), want.count.cpu())
        counts = want.count.cpu()[..., 0]
        assert counts.sum() > 0
        for r in range(geo.rows):
            for o in range(want.n_own):
                c = int(counts[r, o])
                assert torch.equal(got.index.cpu()[r, o, :c], want.index.cpu()[r, o, :c])


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_shared_memory_constraint_rejects_before_launch(monkeypatch):
    context = {"head_dim": 256, "dtype_bytes": 4, "max_shared_mem": 100 * 1024}
    big = dict(SMALL, fwd_block_m=128, fwd_block_n=128, fwd_stages=4)
    with pytest.raises(ConfigError, match="fwd shared-memory estimate"):
        TRITON.validate(big, context)
    # the op checks the device limit first: no kernel is ever compiled for it
    q = torch.randn(1, 1, 32, 256)
    monkeypatch.setattr(op, "_context", lambda head_dim, dtype, device: context)
    # a private memo for this test (checked configs are memoised per config, head dim, dtype, device)
    monkeypatch.setattr(op, "_checked_for", functools.lru_cache(maxsize=None)(op._checked_for.__wrapped__))
    monkeypatch.setattr(op, "_forward", lambda *a, **kw: pytest.fail("launched an invalid config"))
    with pytest.raises(ConfigError, match="shared-memory"):
        op.adasplash_triton(q, q, q, 1.5, False, None, 0.1, TRITON.validate(big))
    # the built-in default is shrunk to fit instead
    fitted = op.checked_config(TRITON.default(), q)
    assert fitted == fit_triton_config(TRITON.default(), context)
    assert not TRITON.violations(fitted.as_dict(), context)


def test_declaration_constraints():
    with pytest.raises(ConfigError, match="fwd_block_n % mask_n == 0"):
        TRITON.validate(dict(MIXED, fwd_block_n=16))
    with pytest.raises(ConfigError, match="tau_block_n % mask_n == 0"):
        TRITON.validate(dict(MIXED, tau_block_n=16))
    with pytest.raises(ConfigError, match="tau_sweep_block_n % mask_n == 0"):
        TRITON.validate(dict(MIXED, tau_sweep_block_n=16))
    assert TRITON.param("niter").accuracy and TRITON.param("tau_tol").accuracy
    # tile shapes are independent knobs: forward tiles coarser than, and unequal to, the mask tile
    cfg = TRITON.validate(MIXED)
    assert (cfg["fwd_block_m"], cfg["fwd_block_n"]) != (cfg["mask_m"], cfg["mask_n"])


def test_head_dim_above_256_is_rejected_before_launch(monkeypatch, triton_device):
    monkeypatch.setattr(op, "_forward", lambda *a, **kw: pytest.fail("launched"))
    q = torch.randn(1, 1, 8, 272, device=triton_device)
    with pytest.raises(ValueError, match="head dim"):
        adasplash_tune.adasplash(q, q, q, backend="triton")


def test_cpu_smoke_benchmark(tmp_path, triton_device):
    if triton_device != "cpu":
        pytest.skip("the smoke mode is the CPU interpreter's")
    from tests.scripts import load_script

    bench = load_script("benchmarks/bench_attention.py")
    out = tmp_path / "bench.json"
    results = bench.main(["--cpu-smoke", "--out", str(out)])
    import json

    data = json.loads(out.read_text())
    assert data["rows"] and data["rows"] == results["rows"]
    ours = [r for r in data["rows"] if r["impl"] == "ours"]
    assert ours and all(r["fwd_ms"] > 0 and r["fwd_err"] <= tolerance(torch.float32) for r in ours)
    assert all(0 < r["density"] <= 1 for r in ours)


# --------------------------------------------------------------------------- GPU


# every case in bfloat16 at two configs, and in float32 / float16 at one (compiles stay few)
GPU_MATRIX = (
    [(case, name, torch.bfloat16) for case in CASES
     for name in ("mixed", "default", "subset", "subset16", "dense2", "fused", "fused_o2")]
    + [(case, "small", torch.float32) for case in CASES]
    + [(CASES[1], "mixed", torch.float16), (CASES[4], "default", torch.float16),
       (CASES[3], "default", torch.float32)]
)


@pytest.mark.gpu
@pytest.mark.parametrize("case,name,dtype", GPU_MATRIX,
                         ids=[f"{_case_id(c)}-{n}-{str(d)[6:]}" for c, n, d in GPU_MATRIX])
def test_gpu_cases(case, name, dtype):
    _check(case, CONFIGS.get(name), dtype, "cuda", poison=True)


LARGE = [
    (1, 2, 1, 4096, 64, 1.5, False, None),
    (1, 2, 2, 4096, 64, 1.5, True, (4096,)),
    (1, 2, 1, 4096, 128, 2.0, True, None),
    (1, 1, 1, 4096, 80, 1.25, False, None),
    (1, 1, 1, 16384, 64, 1.5, True, None),
    (1, 1, 1, 16384, 64, 1.5, False, None),
]


LARGE_MATRIX = [(case, torch.bfloat16) for case in LARGE] + [(LARGE[3], torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("case,dtype", LARGE_MATRIX,
                         ids=[f"{_case_id(c)}-{str(d)[6:]}" for c, d in LARGE_MATRIX])
def test_gpu_large(case, dtype):
    _check(case, None, dtype, "cuda", poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [LARGE[0], LARGE[1], LARGE[4]], ids=_case_id)
def test_gpu_large_fused_forward(case):
    _check(case, {"fwd_mode": "fused"}, torch.bfloat16, "cuda", poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fwd_mode,entry", [("staged", "op"), ("fused", "op"), ("fused", "api")])
def test_gpu_cuda_graph_capture(fwd_mode, entry):
    """No host synchronisation: forward + backward capture in a CUDA graph and replay exactly
    (through the public API the captured call is warm: it takes kernels/attention/warm.py's
    short paths)."""
    case = (2, 4, 2, 1000, 64, 1.5, True, (1000, 517))
    q, k, v, alpha, causal, varlen = _inputs(case, torch.bfloat16, "cuda")
    cfg = TRITON.default().replace(fwd_mode=fwd_mode)
    grad = torch.randn_like(q)

    def step():
        if entry == "api":  # int32 lengths on the device: the short paths take them as they are
            out = adasplash_tune.adasplash(q, k, v, alpha, causal, varlen, scale=0.125, config=cfg)
        else:
            out = op.adasplash_triton(q, k, v, alpha, causal, varlen, 0.125, cfg)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # warm-up: compiles every kernel outside the capture
        eager = step()  # the second call records nothing new: warm
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["default", "subset", "fused"])
def test_gpu_direct_launch_matches_triton_path(name, monkeypatch):
    """Re-launching compiled kernels directly (kernels/launch.py) gives exactly what Triton's own
    launches give (up to the fused backward's atomic dQ), also for inputs whose addresses are not
    16-byte aligned (a new specialisation)."""
    case = (2, 4, 2, 300, 80, 1.5, True, (300, 129))
    q, k, v, alpha, causal, varlen = _inputs(case, torch.bfloat16, "cuda")
    cfg = op.checked_config(TRITON.validate(CONFIGS.get(name, {})), q)
    grad = torch.randn_like(q)

    def step(q, k, v):
        out = op.adasplash_triton(q, k, v, alpha, causal, varlen, 0.1, cfg)
        return (out, *torch.autograd.grad(out, (q, k, v), grad))

    def misaligned(t):  # the same values at an address 2 bytes past a 16-byte boundary
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t.detach())
        return view.requires_grad_()

    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "0")
    want = step(q, k, v)
    want_odd = step(*map(misaligned, (q, k, v)))
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "1")
    for _ in range(2):  # the first call records each planned launch, the second launches directly
        got = step(q, k, v)
        got_odd = step(*map(misaligned, (q, k, v)))
        for i, (a, b) in enumerate(zip(got + got_odd, want + want_odd)):
            if i % 4 == 1 and cfg["bwd_mode"] == "fused":  # dQ by float atomics: order-dependent rounding
                assert relative_error(a, b) <= 1e-2
            else:
                assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,config", [
    ((2, 4, 2, 300, 80), torch.bfloat16, {}),
    ((1, 3, 3, 128, 64), torch.float16, {"mask_m": 32, "mask_n": 32, "bwd_q_block_n": 32}),
    ((1, 2, 1, 77, 96), torch.float32, {}),
], ids=["bf16-gqa", "fp16-mask32", "fp32-d96"])
def test_gpu_warm_calls_match_the_general_path(shape, dtype, config, monkeypatch):
    """Warm calls through the public API take the short paths of kernels/attention/warm.py (one
    workspace, raw addresses) and give exactly what the general path gives: forward without
    grad, forward+backward for every set of inputs needing a gradient, aligned and misaligned
    inputs, strided views of a packed projection with a strided gradient, int32 varlen lengths."""
    from adasplash_tune.kernels.attention import warm

    b, hq, hkv, n, d = shape
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(b, hq, n, d, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    grad = torch.randn(q.shape, device="cuda", dtype=dtype, generator=gen)
    cfg = TRITON.validate(config)

    def misaligned(t):  # the same values 2 bytes past a 16-byte boundary
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    def packed(q, k, v):  # views of one (B, N, Hq + 2 Hkv, D) projection, as a model's layer makes them
        buf = torch.cat([t.transpose(1, 2) for t in (q, k, v)], dim=2)
        return tuple(t.transpose(1, 2) for t in buf.split([hq, hkv, hkv], dim=2))

    lengths = torch.tensor([n, n // 3 + 1, 0][:b], dtype=torch.int32, device="cuda")
    strided_grad = grad.transpose(1, 2).contiguous().transpose(1, 2)  # the same values, strided
    inputs = [(q, k, v, None, grad), (q, k, v, lengths, grad), (*packed(q, k, v), None, strided_grad)]
    if dtype != torch.float32:  # alignment is dtype-blind; float32 kernels take minutes to compile
        inputs.append((*(misaligned(t) for t in (q, k, v)), None, grad))
    needs = [(False, False, False), (True, True, True), (True, False, False), (False, True, True)]

    def run(tensors, need):
        *qkv, varlen, grad_out = tensors
        leaves = [t.detach().requires_grad_(w) for t, w in zip(qkv, need)]
        if not any(need):
            with torch.no_grad():
                return [adasplash_tune.adasplash(*leaves, 1.5, True, varlen, config=cfg)]
        out = adasplash_tune.adasplash(*leaves, 1.5, True, varlen, config=cfg)
        return [out, *torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)]

    hits = {"fwd": 0, "bwd": 0}

    def counted(name, fn):
        def wrapper(*args):
            result = fn(*args)
            hits[name] += result is not None
            return result
        return wrapper

    monkeypatch.setattr(op, "fused_forward", counted("fwd", warm.fused_forward))
    monkeypatch.setattr(op, "split_backward", counted("bwd", warm.split_backward))
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "0")
    want = [run(t, need) for t in inputs for need in needs]
    assert hits == {"fwd": 0, "bwd": 0}
    monkeypatch.setenv("ADASPLASH_TUNE_DIRECT_LAUNCH", "1")
    for _ in range(3):  # the first round records the launches, the next ones take the short paths
        got = [run(t, need) for t in inputs for need in needs]
        for a_list, b_list in zip(got, want):
            for a, b in zip(a_list, b_list):
                assert torch.equal(a, b)
    assert hits["fwd"] >= 2 * len(inputs) * len(needs) and hits["bwd"] >= 2 * len(inputs) * (len(needs) - 1)


# --------------------------------------------------------------------------- learnable alpha


ALPHA_CASES = [
    (1, 2, 1, 33, 16, 1.5, True, None),
    (2, 2, 2, 40, 48, 1.25, False, (40, 0)),
    (1, 2, 2, 50, 80, 2.0, True, (37,)),
    (2, 4, 2, 33, 16, 4 / 3, True, (33, 20)),
    (1, 1, 1, 64, 16, 1.7, False, None),
]


def _alpha_grad_check(case, config, dtype, device):
    q, k, v, alpha, causal, varlen = _inputs(case, dtype, device, seed=3)
    a = torch.tensor(alpha, device=device, requires_grad=True)
    out = adasplash_tune.adasplash(q, k, v, a, causal, varlen, backend="triton", config=config)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    dq, dalpha = torch.autograd.grad(out, (q, a), grad)
    # the oracle: the closed form in float64 on the same inputs, and d(dq) as usual
    want = attention_alpha_grad(grad.double(), q.double(), k.double(), v.double(), alpha, causal, varlen,
                                q.shape[-1] ** -0.5, niter=60)
    ref = attention_reference(q, k, v, alpha, causal, varlen)
    (want_dq,) = torch.autograd.grad(ref, (q,), grad)
    assert dalpha.shape == () and torch.isfinite(dalpha)
    # a sum over every (row, key): its error is bounded by the error of its terms, not of the sum
    scale = attention_alpha_grad(grad.double().abs(), q.double(), k.double(), v.double(), alpha, causal, varlen,
                                 q.shape[-1] ** -0.5, niter=60).abs() + want.abs()
    err = abs(dalpha.double().item() - want.item()) / max(scale.item(), 1e-12)
    assert err <= tolerance(dtype, grad=True), f"dalpha {dalpha.item():.6g} vs {want.item():.6g} ({err:.2e})"
    assert relative_error(dq, want_dq) <= tolerance(dtype, grad=True)


@pytest.mark.parametrize("name", ["small", "mixed", "subset", "default"])
@pytest.mark.parametrize("case", ALPHA_CASES, ids=_case_id)
def test_alpha_gradient_in_the_dq_pass_matches_oracle(case, name, triton_device):
    """A learnable alpha's gradient comes from the dQ kernel (the fused mode switches to split)."""
    _alpha_grad_check(case, CONFIGS.get(name), torch.float32, triton_device)


def test_alpha_gradient_matches_finite_differences(triton_device):
    q, k, v, alpha, causal, varlen = _inputs((2, 2, 1, 30, 16, 1.5, True, (30, 11)), torch.float32, triton_device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(triton_device)
    a = torch.tensor(alpha, device=triton_device, requires_grad=True)
    out = adasplash_tune.adasplash(q, k, v, a, causal, varlen, backend="triton", config=SMALL)
    (dalpha,) = torch.autograd.grad(out, (a,), grad)
    h = 1e-5
    qd, kd, vd, gd = (t.detach().double() for t in (q, k, v, grad))

    def loss(at: float) -> float:
        return float((attention_reference(qd, kd, vd, at, causal, varlen) * gd).sum())

    want = (loss(alpha + h) - loss(alpha - h)) / (2 * h)
    assert abs(dalpha.item() - want) <= tolerance(torch.float32, grad=True) * abs(want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ALPHA_CASES + [(2, 6, 6, 1000, 64, 1.5, True, (1000, 517)),
                                                (1, 4, 2, 2048, 128, 1.25, False, None)], ids=_case_id)
def test_gpu_alpha_gradient(case, dtype):
    _alpha_grad_check(case, None, dtype, "cuda")
