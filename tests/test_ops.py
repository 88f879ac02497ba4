"""The eager autograd Functions (ops.py) and the custom ops of compiled graphs (compiled.py): what
autograd keeps and asks, opcheck of the ops, the alpha gradient, and torch.compile(fullgraph=True)
of models calling adasplash_tune.adasplash / entmax.

The CPU compile tests use the aot_eager compiler backend (Dynamo + AOTAutograd + the fake
implementations: everything the ops contribute); Inductor's cold start alone takes ~30 s on two
cores, so the Inductor run is the GPU test's.
"""

from __future__ import annotations

import pytest
import torch

import adasplash_tune
from adasplash_tune import ConfigError, compiled, ops
from adasplash_tune.cache import locations
from adasplash_tune.cache.store import Entry, open_store
from adasplash_tune.device import fingerprint
from adasplash_tune.kernels.reference import (
    attention_reference, entmax_reference, relative_error, tolerance,
)
from adasplash_tune.kernels.registry import get_spec

ATTN = torch.ops.adasplash_tune.attention_forward.default
ATTN_BWD = torch.ops.adasplash_tune.attention_backward.default
ALPHA_BWD = torch.ops.adasplash_tune.attention_alpha_backward.default
ENTMAX = torch.ops.adasplash_tune.entmax_forward.default
ENTMAX_BWD = torch.ops.adasplash_tune.entmax_backward.default


@pytest.fixture(autouse=True)
def _isolated_selection(monkeypatch, tmp_path):
    """A fresh, empty user cache per test; no shipped caches or record file."""
    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "cache.sqlite"))
    monkeypatch.delenv("ADASPLASH_TUNE_MODE", raising=False)
    monkeypatch.delenv("ADASPLASH_TUNE_RECORD", raising=False)
    monkeypatch.delenv(locations.ENV_SHIPPED, raising=False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(locations, "SHIPPED_DIR", shipped)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(batch=2, hq=2, hkv=1, n=11, dim=16, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(batch, h, n, dim, generator=gen) for h in (hq, hkv, hkv)]
    return [t.requires_grad_(grad) for t in out]


def _torch_config(**values) -> str:
    return compiled.config_json(get_spec("adasplash", "torch").validate(values))


# --------------------------------------------------------------------------- op registration

# The ops carry no autograd (it lives in the autograd.Function around them): opcheck checks the
# schemas, the fake implementations and AOT dispatch on inputs that do not require grad.


@pytest.mark.parametrize("need_residuals", [True, False])
@pytest.mark.parametrize("varlen", [None, [7, 11]])
@pytest.mark.parametrize("config", ["", "explicit"])
def test_attention_forward_op_passes_opcheck(varlen, config, need_residuals):
    q, k, v = _qkv()
    lengths = None if varlen is None else torch.tensor(varlen)
    cfg = _torch_config(q_chunk=16, k_chunk=64) if config else ""
    alpha = torch.tensor(1.5, dtype=torch.float64)
    result = torch.library.opcheck(ATTN, (q, k, v, lengths, alpha, True, 0.3, 0, "torch", cfg, need_residuals))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_attention_backward_ops_pass_opcheck(needs):
    q, k, v = _qkv(n=9)
    alpha = torch.tensor(1.3)
    out, stats = ATTN(q, k, v, None, alpha, False, 0.25, 0, "torch", "", True)
    grad = torch.randn_like(out)
    args = (grad, q, k, v, None, out, [stats], alpha, False, 0.25, 0, "torch", "", list(needs))
    result = torch.library.opcheck(ATTN_BWD, args)
    assert set(result.values()) == {"SUCCESS"}, result
    assert len(ATTN_BWD(*args)) == sum(needs)
    result = torch.library.opcheck(ALPHA_BWD, (grad, q, k, v, None, alpha, False, 0.25, 0))
    assert set(result.values()) == {"SUCCESS"}, result


def test_entmax_ops_pass_opcheck():
    x = torch.randn(5, 19, generator=torch.Generator().manual_seed(3))
    result = torch.library.opcheck(ENTMAX, (x, 1.25, 0, "torch", ""))
    assert set(result.values()) == {"SUCCESS"}, result
    y = ENTMAX(x, 1.25, 0, "torch", "")
    result = torch.library.opcheck(ENTMAX_BWD, (y, torch.randn_like(y), 1.25, 0, "torch", ""))
    assert set(result.values()) == {"SUCCESS"}, result


def test_op_outputs_match_the_oracle():
    q, k, v = _qkv(n=13, seed=1)
    varlen = torch.tensor([13, 6])
    alpha = torch.tensor(1.5, dtype=torch.float64)
    out, stats = ATTN(q, k, v, varlen, alpha, True, 0.25, 0, "torch", "", True)
    assert relative_error(out, attention_reference(q, k, v, 1.5, True, varlen, 0.25)) <= tolerance(torch.float32)
    assert stats.shape == (3, 2, 2, 13, 1)
    (alone,) = ATTN(q, k, v, varlen, alpha, True, 0.25, 0, "torch", "", False)  # no residuals asked for
    assert torch.equal(alone, out)


@pytest.mark.parametrize("path", ["eager", "traced"])
def test_both_autograd_paths_match_the_oracle_gradients(path):
    """The eager Function (backend pair) and the compiled one (custom ops), run eagerly."""
    q, k, v = _qkv(n=13, seed=1, grad=True)
    varlen = torch.tensor([13, 6])
    out = _attend(path, q, k, v, 1.5, True, varlen, 0.25)
    ref = attention_reference(q, k, v, 1.5, True, varlen, 0.25)
    assert relative_error(out, ref) <= tolerance(torch.float32)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(torch.float32, grad=True)


def _attend(path, q, k, v, alpha, causal, varlen, scale):
    if path == "eager":
        cfg = get_spec("adasplash", "torch").default()
        alpha_tensor = alpha if isinstance(alpha, torch.Tensor) and alpha.requires_grad else None
        value = alpha.item() if isinstance(alpha, torch.Tensor) else alpha
        return ops.attention(q, k, v, value, alpha_tensor, causal, varlen, scale, "torch", cfg)
    return compiled.traced_attention(q, k, v, alpha, causal, varlen, scale, "torch")


def test_unknown_backend_in_the_ops_is_a_value_error():
    q, k, v = _qkv()
    cfg = get_spec("adasplash", "torch").default()
    with pytest.raises(ValueError, match="unknown backend"):
        ops.attention(q, k, v, 1.5, None, False, None, 0.25, "cuda-magic", cfg)
    with pytest.raises(ValueError, match="unknown backend"):
        compiled.traced_attention(q, k, v, 1.5, False, None, 0.25, "cuda-magic")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.entmax(torch.randn(3, 5), 1.5, "cuda-magic", cfg)
    with pytest.raises(ValueError, match="unknown backend"):
        compiled.traced_entmax(torch.randn(3, 5), 1.5, "cuda-magic")


# --------------------------------------------------------------------------- what autograd keeps and asks


class _SpyPair:
    """The torch pair, recording what the autograd Functions ask of it."""

    def __init__(self):
        self.forwards, self.backwards = [], []
        self.pair = ops.AttentionPair(self._forward, self._backward, ops.attention_pair("torch").residuals)

    def _forward(self, *args, need_residuals=True, fixed_residuals=False):
        self.forwards.append(need_residuals)
        return ops.attention_pair("torch").forward(*args, need_residuals=need_residuals,
                                                   fixed_residuals=fixed_residuals)

    def _backward(self, *args, needs=(True, True, True)):
        self.backwards.append(tuple(needs))
        return ops.attention_pair("torch").backward(*args, needs=needs)


@pytest.fixture
def spy(monkeypatch):
    recorder = _SpyPair()
    monkeypatch.setattr(ops, "require_attention_pair", lambda backend: recorder.pair)
    return recorder


@pytest.mark.parametrize("path", ["eager", "traced"])
@pytest.mark.parametrize("wanted", ["none", "q", "kv", "alpha", "all"])
def test_residuals_and_gradients_only_where_asked(spy, path, wanted):
    q, k, v = _qkv(n=10, seed=6)
    q.requires_grad_(wanted in ("q", "all"))
    k.requires_grad_(wanted in ("kv", "all"))
    v.requires_grad_(wanted in ("kv", "all"))
    alpha = torch.tensor(1.4, requires_grad=wanted in ("alpha", "all"))
    out = _attend(path, q, k, v, alpha, True, None, 0.25)
    leaves = [t for t in (q, k, v, alpha) if t.requires_grad]
    qkv_grad = any(t.requires_grad for t in (q, k, v))
    assert spy.forwards == [qkv_grad]
    if not leaves:
        assert out.grad_fn is None
        return
    # what the graph keeps: q, k, v, varlen, out (+ alpha on the compiled path), residuals only for q/k/v
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert sum(t.dtype == torch.float32 and t.shape == (3, 2, 2, 10, 1) for t in saved) == int(qkv_grad)
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, leaves))
    asked = [(q.requires_grad, k.requires_grad, v.requires_grad)] if qkv_grad else []
    assert spy.backwards == asked


# --------------------------------------------------------------------------- alpha gradient


@pytest.mark.parametrize("path", ["public", "traced"])
@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.75])
@pytest.mark.parametrize("causal,varlen", [(False, None), (True, [10, 4])])
def test_alpha_gradient_matches_finite_differences_of_the_oracle(alpha, causal, varlen, path):
    q, k, v = _qkv(n=10, seed=2)
    lengths = None if varlen is None else torch.tensor(varlen)
    grad_out = torch.randn(2, 2, 10, 16, generator=torch.Generator().manual_seed(5))
    a = torch.tensor(alpha, requires_grad=True)
    if path == "public":  # a 0-d alpha tensor that requires grad gets its gradient (issue 16, defect 8)
        out = adasplash_tune.adasplash(q, k, v, a, causal, lengths, scale=0.3, backend="torch")
    else:
        out = compiled.traced_attention(q, k, v, a, causal, lengths, 0.3, "torch")
    (out * grad_out).sum().backward()
    h = 1e-5

    def loss(at: float) -> torch.Tensor:
        return (attention_reference(q, k, v, at, causal, lengths, 0.3) * grad_out.double()).sum()

    want = (loss(alpha + h) - loss(alpha - h)) / (2 * h)
    assert a.grad is not None and a.grad.shape == ()
    assert abs(a.grad.item() - want.item()) <= tolerance(torch.float32, grad=True) * abs(want.item())


# --------------------------------------------------------------------------- torch.compile


class _TinyBlock(torch.nn.Module):
    """Projections -> adasplash (GQA, causal) -> entmax over the features of each head."""

    def __init__(self, alpha=1.5, config=None, niter=None):
        super().__init__()
        self.qkv = torch.nn.Linear(24, 4 * 16)
        self.alpha, self.config, self.niter = alpha, config, niter

    def forward(self, x, varlen=None):
        b, n, _ = x.shape
        h = self.qkv(x).view(b, n, 4, 16).transpose(1, 2)
        q, k, v = h[:, :2], h[:, 2:3], h[:, 3:]
        o = adasplash_tune.adasplash(q, k, v, self.alpha, True, varlen, self.niter, backend="torch",
                                     config=self.config)
        return adasplash_tune.entmax(o * 3.0, alpha=1.25, dim=-1, backend="torch")


def _block_oracle(block: _TinyBlock, x: torch.Tensor, varlen=None) -> torch.Tensor:
    b, n, _ = x.shape
    h = block.qkv(x).view(b, n, 4, 16).transpose(1, 2)
    o = attention_reference(h[:, :2], h[:, 2:3], h[:, 3:], block.alpha, True, varlen)
    return entmax_reference(o * 3.0, 1.25, dim=-1)


def _run(model, x, w, **kw):
    model.zero_grad()
    y = model(x, **kw)
    (y * w).sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("case", ["auto-selected", "explicit-config", "varlen"])
def test_compiled_model_has_one_graph_and_matches_eager_and_oracle(case):
    torch.manual_seed(0)
    kw, block_args = {}, {}
    if case == "explicit-config":
        block_args = {"config": {"q_chunk": 16, "k_chunk": 64}, "niter": 12}
    if case == "varlen":
        kw = {"varlen": torch.tensor([13, 5])}
    block = _TinyBlock(**block_args)
    x = torch.randn(2, 13, 24)
    w = torch.randn(2, 2, 13, 16)
    eager_y, eager_g = _run(block, x, w, **kw)
    graph = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, grads = _run(graph, x, w, **kw)
    assert relative_error(y, eager_y) <= tolerance(torch.float32)
    for g, e in zip(grads, eager_g):
        assert relative_error(g, e) <= tolerance(torch.float32, grad=True)
    ref = _block_oracle(block, x, kw.get("varlen"))
    assert relative_error(y, ref) <= tolerance(torch.float32)
    explain = torch._dynamo.explain(block)(x, **kw)
    assert explain.graph_count == 1 and explain.graph_break_count == 0


def test_one_dynamic_graph_serves_every_length_with_its_own_selection(monkeypatch):
    seen = []
    original = compiled._attention_config
    monkeypatch.setattr(compiled, "_attention_config", lambda *a: seen.append(a[0].shape[2]) or original(*a))

    def fn(q, k, v, lengths):
        return adasplash_tune.adasplash(q, k, v, 1.5, True, lengths, backend="torch")

    graph = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    torch._dynamo.utils.counters.clear()
    for n in (13, 30, 47):
        q, k, v = _qkv(n=n, seed=n)
        lengths = torch.tensor([n, n // 2])
        out = graph(q, k, v, lengths)
        assert relative_error(out, attention_reference(q, k, v, 1.5, True, lengths)) <= tolerance(torch.float32)
    assert seen == [13, 30, 47]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compiled_call_selects_at_run_time_like_eager(monkeypatch):
    """A cached entry is picked inside the op: the compiled graph and the eager call use it."""
    q, k, v = _qkv(n=21, seed=4)
    sel = adasplash_tune.select("adasplash", q, k, v, 1.5, True, backend="torch")
    assert sel.source == "default"
    tuned = {"q_chunk": 32, "k_chunk": 64, "niter": 16}
    spec = get_spec("adasplash", "torch")
    entry = Entry("adasplash", "torch", fingerprint("cpu").as_dict(), spec.source_hash(), sel.key, tuned,
                  time_ms=1.0, error=1e-6, trials=1, strategy="grid")
    with open_store(locations.user_cache_location()) as store:
        store.upsert_best(entry)
    adasplash_tune.api.clear_memo()
    seen = []
    original = compiled._attention_config

    def spy(*args):
        cfg = original(*args)
        seen.append(cfg.as_dict())
        return cfg

    monkeypatch.setattr(compiled, "_attention_config", spy)
    fn = torch.compile(lambda a, b, c: adasplash_tune.adasplash(a, b, c, 1.5, True, backend="torch"),
                       fullgraph=True, backend="aot_eager")
    out = fn(q, k, v)
    eager = adasplash_tune.adasplash(q, k, v, 1.5, True, backend="torch")
    assert seen == [tuned]  # the compiled call selected when it ran; the eager one is memoised
    assert adasplash_tune.select("adasplash", q, k, v, 1.5, True, backend="torch").source == "cache"
    assert torch.equal(out, eager)
    assert relative_error(out, attention_reference(q, k, v, 1.5, True)) <= tolerance(torch.float32)


@pytest.mark.parametrize("config,match", [
    ({"q_chunk": 3}, "q_chunk"),
    ({"bogus": 1}, "unknown config field 'bogus'"),
    (get_spec("entmax", "torch").default(), "config is for entmax"),
])
def test_compiled_call_with_a_bad_explicit_config_raises_config_error(config, match):
    q, k, v = _qkv()
    fn = torch.compile(lambda a, b, c: adasplash_tune.adasplash(a, b, c, backend="torch", config=config),
                       fullgraph=True, backend="aot_eager")
    with pytest.raises(ConfigError, match=match):
        fn(q, k, v)


@pytest.mark.parametrize("wanted", ["qkv", "q"])
def test_triton_backend_eager_and_compiled_match_the_oracle(triton_device, wanted):
    """The Triton pair (the interpreter on CPU) through the public function: residuals and only the
    asked-for gradients, eagerly and in a compiled graph."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(triton_device) for _ in range(3))
    for t in (q, k, v)[: 3 if wanted == "qkv" else 1]:
        t.requires_grad_()
    lengths = torch.tensor([17], device=triton_device)
    grad = torch.randn(q.shape, generator=gen).to(triton_device)
    leaves = [t for t in (q, k, v) if t.requires_grad]
    ref = attention_reference(q, k, v, 1.5, True, lengths)
    want = torch.autograd.grad(ref, leaves, grad.double())

    def fn(a, b, c, n):
        return adasplash_tune.adasplash(a, b, c, 1.5, True, n, backend="triton")

    for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        out = run(q, k, v, lengths)
        assert relative_error(out, ref) <= tolerance(torch.float32)
        for g, w in zip(torch.autograd.grad(out, leaves, grad), want):
            assert relative_error(g, w) <= tolerance(torch.float32, grad=True)


def test_compiled_call_checks_varlen_values_when_it_runs():
    fn = torch.compile(lambda a, b, c, n: adasplash_tune.adasplash(a, b, c, 1.5, True, n, backend="torch"),
                       fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(n=11, seed=8)
    lengths = torch.tensor([11, 0])
    assert relative_error(fn(q, k, v, lengths), attention_reference(q, k, v, 1.5, True, lengths)) \
        <= tolerance(torch.float32)
    with pytest.raises(ValueError, match=r"varlen values must be valid lengths in \[0, 11\]"):
        fn(q, k, v, torch.tensor([12, 3]))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_call_differentiates_a_tensor_alpha_like_eager(dynamic):
    """A 0-d alpha that requires grad (e.g. a learnable one) through the public function, compiled."""

    def fn(q, k, v, alpha):
        return adasplash_tune.adasplash(q, k, v, alpha, True, backend="torch")

    graph = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for n in (12, 17):
        q, k, v = _qkv(n=n, seed=n, grad=True)
        w = torch.randn(2, 2, n, 16, generator=torch.Generator().manual_seed(n))
        results = []
        for run in (fn, graph):
            alpha = torch.tensor(1.35, requires_grad=True)
            out = run(q, k, v, alpha)
            results.append((out, *torch.autograd.grad((out * w).sum(), (q, k, alpha))))
        for got, want in zip(results[1], results[0]):
            assert relative_error(got, want) <= tolerance(torch.float32, grad=True)
    with pytest.raises(ValueError, match=r"alpha must be in \(1, 2\]"):  # a tensor's value: checked when run
        graph(q, k, v, torch.tensor(2.5))


def test_a_pair_that_breaks_the_config_free_residual_shapes_is_named(monkeypatch):
    """A compiled graph that selects when it runs was traced with residuals(q, k, v, None)."""
    torch_pair = ops.attention_pair("torch")

    def forward(*args, need_residuals=True, fixed_residuals=False):
        out, residuals = torch_pair.forward(*args, need_residuals=need_residuals, fixed_residuals=fixed_residuals)
        return out, [r[:, :, :1] for r in residuals]

    monkeypatch.setattr(ops, "require_attention_pair",
                        lambda backend: ops.AttentionPair(forward, torch_pair.backward, torch_pair.residuals))
    q, k, v = _qkv(grad=True)
    with pytest.raises(RuntimeError, match=r"config-free shapes"):
        compiled.traced_attention(q, k, v, 1.5, False, None, 0.25, "torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_model_with_the_triton_backend_on_gpu(dtype):
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(64, 4 * 64, device="cuda", dtype=dtype)

    def model(x):
        b, n, _ = x.shape
        h = lin(x).view(b, n, 4, 64).transpose(1, 2)
        o = adasplash_tune.adasplash(h[:, :2], h[:, 2:3], h[:, 3:], 1.5, True, backend="triton")
        return adasplash_tune.entmax(o, alpha=1.5, dim=-1, backend="triton")

    x = torch.randn(2, 333, 64, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(2, 2, 333, 64, device="cuda", dtype=dtype, generator=gen)
    y = torch.compile(model, fullgraph=True)(x)
    (y * w).sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    h = lin(x).view(2, 333, 4, 64).transpose(1, 2)
    ref = entmax_reference(attention_reference(h[:, :2], h[:, 2:3], h[:, 3:], 1.5, True), 1.5, dim=-1)
    (ref * w.double()).sum().backward()
    assert relative_error(y, ref) <= tolerance(dtype)
    assert relative_error(got, lin.weight.grad) <= tolerance(dtype, grad=True)


def test_the_constant_result_mark_is_the_one_torch_sets():
    """compiled.py marks its trace-time constants without importing torch._dynamo; the mark must
    stay the one torch.compiler.assume_constant_result sets (fullgraph compiles rely on it)."""

    def ours():
        return 1

    def theirs():
        return 1

    ours_marked = dict(vars(compiled._mark_constant(ours)))
    torch_marked = dict(vars(torch.compiler.assume_constant_result(theirs)))
    assert ours_marked == torch_marked == {"_dynamo_marked_constant": True}
    assert compiled.explicit_config_json._dynamo_marked_constant


def test_second_differentiation_is_refused_and_first_matches():
    """``create_graph=True`` runs the backward through ``once_differentiable``: the same gradients
    as a plain backward, and differentiating them again raises instead of returning zeros."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen, requires_grad=True) for _ in range(3))
    plain = torch.autograd.grad(adasplash_tune.adasplash(q, k, v, backend="torch").sum(), (q, k, v))
    graphed = torch.autograd.grad(adasplash_tune.adasplash(q, k, v, backend="torch").sum(), (q, k, v),
                                  create_graph=True)
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        graphed[0].sum().backward()
