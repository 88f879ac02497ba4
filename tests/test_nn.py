"""adasplash_tune.nn.AdaSplashAttention: both forms, padding, a learnable alpha, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

from adasplash_tune.kernels.reference import attention_reference, relative_error, tolerance
from adasplash_tune.nn import AdaSplashAttention

F32, F32_GRAD = tolerance(torch.float32), tolerance(torch.float32, grad=True)


@pytest.fixture(autouse=True)
def _defaults_only(monkeypatch, tmp_path):
    monkeypatch.setenv("ADASPLASH_TUNE_MODE", "off")
    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", str(tmp_path / "cache.sqlite"))
    monkeypatch.delenv("ADASPLASH_TUNE_RECORD", raising=False)


def _alpha(attn: AdaSplashAttention) -> float:
    return float(attn.alpha.detach()) if attn.learn_alpha else attn.alpha


def _heads(batch=2, hq=2, hkv=1, n=11, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, dim, generator=gen, requires_grad=True) for h in (hq, hkv, hkv)]


def _projected_oracle(m: AdaSplashAttention, x: torch.Tensor, alpha, varlen=None, causal=False) -> torch.Tensor:
    b, n, e = x.shape
    d = m.head_dim
    q = m.q_proj(x).view(b, n, m.num_heads, d).transpose(1, 2)
    k = m.k_proj(x).view(b, n, m.num_kv_heads, d).transpose(1, 2)
    v = m.v_proj(x).view(b, n, m.num_kv_heads, d).transpose(1, 2)
    o = attention_reference(q, k, v, alpha, causal, varlen)
    return m.out_proj(o.to(x.dtype).transpose(1, 2).reshape(b, n, e))


@pytest.mark.parametrize("alpha,causal", [(1.5, False), (1.25, True), (2.0, True)])
def test_heads_form_matches_the_oracle(alpha, causal):
    q, k, v = _heads(n=13, seed=1)
    attn = AdaSplashAttention(alpha=alpha, is_causal=causal, backend="torch")
    out = attn(q, k, v)
    ref = attention_reference(q, k, v, alpha, causal)
    assert out.shape == q.shape and relative_error(out, ref) <= F32
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want):
        assert relative_error(g, w) <= F32_GRAD


def test_projection_form_with_gqa_and_padding_matches_the_oracle():
    torch.manual_seed(0)
    attn = AdaSplashAttention(48, 3, num_kv_heads=1, alpha=1.5, is_causal=True, backend="torch")
    x = torch.randn(2, 9, 48)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    out = attn(x, key_padding_mask=pad)
    lengths = torch.tensor([9, 6])
    assert torch.equal(out, attn(x, varlen=lengths))
    ref = _projected_oracle(attn, x, 1.5, lengths, causal=True)
    assert out.shape == x.shape
    assert relative_error(out[0], ref[0]) <= F32 and relative_error(out[1, :6], ref[1, :6]) <= F32


def test_padding_that_is_not_right_padding_is_refused():
    attn = AdaSplashAttention(32, 2, backend="torch")
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, :2] = True  # left padding
    with pytest.raises(ValueError, match="right padding"):
        attn(x, key_padding_mask=pad)
    with pytest.raises(ValueError, match=r"shape \(2, 7\)"):
        attn(x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,match", [
    ({"embed_dim": 30, "num_heads": 4}, "divisible"),
    ({"embed_dim": 32}, "both"),
    ({"embed_dim": 32, "num_heads": 4, "num_kv_heads": 3}, "multiple"),
    ({"alpha": 1.0}, "alpha"),
    ({"alpha": 2.5, "learn_alpha": True}, "alpha"),
    ({"backend": "cuda"}, "unknown backend"),
    # used to construct, then fail at the first forward
    ({"embed_dim": 64, "num_heads": 8}, r"embed_dim / num_heads = 8 is not a supported head dim \(16\.\.256\)"),
    ({"scale": -1.0}, "scale must be a positive finite number"),
    ({"backend": "torch", "config": {"bogus": 1}}, "unknown config field 'bogus'"),
])
def test_bad_construction_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaSplashAttention(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"learn_alpha": "no"}, "learn_alpha must be a bool, got str"),  # used to mean True
    ({"scale": "0.1"}, "scale must be a float or None, got str"),
    ({"config": "q_chunk=16"}, "config must be a mapping or a Config, got str"),
])
def test_bad_construction_types_are_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        AdaSplashAttention(**kwargs)


def test_a_padding_mask_of_another_dtype_is_named_with_its_dtype():
    q = k = v = torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match=r"got torch\.int64 of shape \(1, 9\)"):
        AdaSplashAttention()(q, k, v, key_padding_mask=torch.zeros(1, 9, dtype=torch.int64))


def test_learnable_alpha_starts_at_its_value_and_stays_inside_the_interval():
    for start in (1.2, 1.5, 2.0):
        attn = AdaSplashAttention(alpha=start, learn_alpha=True)
        assert isinstance(attn.alpha_logit, torch.nn.Parameter)
        assert abs(_alpha(attn) - start) <= 1.1e-3
    attn.alpha_logit.data.fill_(50.0)
    assert 1.0 < _alpha(attn) <= 2.0
    assert "learnable" in repr(attn)


@pytest.mark.parametrize("causal,varlen", [(False, None), (True, [11, 7])])
def test_learnable_alpha_gradient_matches_finite_differences_of_the_oracle(causal, varlen):
    q, k, v = _heads(seed=3)
    lengths = None if varlen is None else torch.tensor(varlen)
    attn = AdaSplashAttention(alpha=1.4, learn_alpha=True, is_causal=causal, backend="torch")
    grad_out = torch.randn(2, 2, 11, 16, generator=torch.Generator().manual_seed(9))
    out = attn(q, k, v, varlen=lengths)
    alpha = _alpha(attn)
    ref = attention_reference(q, k, v, alpha, causal, lengths)
    assert relative_error(out, ref) <= F32
    (out * grad_out).sum().backward()
    h = 1e-5

    def loss(a: float) -> float:
        return (attention_reference(q, k, v, a, causal, lengths) * grad_out.double()).sum().item()

    dalpha = (loss(alpha + h) - loss(alpha - h)) / (2 * h)
    dlogit = dalpha * (alpha - 1.0) * (2.0 - alpha)  # d(1 + sigmoid(t))/dt = s (1 - s)
    assert abs(attn.alpha_logit.grad.item() - dlogit) <= F32_GRAD * abs(dlogit)
    want = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for g, w in zip((q.grad, k.grad, v.grad), want):
        assert relative_error(g, w) <= F32_GRAD


def test_a_few_optimizer_steps_move_a_learnable_alpha():
    torch.manual_seed(2)
    attn = AdaSplashAttention(32, 2, alpha=1.5, learn_alpha=True, backend="torch")
    x = torch.randn(2, 10, 32)
    target = torch.randn(2, 10, 32)
    opt = torch.optim.SGD(attn.parameters(), lr=0.5)
    start = _alpha(attn)
    for _ in range(3):
        opt.zero_grad()
        ((attn(x) - target) ** 2).mean().backward()
        assert attn.alpha_logit.grad is not None and math.isfinite(attn.alpha_logit.grad.item())
        opt.step()
    assert _alpha(attn) != start and 1.0 < _alpha(attn) < 2.0


@pytest.mark.parametrize("learn_alpha", [False, True])
def test_module_compiles_with_fullgraph_and_matches_eager(learn_alpha):
    torch._dynamo.reset()
    torch.manual_seed(4)
    attn = AdaSplashAttention(32, 2, alpha=1.3, learn_alpha=learn_alpha, is_causal=True, backend="torch")
    x = torch.randn(2, 7, 32)
    lengths = torch.tensor([7, 4])
    w = torch.randn(2, 7, 32)

    def run(module):
        attn.zero_grad()
        y = module(x, varlen=lengths)
        (y * w).sum().backward()
        return y.detach(), [p.grad.clone() for p in attn.parameters()]

    eager_y, eager_g = run(attn)
    y, grads = run(torch.compile(attn, fullgraph=True, backend="aot_eager"))
    assert relative_error(y, eager_y) <= F32
    for g, e in zip(grads, eager_g):
        assert relative_error(g, e) <= F32_GRAD
    ref = _projected_oracle(attn, x, _alpha(attn), lengths, causal=True)
    assert relative_error(y[0], ref[0]) <= F32 and relative_error(y[1, :4], ref[1, :4]) <= F32
    torch._dynamo.reset()
