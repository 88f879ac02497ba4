"""The fp64 oracle against an independent implementation (the `entmax` package) and naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from adasplash_tune.kernels.reference import (
    attention_mask,
    attention_reference,
    entmax_reference,
    relative_error,
    tolerance,
)

entmax_pkg = pytest.importorskip("entmax")

F64_TOL = tolerance(torch.float64)
F64_GRAD_TOL = tolerance(torch.float64, grad=True)
LENGTHS = (1, 7, 100, 255)


def _rows(n_rows: int, cols: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n_rows, cols, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("cols", LENGTHS)
@pytest.mark.parametrize("alpha", (1.1, 1.25, 1.5, 1.75, 2.0))
def test_matches_entmax_bisect(alpha: float, cols: int) -> None:
    x = _rows(5, cols, seed=cols)
    ref = entmax_pkg.entmax_bisect(x, alpha=alpha, dim=-1, n_iter=80)
    out = entmax_reference(x, alpha)
    assert relative_error(out, ref) <= F64_TOL
    assert torch.allclose(out.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert bool((out >= 0).all())


@pytest.mark.parametrize("cols", LENGTHS)
def test_matches_entmax15_and_sparsemax_with_gradients(cols: int) -> None:
    for alpha, fn in ((1.5, entmax_pkg.entmax15), (2.0, entmax_pkg.sparsemax)):
        x = _rows(4, cols, seed=100 + cols).requires_grad_()
        grad = _rows(4, cols, seed=200 + cols)
        out = entmax_reference(x, alpha)
        (gx,) = torch.autograd.grad(out, x, grad)
        x2 = x.detach().clone().requires_grad_()
        ref = fn(x2, dim=-1)
        (gref,) = torch.autograd.grad(ref, x2, grad)
        assert relative_error(out, ref) <= F64_TOL
        if cols == 1:
            assert gx.abs().max().item() == 0.0 and gref.abs().max().item() == 0.0
        else:
            assert relative_error(gx, gref) <= F64_GRAD_TOL


@pytest.mark.parametrize("alpha", (1.25, 1.5, 2.0))
def test_dim_and_valid_mask(alpha: float) -> None:
    x = _rows(3 * 13, 6, seed=7).reshape(3, 13, 6)
    out = entmax_reference(x, alpha, dim=1)
    ref = entmax_pkg.entmax_bisect(x, alpha=alpha, dim=1, n_iter=80)
    assert relative_error(out, ref) <= F64_TOL

    valid = torch.rand(3, 13, 6, generator=torch.Generator().manual_seed(8)) > 0.4
    valid[0, :, 0] = False  # one column with no valid entry: all zeros
    masked = entmax_reference(x, alpha, dim=1, valid=valid)
    assert masked[0, :, 0].abs().max().item() == 0.0
    assert masked[~valid].abs().max().item() == 0.0
    for b in range(3):
        for c in range(6):
            keep = valid[b, :, c]
            if keep.any():
                sub = entmax_pkg.entmax_bisect(x[b, keep, c], alpha=alpha, n_iter=80)
                assert relative_error(masked[b, keep, c], sub) <= F64_TOL


@pytest.mark.parametrize("alpha", (1.25, 1.5, 1.8, 2.0))
def test_entmax_reference_gradcheck(alpha: float) -> None:
    x = _rows(3, 9, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: entmax_reference(t, alpha), (x,))
    valid = torch.tensor([[True] * 5 + [False] * 4] * 3)
    assert torch.autograd.gradcheck(lambda t: entmax_reference(t, alpha, valid=valid), (x,))


def _naive_attention(q, k, v, alpha, is_causal, varlen, scale):
    """Row by row: gather the valid keys, entmax_bisect (the `entmax` package), weighted sum."""
    batch, hq, n, dim = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(batch, hq, n, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        length = n if varlen is None else int(varlen[b])
        for h in range(hq):
            kh, vh = k[b, h // group].double(), v[b, h // group].double()
            for i in range(min(n, length)):
                stop = min(length, i + 1) if is_causal else length
                scores = scale * (kh[:stop] @ q[b, h, i].double())
                p = entmax_pkg.entmax_bisect(scores, alpha=alpha, n_iter=80)
                out[b, h, i] = p @ vh[:stop]
    return out


@pytest.mark.parametrize(
    "is_causal,varlen,hq,hkv",
    [
        (False, None, 2, 2),
        (True, None, 2, 2),
        (False, (0, 5, 11), 1, 1),
        (True, (11, 0, 6), 2, 1),
        (True, None, 4, 1),
        (False, (3, 11, 11), 4, 1),
    ],
)
@pytest.mark.parametrize("alpha", (1.5, 2.0, 1.3))
def test_attention_reference_matches_naive_loop(is_causal, varlen, hq, hkv, alpha) -> None:
    gen = torch.Generator().manual_seed(hq * 10 + hkv + int(is_causal))
    batch = 3 if varlen is not None else 1
    n, dim = 11, 16
    q = torch.randn(batch, hq, n, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, n, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, n, dim, generator=gen, dtype=torch.float64)
    lengths = None if varlen is None else torch.tensor(varlen)
    scale = 1.7 / math.sqrt(dim)
    out = attention_reference(q, k, v, alpha, is_causal, lengths, scale=scale)
    ref = _naive_attention(q, k, v, alpha, is_causal, lengths, scale)
    assert out.shape == q.shape
    assert relative_error(out, ref) <= F64_TOL
    if lengths is not None:
        for b, length in enumerate(varlen):
            if length < n:  # rows past the length are exactly zero
                assert out[b, :, length:].abs().max().item() == 0.0


def test_attention_mask_shapes_and_values() -> None:
    mask = attention_mask(4, 4, 2, is_causal=True, varlen=torch.tensor([4, 2]))
    assert mask.shape == (2, 1, 4, 4)
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[1, 0] = expected[1, 1] = True
    assert torch.equal(mask[1, 0], expected)


def test_attention_reference_gradcheck() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention_reference(a, b, c, 1.5, True, None), (q, k, v)
    )


def test_relative_error_and_tolerance() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref + torch.tensor([0.3, 0.4]), ref) == pytest.approx(0.1)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert tolerance(torch.bfloat16) == 1e-2 and tolerance(torch.float32, grad=True) == 1e-3
