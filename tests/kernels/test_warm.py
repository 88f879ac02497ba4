"""kernels/attention/warm.py: the warm calls' short paths lay out their buffers as the general path.

The compiled kernels run on a GPU only (test_attention_triton.py's
``test_gpu_warm_calls_match_the_general_path`` compares the outputs bitwise there). Here fake
launches record the addresses each path passes, and the general path's own list views
(``tile_list_pair`` / ``tile_lists``) give the offsets the short path must reproduce: the same
offsets mean the same 16-byte-alignment pattern, hence the kernel the general path recorded.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from adasplash_tune.kernels.attention import op, warm
from adasplash_tune.kernels.attention.common import Geometry, poison_outputs
from adasplash_tune.kernels.attention.mask import tile_list_pair, tile_lists
from adasplash_tune.kernels.declarations.attention import TRITON
from adasplash_tune.kernels.launch import Launch


class _Recorder:
    """Stands in for a planned Launch: always ready, records each direct launch's addresses."""

    def __init__(self, ready: bool = True) -> None:
        self.calls: list[tuple[int, ...]] = []
        self._ready = ready

    def ready(self) -> bool:
        return self._ready

    def direct(self, *pointers: int) -> bool:
        self.calls.append(pointers)
        return True


def _problem(shape, config=None):
    b, hq, hkv, n, d = shape
    q = torch.randn(b, hq, n, d)
    k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    cfg = op.checked_config(TRITON.validate(config or {}), q)
    return q, k, v, Geometry.of(q, k), cfg


def _region(start: int, nbytes: int) -> range:
    return range(start, start + nbytes)


SHAPES = [(2, 4, 2, 300, 80), (1, 3, 1, 77, 64), (1, 1, 1, 1, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residuals", [False, True])
@pytest.mark.parametrize("with_varlen", [False, True])
def test_fused_forward_buffers(shape, residuals, with_varlen):
    q, k, v, geo, cfg = _problem(shape, {"bwd_mode": "fused"} if residuals and shape[3] == 77 else None)
    mask_shape, scratch, chunks = op._forward_plan(geo, cfg, op._SCRATCH_BUDGET_BYTES)
    assert chunks is None
    plan = warm.plan_fused_forward(geo, cfg, 1.5, 0.1, True, with_varlen, q.dtype, mask_shape, scratch, residuals)
    assert plan.run.meta["HAS_VARLEN"] is with_varlen
    varlen = torch.full((shape[0],), shape[3], dtype=torch.int32) if with_varlen else None
    rec = _Recorder()
    out, res = warm.fused_forward(plan._replace(run=rec), q, k, v, varlen)
    (p,) = rec.calls
    assert p[9] == (varlen.data_ptr() if with_varlen else p[3])  # the lengths, or tau standing in
    assert p[:3] == (q.data_ptr(), k.data_ptr(), v.data_ptr()) and p[4] == out.data_ptr()
    assert out.shape == q.shape and out.dtype == q.dtype
    rows_n = geo.rows * geo.seq_len
    if residuals:  # what the general path returns: the same shapes and dtypes, tau and 1/sum p in stats
        assert [(tuple(t.shape), t.dtype) for t in res] == op.adasplash_triton_residuals(q, k, v, cfg)
        stats, mask = res[0], res[1]
        assert (p[3], p[5], p[7]) == (stats[0].data_ptr(), stats[1].data_ptr(), mask.data_ptr())
        assert p[6] == (res[2].data_ptr() if plan.need_o2 else out.data_ptr())
        assert plan.lists_at == 0 and plan.size == 4 * scratch
    else:  # mask, tau and the lists: disjoint, 256-byte aligned, inside the workspace
        assert res == []
        base = p[7]
        mask_bytes = mask_shape[0] * mask_shape[1] * mask_shape[2]
        regions = [_region(0, mask_bytes), _region(p[3] - base, 4 * rows_n), _region(p[8] - base, 4 * scratch)]
        for i, a in enumerate(regions):
            assert a.start % 256 == 0 and a.stop <= plan.size
            for b in regions[i + 1:]:
                assert a.stop <= b.start or b.stop <= a.start
        assert p[5] == p[3] and p[6] == p[4]  # unused buffers: tau and out stand in, as in the general path


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("need_kv", [True, False])
@pytest.mark.parametrize("with_varlen", [False, True])
def test_split_backward_buffers(shape, need_kv, with_varlen, monkeypatch):
    q, k, v, geo, cfg = _problem(shape, {"mask_m": 32, "mask_n": 32, "bwd_q_block_n": 32, "bwd_block_m": 32})
    mask_tile = (cfg["mask_m"], cfg["mask_n"])
    q_tile, kv_tile = (cfg["bwd_q_block_m"], cfg["bwd_q_block_n"]), (cfg["bwd_block_m"], cfg["bwd_block_n"])
    mask = torch.zeros((geo.rows, *op.mask_shape(geo, cfg)), dtype=torch.int8)
    monkeypatch.setattr(Launch, "__call__", lambda self, *tensors: None)  # the general path's views only
    if need_kv:
        lq, lk = tile_list_pair(mask, geo, None, True, mask_tile, q_tile, kv_tile)
        views = (lq.index, lq.count, lk.index, lk.count)
    else:
        lq = tile_lists(mask, geo, None, True, mask_tile, q_tile, transposed=False)
        views = (lq.index, lq.count)
    want = tuple(t.data_ptr() - lq.index.data_ptr() for t in views)

    plan = warm.plan_split_backward(geo, cfg, 1.5, 0.1, True, with_varlen, q.dtype, need_kv)
    assert plan.list_at == want
    assert all(run.meta["HAS_VARLEN"] is with_varlen for run in (plan.lists, plan.dq, plan.dkv) if run is not None)
    varlen = torch.full((shape[0],), shape[3], dtype=torch.int32) if with_varlen else None
    recs = [_Recorder() for _ in range(3)]
    plan = plan._replace(lists=recs[0], dq=recs[1], dkv=recs[2] if need_kv else None)
    stats = torch.empty(2, geo.rows, geo.seq_len)
    grad = torch.randn_like(q)
    dq, dk, dv = warm.split_backward(plan, grad, q, k, v, stats, mask, varlen)
    (lists,), (qcall,) = recs[0].calls, recs[1].calls
    w = lists[1]  # the workspace starts with the dQ index lists
    assert lists[0] == mask.data_ptr() and lists[1:len(want) + 1] == tuple(w + a for a in want)
    assert lists[-1] == (varlen.data_ptr() if with_varlen else w + want[1])  # the lengths, or counts standing in
    tau, inv_l = stats[0].data_ptr(), stats[1].data_ptr()
    lens = varlen.data_ptr() if with_varlen else tau
    rows = w + plan.rows_at  # the per-row records the dQ kernel writes for dK/dV
    assert plan.rows_at % 256 == 0 and plan.rows_at >= (want[-1] + 1)
    assert plan.size == plan.rows_at + 16 * geo.rows * geo.seq_len
    assert qcall == (q.data_ptr(), k.data_ptr(), v.data_ptr(), grad.data_ptr(), tau, inv_l, rows, dq.data_ptr(),
                     rows, w + want[0], w + want[1], lens)
    assert dq.shape == q.shape
    if need_kv:
        (kvcall,) = recs[2].calls
        assert kvcall == (q.data_ptr(), k.data_ptr(), v.data_ptr(), grad.data_ptr(), rows,
                          dk.data_ptr(), dv.data_ptr(), w + want[2], w + want[3], lens)
        assert dk.shape == k.shape and dv.shape == v.shape
    else:
        assert dk is None and dv is None and not recs[2].calls


def test_short_paths_decline_without_launching():
    """Not ready or poisoned outputs: None, and no launch."""
    q, k, v, geo, cfg = _problem((1, 2, 2, 64, 32))
    mask_shape, scratch, _ = op._forward_plan(geo, cfg, op._SCRATCH_BUDGET_BYTES)
    plan = warm.plan_fused_forward(geo, cfg, 1.5, 0.1, False, False, q.dtype, mask_shape, scratch, True)
    idle, rec = _Recorder(ready=False), _Recorder()
    assert warm.fused_forward(plan._replace(run=idle), q, k, v) is None
    with poison_outputs():
        assert warm.fused_forward(plan._replace(run=rec), q, k, v) is None
    assert not idle.calls and not rec.calls
    bwd = warm.plan_split_backward(geo, cfg, 1.5, 0.1, False, False, q.dtype, True)
    bwd = bwd._replace(lists=rec, dq=rec, dkv=idle)
    stats, mask = torch.empty(2, geo.rows, 64), torch.zeros((geo.rows, *op.mask_shape(geo, cfg)), dtype=torch.int8)
    assert warm.split_backward(bwd, torch.randn_like(q), q, k, v, stats, mask) is None
    assert not rec.calls and not idle.calls


class _Reader(_Recorder):
    """A Recorder that also reads, while the launch is being made, what a kernel would read at
    the given leading addresses: (address index, shape, dtype) -> the values there (host memory:
    the tensors are CPU tensors)."""

    def __init__(self, reads: dict[int, tuple[torch.Size, torch.dtype]]) -> None:
        super().__init__()
        self.reads, self.seen = reads, {}

    def direct(self, *pointers: int) -> bool:
        for i, (shape, dtype) in self.reads.items():
            nbytes = shape.numel() * dtype.itemsize
            raw = ctypes.string_at(pointers[i], nbytes)
            self.seen[i] = torch.frombuffer(bytearray(raw), dtype=dtype).view(shape)
        return super().direct(*pointers)


def test_short_paths_take_strided_inputs_as_contiguous_copies():
    """q, k, v as views of one packed (B, N, Hq + 2 Hkv, D) projection, as a model's attention
    layer makes them, and a transposed gradient: the short paths launch on contiguous copies that
    hold the same values (what the general path's .contiguous() gives), and return contiguous
    outputs."""
    b, hq, hkv, n, d = 2, 4, 2, 48, 32
    packed = torch.randn(b, n, hq + 2 * hkv, d)
    q, k, v = (t.transpose(1, 2) for t in packed.split([hq, hkv, hkv], dim=2))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    geo = Geometry.of(q, k)
    cfg = op.checked_config(TRITON.validate({}), q)
    mask_shape, scratch, _ = op._forward_plan(geo, cfg, op._SCRATCH_BUDGET_BYTES)
    plan = warm.plan_fused_forward(geo, cfg, 1.5, 0.1, True, False, q.dtype, mask_shape, scratch, True)
    reads = {0: (q.shape, q.dtype), 1: (k.shape, k.dtype), 2: (v.shape, v.dtype)}
    rec = _Reader(reads)
    out, _ = warm.fused_forward(plan._replace(run=rec), q, k, v)
    assert len(rec.calls) == 1 and out.is_contiguous() and out.shape == q.shape
    for i, t in enumerate((q, k, v)):
        assert torch.equal(rec.seen[i], t)

    grad = torch.randn(b, n, hq, d).transpose(1, 2)
    bwd = warm.plan_split_backward(geo, cfg, 1.5, 0.1, True, False, q.dtype, True)
    dq_rec = _Reader({**reads, 3: (grad.shape, grad.dtype)})
    bwd = bwd._replace(lists=_Recorder(), dq=dq_rec, dkv=_Recorder())
    stats, mask = torch.empty(2, geo.rows, n), torch.zeros((geo.rows, *op.mask_shape(geo, cfg)), dtype=torch.int8)
    dq, dk, dv = warm.split_backward(bwd, grad, q, k, v, stats, mask)
    assert len(dq_rec.calls) == 1 and all(t.is_contiguous() for t in (dq, dk, dv))
    for i, t in enumerate((q, k, v, grad)):
        assert torch.equal(dq_rec.seen[i], t)


def test_cpu_calls_plan_no_short_path():
    """On CPU (the interpreter) every call takes the general path: its plan is None. Lengths the
    short path would not take as they are (int64) are not even looked up."""
    q, k, v, geo, cfg = _problem((1, 2, 2, 16, 16))
    op._WARM.clear()
    out, _ = op.adasplash_triton_forward(q, k, v, 1.5, True, None, 0.25, cfg, need_residuals=False)
    assert out.shape == q.shape
    assert list(op._WARM.values()) == [None]
    op.adasplash_triton_forward(q, k, v, 1.5, True, torch.tensor([9]), 0.25, cfg, need_residuals=False)
    assert len(op._WARM) == 1
    op.adasplash_triton_forward(q, k, v, 1.5, True, torch.tensor([9], dtype=torch.int32), 0.25, cfg,
                                need_residuals=False)
    assert len(op._WARM) == 2 and list(op._WARM.values()) == [None, None]
