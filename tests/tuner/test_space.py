"""Search spaces: derived from the kernel declarations, layered per target, pruned before compiling."""

from __future__ import annotations

import itertools
import random

import pytest

from adasplash_tune.kernels.registry import get_spec
from adasplash_tune.tuner.space import build_space, device_context, stage_of, target_of

from .conftest import FAKE_GPU


@pytest.mark.parametrize("kernel", ["adasplash", "entmax"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_and_cpu_spaces_are_exactly_the_declared_knobs(kernel, backend):
    spec = get_spec(kernel, backend)
    for target in ("cuda", "cpu"):
        space = build_space(kernel, backend, target=target)
        assert space.names == spec.names
        for dim in space.dims:
            param = spec.param(dim.name)
            assert set(dim.choices) <= set(param.choices)
            assert dim.accuracy == param.accuracy
        assert space.accuracy_names == tuple(p.name for p in spec.params if p.accuracy)
        defaults = space.default_values()
        assert space.split(defaults) == (spec.default().as_dict(), {})


def test_stages_come_from_name_prefixes():
    assert [stage_of(n) for n in ("tau_block_m", "niter", "mask_n", "fwd_warps", "bwd_stages", "init")] == \
        ["tau", "tau", "tau", "fwd", "bwd", "tau"]
    space = build_space("adasplash", "triton", target="cuda")
    assert space.stages == ("tau", "fwd", "bwd")
    spec = get_spec("adasplash", "triton")
    for stage, prefix in (("fwd", "fwd_"), ("bwd", "bwd_")):
        assert space.stage_names(stage) == tuple(n for n in spec.names if n.startswith(prefix))
    tau = space.stage_names("tau")
    assert "niter" in tau and not any(n.startswith(("fwd_", "bwd_")) for n in tau)
    # the torch backend and entmax have no forward/backward knobs: one stage
    for kernel, backend in (("adasplash", "torch"), ("entmax", "triton"), ("entmax", "torch")):
        assert build_space(kernel, backend, target="cpu").stages == ("all",)
    with pytest.raises(ValueError, match="unknown stage"):
        space.stage_names("all")


def test_rocm_layers_its_own_knobs_on_the_spec():
    spec = get_spec("adasplash", "triton")
    space = build_space("adasplash", "triton", target="rocm")
    extras = [d for d in space.dims if d.origin == "rocm"]
    warps = [n for n in spec.names if n.endswith("warps")]
    assert len(extras) == 2 * len(warps)
    for name in warps:
        prefix = name[: -len("warps")]
        stage = space.dim(name).stage
        assert space.dim(f"{prefix}waves_per_eu").stage == stage
        assert space.dim(f"{prefix}matrix_instr_nonkdim").stage == stage
    # the spec's own knobs are all there, unchanged in name; the extras split off cleanly
    assert set(spec.names) <= set(space.names)
    values = space.default_values()
    spec_values, extra_values = space.split(values)
    assert set(spec_values) == set(spec.names) and set(extra_values) == {d.name for d in extras}
    # AMD: 64-wide wavefronts cap warps at 16, pipelines at 2 stages
    entmax = build_space("entmax", "triton", target="rocm")
    assert max(entmax.dim("num_warps").choices) == 16
    assert max(entmax.dim("num_stages").choices) <= 2
    assert {"waves_per_eu", "matrix_instr_nonkdim"} <= set(entmax.names)
    assert "waves_per_eu" not in build_space("entmax", "triton", target="cuda").names


def test_rocm_mfma_rule_prunes_tiles_smaller_than_the_instruction():
    space = build_space("adasplash", "triton", target="rocm")
    values = space.default_values()
    values.update(fwd_block_m=16, mask_m=16, fwd_matrix_instr_nonkdim=32, fwd_mode="staged")
    assert any("fwd_matrix_instr_nonkdim" in v for v in space.violations(values))
    # with the forward fused into the tau kernel the staged forward's knobs do not bind
    assert not any("fwd_matrix_instr_nonkdim" in v for v in space.violations({**values, "fwd_mode": "fused"}))
    values.update(fwd_block_m=64, fwd_block_n=64, mask_n=64)
    assert space.is_valid(values)


def test_shared_memory_bound_prunes_before_compiling():
    small = {"head_dim": 256, "dtype_bytes": 4, "max_shared_mem": 100 * 1024}
    space = build_space("adasplash", "triton", target="cuda", context=small)
    values = space.default_values()
    values.update(fwd_block_n=128, fwd_stages=4, mask_n=64, fwd_mode="staged")  # 3 * 128 * 256 * 4 bytes > 100 KiB
    assert any("max_shared_mem" in v for v in space.violations(values))
    # every stage at 16-wide tiles, two stages: each estimate stays well under 100 KiB
    values.update({n: 16 for n in values if n.endswith(("block_m", "block_n")) or n in ("mask_m", "mask_n")})
    values.update({n: 2 for n in values if n.endswith("stages")})
    assert space.is_valid(values), space.violations(values)
    # without a device limit the rule cannot judge, so it keeps the config
    assert build_space("adasplash", "triton", target="cuda", context={"head_dim": 256}).is_valid(
        {**values, "fwd_block_n": 128, "fwd_stages": 4})
    # the CPU interpreter has no shared memory limit at all
    assert not build_space("adasplash", "triton", target="cpu", context=small).rules


def test_device_context_and_target_from_fingerprint():
    assert device_context(FAKE_GPU) == {"max_shared_mem": FAKE_GPU["shared_mem"]}
    assert target_of("triton", FAKE_GPU) == "cuda"
    assert target_of("torch", None) == "cpu"
    assert target_of("triton", dict(FAKE_GPU, backend="rocm")) == "rocm"
    with pytest.raises(ValueError, match="unknown device backend"):
        target_of("triton", dict(FAKE_GPU, backend="tpu"))


@pytest.mark.parametrize("seq_len", [1, 100, 333])
def test_torch_chunks_beyond_the_sequence_collapse_to_one_choice(seq_len):
    space = build_space("adasplash", "torch", target="cpu", context={"seq_len": seq_len})
    declared = get_spec("adasplash", "torch").param("q_chunk").choices
    q = space.dim("q_chunk").choices
    assert [c for c in q if c >= seq_len] == [min(c for c in declared if c >= seq_len)]
    assert [c for c in q if c < seq_len] == [c for c in declared if c < seq_len]
    # the default maps onto the representative of its class
    assert space.default_values()["q_chunk"] in q
    rows = build_space("entmax", "torch", target="cpu", context={"rows": 7}).dim("row_chunk").choices
    assert rows == (256,)


def test_iter_valid_equals_the_pruned_cartesian_product():
    context = {"head_dim": 128, "dtype_bytes": 2, "max_shared_mem": 160 * 1024}
    space = build_space("adasplash", "triton", target="cuda", context=context)
    free = space.stage_names("fwd")
    fixed = space.default_values()
    got = list(space.iter_valid(free, fixed))
    brute = []
    for combo in itertools.product(*(space.dim(n).choices for n in free)):
        values = {**fixed, **dict(zip(free, combo))}
        inert = {n for n in free if n != "fwd_mode"} if values["fwd_mode"] == "fused" else set()
        if any(values[n] != fixed[n] for n in inert):  # the same config as its canonical point
            continue
        if not get_spec("adasplash", "triton").violations(values, context) and all(
                r.check(values, context) for r in space.rules if inert.isdisjoint(r.params)):
            brute.append(values)
    assert got == brute and 0 < len(got) < space.size(free)
    sample = space.sample(random.Random(3), free, fixed)
    assert sample in brute


def test_restrict_bounds_a_space_and_rejects_unknown_choices():
    space = build_space("entmax", "triton", target="cuda").restrict({"rows": (1, 2), "niter": (8,)})
    assert space.dim("rows").choices == (1, 2)
    assert space.free_names(space.names).count("niter") == 0
    with pytest.raises(ValueError, match="leaves no choice"):
        space.restrict({"rows": (3,)})
    with pytest.raises(ValueError, match="unknown knobs"):
        space.restrict({"bogus": (1,)})


def test_inert_knobs_collapse_to_one_point():
    """fwd_mode="fused" makes the staged forward's knobs inert (and bwd_mode="fused" the dQ
    kernel's): canonical() puts them at their defaults, the grid enumerates each distinct config
    once, sampling returns canonical points, and constraints on inert knobs do not bind."""
    space = build_space("adasplash", "triton", target="cuda")
    spec = get_spec("adasplash", "triton")
    default = space.default_values()
    fused = space.canonical({**default, "fwd_mode": "fused", "fwd_block_m": 128, "fwd_warps": 8})
    assert fused == {**default, "fwd_mode": "fused"}
    staged = space.canonical({**default, "fwd_mode": "staged", "fwd_block_m": 128})
    assert staged["fwd_block_m"] == 128
    back = space.canonical({**default, "bwd_mode": "fused", "bwd_q_block_m": 16, "bwd_block_m": 32})
    assert back["bwd_q_block_m"] == default["bwd_q_block_m"] and back["bwd_block_m"] == 32
    fwd = space.stage_names("fwd")
    points = list(space.iter_valid(fwd, default))
    assert sum(p["fwd_mode"] == "fused" for p in points) == 1
    keys = [tuple(p[n] for n in fwd) for p in points]
    assert len(keys) == len(set(keys)) and any(p["fwd_mode"] == "staged" for p in points)
    rng = random.Random(0)
    for _ in range(50):
        p = space.sample(rng, fwd, default)
        assert p == space.canonical(p)
    # fwd_block_m = 16 under a 64-row mask tile: invalid staged, irrelevant fused
    odd = {**spec.default().as_dict(), "fwd_block_m": 16, "mask_m": 64}
    assert spec.violations({**odd, "fwd_mode": "staged"}) and not spec.violations({**odd, "fwd_mode": "fused"})
    assert spec.validate({**odd, "fwd_mode": "fused"})["fwd_block_m"] == 16
