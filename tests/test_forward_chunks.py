"""The row-chunked forward (issue 14): past ``op._SCRATCH_BUDGET_BYTES`` of int32 scratch, the
Triton forward runs tau -> lists -> forward once per row chunk into slices of the full buffers.

The plan is checked directly (pure Python); the chunked runs, with the budget monkeypatched small,
must give exactly the unchunked output, residuals and gradients, and match the fp64 oracle.
"""

from __future__ import annotations

import pytest
import torch

import adasplash_tune
from adasplash_tune.kernels.attention import op
from adasplash_tune.kernels.attention.common import Geometry
from adasplash_tune.kernels.declarations.attention import TRITON
from adasplash_tune.kernels.launch import Launch
from adasplash_tune.kernels.reference import relative_error
from tests.kernels.test_attention_triton import CONFIGS, _case_id, _check, _inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALE = 0.2


def _row_bytes(geo: Geometry, cfg) -> int:
    """Scratch bytes of one query head (the scratch is linear in the rows)."""
    return 4 * op._forward_buffers(Geometry(1, 1, 1, geo.seq_len, geo.head_dim), cfg)[1]


def _expected_chunks(geo: Geometry, cfg, budget: int) -> int | None:
    """How many chunks the plan should make: the fewest of the coarsest unit that fits."""
    rb, g = _row_bytes(geo, cfg), geo.group
    if geo.rows * rb <= budget:
        return None
    if geo.q_heads * rb <= budget:
        return -(-geo.batch // (budget // (geo.q_heads * rb)))
    if g * rb <= budget:
        return geo.batch * -(-geo.kv_heads // (budget // (g * rb)))
    return geo.batch * geo.kv_heads * -(-g // max(1, budget // rb))


# --------------------------------------------------------------------------- the plan


PLAN_GEOMETRIES = [Geometry(1, 8, 8, 300, 64), Geometry(3, 4, 2, 129, 16), Geometry(2, 6, 2, 77, 48),
                   Geometry(5, 4, 1, 64, 16), Geometry(1, 12, 3, 200, 128), Geometry(4, 1, 1, 33, 16)]


@pytest.mark.parametrize("name", ["mixed", "subset", "default"])
@pytest.mark.parametrize("geo", PLAN_GEOMETRIES, ids=str)
def test_chunk_plan_covers_rows_in_whole_units_within_budget(geo, name):
    cfg = TRITON.validate(CONFIGS.get(name, {}))
    rb, g, hq = _row_bytes(geo, cfg), geo.group, geo.q_heads
    total = 4 * op._forward_buffers(geo, cfg)[1]
    assert total == geo.rows * rb
    q = torch.empty(geo.batch, hq, geo.seq_len, geo.head_dim, device="meta")
    k = torch.empty(geo.batch, geo.kv_heads, geo.seq_len, geo.head_dim, device="meta")
    budgets = sorted({0, 1, rb - 1, rb, rb + 1, 2 * rb, 3 * rb + 7, g * rb, g * rb - 1, 2 * g * rb, hq * rb,
                      hq * rb + 1, 2 * hq * rb, total - 1, total, total + 1})
    for budget in budgets:
        chunks = op.forward_chunks(geo, cfg, budget)
        want = _expected_chunks(geo, cfg, budget)
        if want is None:
            assert chunks is None and op._forward_plan(geo, cfg, budget)[1:] == (total // 4, None)
            continue
        assert len(chunks) == want, (budget, chunks)
        rows = []
        for c in chunks:
            rows.extend(range(c.r0, c.r1))
            # one batch element's heads, or whole batch elements
            assert c.b1 == c.b0 + 1 or (c.h0, c.h1) == (0, hq)
            assert (c.b0 * hq + c.h0, (c.b1 - 1) * hq + c.h1) == (c.r0, c.r1)
            # whole kv-head groups, or query heads inside one group (only when a group does not fit)
            whole = c.h0 % g == 0 and c.h1 % g == 0
            assert whole or (c.h0 // g == (c.h1 - 1) // g and g * rb > budget)
            assert (c.kv0, c.kv1) == (c.h0 // g, -(-c.h1 // g))
            assert c.geo == Geometry.of(q[c.b0:c.b1, c.h0:c.h1], k[c.b0:c.b1, c.kv0:c.kv1])
            assert q[c.b0:c.b1, c.h0:c.h1].is_contiguous() and k[c.b0:c.b1, c.kv0:c.kv1].is_contiguous()
            # the chunk's scratch fits, unless the chunk is a single query head
            assert 4 * op._forward_buffers(c.geo, cfg)[1] <= budget or c.r1 - c.r0 == 1
        assert rows == list(range(geo.rows)), "every row exactly once, in order"
        shape, scratch, planned = op._forward_plan(geo, cfg, budget)
        assert planned == chunks and shape == op._forward_buffers(geo, cfg)[0]
        assert scratch == max(op._forward_buffers(c.geo, cfg)[1] for c in chunks)


@pytest.mark.parametrize("fwd_mode", ["staged", "fused"])
def test_chunk_plan_at_the_issue_shape(fwd_mode):
    """(1, 8, 131072, 64) with the default tiles: 134 MB of scratch in one launch; one head per
    chunk under the default budget (a head's tau sweep lists alone are 16 MiB; staged, the
    forward's lists add their counts)."""
    cfg = TRITON.default().replace(fwd_mode=fwd_mode)
    geo = Geometry(1, 8, 8, 131072, 64)
    head = 2048 * 2048 + (2048 * 2 if fwd_mode == "staged" else 0)
    assert 4 * op._forward_buffers(geo, cfg)[1] == 8 * head * 4
    shape, scratch, chunks = op._forward_plan(geo, cfg, op._SCRATCH_BUDGET_BYTES)
    assert [(c.h0, c.h1) for c in chunks] == [(h, h + 1) for h in range(8)]
    assert 4 * scratch == head * 4
    # GQA: a 4-head group does not fit, so its heads go one by one
    _, _, gqa = op._forward_plan(Geometry(1, 8, 2, 131072, 64), cfg, op._SCRATCH_BUDGET_BYTES)
    assert [(c.h0, c.h1, c.kv0, c.kv1) for c in gqa] == [(h, h + 1, h // 4, h // 4 + 1) for h in range(8)]
    # a training-size problem is not chunked
    assert op.forward_chunks(Geometry(4, 8, 8, 4096, 64), cfg, op._SCRATCH_BUDGET_BYTES) is None


# --------------------------------------------------------------------------- chunked runs

# (B, Hq, Hkv, N, D, alpha, causal, varlen lengths or None), config, budgets in query heads'
# scratch: 1 = single heads (inside a group when G > 1), 2 = one group (G = 2) or half a group
# (G = 4), 2 * Hq = two batch elements (then one)
CHUNK_CASES = [
    ((3, 2, 1, 37, 16, 1.5, True, (37, 0, 20)), "mixed", (1, 4)),
    ((2, 4, 2, 37, 16, 1.5, True, (0, 37)), "subset", (2,)),
    ((1, 4, 2, 33, 16, 1.25, False, None), "default", (1, 2)),
    ((1, 4, 1, 50, 48, 2.0, False, None), "dense2", (2,)),
    ((2, 2, 2, 45, 16, 4 / 3, False, (45, 0)), "mixed", (1,)),
]


def _forward_pair(case, cfg, device):
    q, k, v, alpha, causal, varlen = _inputs(case, torch.float32, device)
    with torch.no_grad():
        out, residuals = op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, SCALE, cfg)
        bare, none = op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, SCALE, cfg, need_residuals=False)
    assert none == []
    return [out, *residuals], bare


def _gradients(case, config, device):
    q, k, v, alpha, causal, varlen = _inputs(case, torch.float32, device)
    out = adasplash_tune.adasplash(q, k, v, alpha, causal, varlen, backend="triton", config=config)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize("case,name,heads", CHUNK_CASES,
                         ids=[f"{_case_id(c)}-{n}-{'/'.join(map(str, h))}" for c, n, h in CHUNK_CASES])
def test_chunked_forward_is_the_unchunked_forward(case, name, heads, monkeypatch, triton_device):
    config = CONFIGS.get(name)
    q = _inputs(case, torch.float32, triton_device)[0]
    cfg = op.checked_config(TRITON.validate(config or {}), q)
    geo = Geometry(case[0], case[1], case[2], case[3], case[4])
    assert op.forward_chunks(geo, cfg, op._SCRATCH_BUDGET_BYTES) is None
    want, want_bare = _forward_pair(case, cfg, triton_device)
    want_grads = _gradients(case, config, triton_device)
    assert len(want) == (4 if cfg["bwd_mode"] == "fused" else 3)  # out, stats, mask (, O2)
    for n_heads in heads:
        budget = n_heads * _row_bytes(geo, cfg)
        monkeypatch.setattr(op, "_SCRATCH_BUDGET_BYTES", budget)
        assert op.forward_chunks(geo, cfg, budget) is not None
        got, got_bare = _forward_pair(case, cfg, triton_device)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b), f"budget {n_heads} heads: output/residual {i} differs"
        assert torch.equal(got_bare, want_bare)
    # gradients through the public API at the last budget; the oracle, with NaN-filled outputs
    # (an element no chunk writes shows up)
    for i, (a, b) in enumerate(zip(_gradients(case, config, triton_device), want_grads)):
        if i == 1 and cfg["bwd_mode"] == "fused" and triton_device != "cpu":
            assert relative_error(a, b) <= 1e-5  # dQ by float atomics on a GPU: order-dependent rounding
        else:
            assert torch.equal(a, b), f"gradient {i} differs"
    _check(case, config, torch.float32, triton_device, poison=True)


def test_launches_per_chunk(monkeypatch, triton_device):
    """Unchunked: the three launches of today (tau, lists, forward); chunked: three per chunk."""
    case = (2, 4, 2, 33, 16, 1.5, True, None)
    q, k, v, alpha, causal, varlen = _inputs(case, torch.float32, triton_device)
    cfg = op.checked_config(TRITON.validate(CONFIGS["mixed"]), q)
    calls = []
    real = Launch.__call__
    monkeypatch.setattr(Launch, "__call__", lambda self, *t: (calls.append(self.fn), real(self, *t))[1])
    with torch.no_grad():
        op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, SCALE, cfg, need_residuals=False)
    assert len(calls) == 3
    geo = Geometry.of(q, k)
    budget = 2 * _row_bytes(geo, cfg)
    monkeypatch.setattr(op, "_SCRATCH_BUDGET_BYTES", budget)
    calls.clear()
    with torch.no_grad():
        op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, SCALE, cfg, need_residuals=False)
    assert len(calls) == 3 * len(op.forward_chunks(geo, cfg, budget)) == 3 * 4


def test_fused_forward_launches_once_per_chunk(monkeypatch, triton_device):
    """fwd_mode="fused": one launch (tau, mask and forward), one per chunk past the budget, and
    the chunked output is the unchunked one."""
    case = (2, 4, 2, 33, 16, 1.5, True, None)
    q, k, v, alpha, causal, varlen = _inputs(case, torch.float32, triton_device)
    cfg = op.checked_config(TRITON.validate(CONFIGS["fused"]), q)
    calls = []
    real = Launch.__call__
    monkeypatch.setattr(Launch, "__call__", lambda self, *t: (calls.append(self.fn), real(self, *t))[1])
    with torch.no_grad():
        whole, _ = op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, SCALE, cfg, need_residuals=False)
    assert len(calls) == 1
    geo = Geometry.of(q, k)
    budget = 2 * _row_bytes(geo, cfg)
    monkeypatch.setattr(op, "_SCRATCH_BUDGET_BYTES", budget)
    calls.clear()
    with torch.no_grad():
        chunked, _ = op.adasplash_triton_forward(q, k, v, alpha, causal, varlen, SCALE, cfg, need_residuals=False)
    assert len(calls) == len(op.forward_chunks(geo, cfg, budget)) == 4
    assert torch.equal(chunked, whole)
