"""The public API contract (INTERFACE.md) on the torch backend: bad inputs, selection, overrides."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import adasplash_tune
from adasplash_tune import ConfigError, adasplash, entmax, select
from adasplash_tune.kernels.problem import attention_key, entmax_key
from adasplash_tune.kernels.reference import (
    attention_reference, entmax_reference, relative_error, tolerance,
)
from adasplash_tune.kernels.registry import KERNELS, config_from_json, get_spec


#: These inputs are tiny: one intra-op thread is fastest, and immune to a busy machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _isolated_selection(monkeypatch, tmp_path):
    """Built-in defaults only: no user or shipped cache can change what `select` reports."""
    monkeypatch.setenv("ADASPLASH_TUNE_MODE", "off")
    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", str(tmp_path / "cache.sqlite"))
    monkeypatch.delenv("ADASPLASH_TUNE_RECORD", raising=False)


def _qkv(batch=2, hq=2, hkv=2, n=9, dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, dim, generator=gen).to(dtype)
    k = torch.randn(batch, hkv, n, dim, generator=gen).to(dtype)
    v = torch.randn(batch, hkv, n, dim, generator=gen).to(dtype)
    return q, k, v


def _violating(spec) -> tuple[dict, str]:
    """A config (other fields at their defaults) that breaks one of ``spec``'s constraints."""
    default = spec.default().as_dict()
    for constraint in spec.constraints:
        domains = [spec.param(name).choices for name in constraint.params]
        for combo in itertools.product(*domains):
            values = dict(default, **dict(zip(constraint.params, combo)))
            if not constraint.check(values, {}):
                return dict(zip(constraint.params, combo)), constraint.doc
    pytest.fail(f"{spec.kernel}/{spec.backend}: no constraint can be violated without context")


# --------------------------------------------------------------------------- bad input: adasplash


def _bad(change, exc, match):
    return change, exc, match


B, N, D = 2, 9, 16
BAD_ATTENTION = {
    # rank and shapes
    "q-rank-3": _bad(lambda a: a.update(q=a["q"][0]), ValueError, r"q must have rank 4"),
    "k-rank-5": _bad(lambda a: a.update(k=a["k"][None]), ValueError, r"k must have rank 4"),
    "v-rank-2": _bad(lambda a: a.update(v=a["v"][0, 0]), ValueError, r"v must have rank 4"),
    "k-v-shapes-differ": _bad(lambda a: a.update(v=a["v"][:, :, :-1]), ValueError, r"k and v must have the same shape"),
    "seq-len-mismatch": _bad(lambda a: a.update(k=a["k"][:, :, :-1], v=a["v"][:, :, :-1]), ValueError,
                             r"does not match q shape"),
    "head-dim-mismatch": _bad(lambda a: a.update(k=torch.randn(B, 2, N, 32), v=torch.randn(B, 2, N, 32)),
                              ValueError, r"does not match q shape"),
    "batch-mismatch": _bad(lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), ValueError, r"does not match q shape"),
    "heads-not-a-multiple": _bad(lambda a: a.update(q=torch.randn(B, 3, N, D)), ValueError,
                                 r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    "empty-sequence": _bad(lambda a: a.update(q=a["q"][:, :, :0], k=a["k"][:, :, :0], v=a["v"][:, :, :0]),
                           ValueError, r"empty input"),
    "head-dim-8": _bad(lambda a: a.update(**dict(zip("qkv", _qkv(dim=8)))), ValueError, r"head dim must be in 16\.\.256, got 8"),
    "head-dim-300": _bad(lambda a: a.update(**dict(zip("qkv", _qkv(n=2, dim=300)))), ValueError,
                         r"head dim must be in 16\.\.256, got 300"),
    # dtypes and devices
    "dtype-mismatch": _bad(lambda a: a.update(k=a["k"].half()), TypeError, r"q, k, v must share one dtype"),
    "integer-q": _bad(lambda a: a.update(q=a["q"].long()), TypeError, r"q has dtype torch\.int64"),
    "integer-qkv": _bad(lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError,
                        r"q has dtype torch\.int32"),
    "bool-v": _bad(lambda a: a.update(v=a["v"] > 0), TypeError, r"v has dtype torch\.bool"),
    "float64-q": _bad(lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError,
                      r"supported dtypes are float32, float16 and bfloat16"),
    "q-not-a-tensor": _bad(lambda a: a.update(q=a["q"].tolist()), TypeError, r"q must be a torch\.Tensor, got list"),
    "device-mismatch": _bad(lambda a: a.update(k=a["k"].to("meta")), ValueError, r"q, k, v must be on one device"),
    # alpha
    "alpha-1.0": _bad(lambda a: a.update(alpha=1.0), ValueError, r"alpha must be in \(1, 2\], got 1\.0"),
    "alpha-2.5": _bad(lambda a: a.update(alpha=2.5), ValueError, r"alpha must be in \(1, 2\], got 2\.5"),
    "alpha-0.5": _bad(lambda a: a.update(alpha=0.5), ValueError, r"alpha must be in \(1, 2\]"),
    "alpha-nan": _bad(lambda a: a.update(alpha=math.nan), ValueError, r"alpha must be in \(1, 2\]"),
    "alpha-str": _bad(lambda a: a.update(alpha="1.5"), TypeError, r"alpha must be a float"),
    "alpha-bool": _bad(lambda a: a.update(alpha=True), TypeError, r"alpha must be a float"),
    "alpha-vector": _bad(lambda a: a.update(alpha=torch.tensor([1.5, 2.0])), ValueError, r"alpha must be a scalar"),
    # flags, lengths, iterations, scale, backend
    "is-causal-str": _bad(lambda a: a.update(is_causal="yes"), TypeError, r"is_causal must be a bool"),
    "varlen-wrong-shape": _bad(lambda a: a.update(varlen=torch.tensor([3, 4, 5])), ValueError,
                               r"varlen must have shape \(2,\), got \(3,\)"),
    "varlen-2d": _bad(lambda a: a.update(varlen=torch.tensor([[3], [4]])), ValueError, r"varlen must have shape"),
    "varlen-float": _bad(lambda a: a.update(varlen=torch.tensor([3.0, 4.0])), TypeError,
                         r"varlen must be an integer tensor, got dtype torch\.float32"),
    "varlen-bool": _bad(lambda a: a.update(varlen=torch.tensor([True, False])), TypeError,
                        r"varlen must be an integer tensor"),
    "varlen-list": _bad(lambda a: a.update(varlen=[3, 4]), TypeError, r"varlen must be an integer tensor"),
    "varlen-negative": _bad(lambda a: a.update(varlen=torch.tensor([-1, 4])), ValueError,
                            r"varlen values must be valid lengths in \[0, 9\].*from -1 to 4"),
    "varlen-too-long": _bad(lambda a: a.update(varlen=torch.tensor([9, 10], dtype=torch.int32)), ValueError,
                            r"varlen values must be valid lengths in \[0, 9\].*from 9 to 10"),
    "varlen-device": _bad(lambda a: a.update(varlen=torch.tensor([3, 4], device="meta")), ValueError,
                          r"varlen is on meta"),
    "niter-0": _bad(lambda a: a.update(niter=0), ValueError, r"niter must be in 1\.\.\d+, got 0"),
    "niter-negative": _bad(lambda a: a.update(niter=-3), ValueError, r"niter must be in"),
    "niter-huge": _bad(lambda a: a.update(niter=10**6), ValueError, r"niter must be in"),
    "niter-float": _bad(lambda a: a.update(niter=2.0), TypeError, r"niter must be an int"),
    "niter-bool": _bad(lambda a: a.update(niter=True), TypeError, r"niter must be an int"),
    "scale-0": _bad(lambda a: a.update(scale=0.0), ValueError, r"scale must be a positive finite number, got 0\.0"),
    "scale-negative": _bad(lambda a: a.update(scale=-0.25), ValueError, r"scale must be a positive"),
    "scale-inf": _bad(lambda a: a.update(scale=math.inf), ValueError, r"scale must be a positive finite"),
    "scale-nan": _bad(lambda a: a.update(scale=math.nan), ValueError, r"scale must be a positive finite"),
    "scale-str": _bad(lambda a: a.update(scale="0.1"), TypeError, r"scale must be a float"),
    "unknown-backend": _bad(lambda a: a.update(backend="cuda"), ValueError, r"unknown backend 'cuda'"),
    "unknown-backend-case": _bad(lambda a: a.update(backend="Torch"), ValueError, r"unknown backend 'Torch'"),
    # config
    "config-unknown-field": _bad(lambda a: a.update(config={"block_q": 64}), ConfigError,
                                 r"unknown config field 'block_q'.*known fields"),
    "config-out-of-domain": _bad(lambda a: a.update(config={"q_chunk": 17}), ConfigError,
                                 r"config field 'q_chunk': 17 is not an allowed value"),
    "config-wrong-value-type": _bad(lambda a: a.update(config={"niter": "8"}), ConfigError, r"config field 'niter'"),
    "config-bool-for-int": _bad(lambda a: a.update(config={"niter": True, "q_chunk": 16}), ConfigError,
                                r"config field 'niter': True is not an allowed value"),
    "is-causal-int": _bad(lambda a: a.update(is_causal=1), TypeError, r"is_causal must be a bool, got int"),
    "niter-float-2": _bad(lambda a: a.update(niter=1.0), TypeError, r"niter must be an int"),
    "config-not-a-mapping": _bad(lambda a: a.update(config=[("q_chunk", 64)]), TypeError,
                                 r"config must be a mapping or a Config, got list"),
    "config-of-entmax": _bad(lambda a: a.update(config=get_spec("entmax", "torch").default()), ConfigError,
                             r"config is for entmax \(torch\), not adasplash \(torch\)"),
    "config-of-triton-backend": _bad(lambda a: a.update(config=get_spec("adasplash", "triton").default()),
                                     ConfigError, r"not adasplash \(torch\)"),
    # unhashable arguments, other layouts, a numpy bool, meta alpha, empty k/v heads, unsigned lengths
    "backend-unhashable": _bad(lambda a: a.update(backend=["torch"]), ValueError, r"unknown backend \['torch'\]"),
    "scale-unhashable": _bad(lambda a: a.update(scale=[0.5]), TypeError, r"scale must be a float or None, got list"),
    "niter-unhashable": _bad(lambda a: a.update(niter=[2]), TypeError, r"niter must be an int or None, got list"),
    "is-causal-unhashable": _bad(lambda a: a.update(is_causal=[True]), TypeError, r"is_causal must be a bool, got list"),
    "is-causal-numpy-bool": _bad(lambda a: a.update(is_causal=np.bool_(True)), TypeError,
                                 r"is_causal must be a bool, got numpy\.bool"),
    "alpha-meta-tensor": _bad(lambda a: a.update(alpha=torch.tensor(1.5, device="meta")), ValueError,
                              r"alpha is a meta tensor"),
    "q-sparse": _bad(lambda a: a.update(q=a["q"].to_sparse()), TypeError,
                     r"q must be a dense \(strided\) tensor, got a torch\.sparse_coo tensor"),
    "kv-heads-0": _bad(lambda a: a.update(k=a["k"][:, :0], v=a["v"][:, :0]), ValueError, r"empty input"),
    "varlen-uint32-too-long": _bad(lambda a: a.update(varlen=torch.tensor([9, 10], dtype=torch.uint32)), ValueError,
                                   r"varlen values must be valid lengths in \[0, 9\].*from 9 to 10"),
}


#: Valid calls close to the bad ones (True vs 1, 2 vs 2.0, ...): run first, they fill the call memo,
#: which must never let a bad call through.
NEIGHBOURS = {"is_causal": True, "niter": 1, "scale": 2.0, "varlen": torch.tensor([3, 4]),
              "config": {"niter": 1, "q_chunk": 16}, "alpha": 2.0}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after-valid-neighbours"])
@pytest.mark.parametrize("case", sorted(BAD_ATTENTION))
def test_adasplash_bad_input_is_named(case: str, warm: bool) -> None:
    change, exc, match = BAD_ATTENTION[case]
    q, k, v = _qkv()
    call = {"q": q, "k": k, "v": v, "alpha": 1.5, "is_causal": False, "varlen": None, "niter": None,
            "scale": None, "backend": "torch", "config": None}
    if warm:
        adasplash(**call)
        for name, value in NEIGHBOURS.items():
            adasplash(**dict(call, **{name: value}))
    change(call)
    with pytest.raises(exc, match=match):
        adasplash(**call)
    with pytest.raises(exc, match=match):  # select validates the same way and explains nothing bad
        select("adasplash", **call)


def test_varlen_values_are_checked_on_every_call() -> None:
    """The memo skips re-validating a known signature, never the lengths' values (CPU tensors)."""
    q, k, v = _qkv()
    out = adasplash(q, k, v, varlen=torch.tensor([0, 9]), backend="torch")  # both ends are valid lengths
    assert not out[0].any() and relative_error(out[1], attention_reference(q, k, v)[1]) <= tolerance(torch.float32)
    with pytest.raises(ValueError, match=r"varlen values must be valid lengths in \[0, 9\]"):
        adasplash(q, k, v, varlen=torch.tensor([5, 12]), backend="torch")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint32, torch.uint64], ids=str)
def test_varlen_of_any_integer_dtype_gives_the_int64_result(dtype) -> None:
    q, k, v = _qkv()
    expected = adasplash(q, k, v, varlen=torch.tensor([4, 9]), backend="torch")
    assert torch.equal(adasplash(q, k, v, varlen=torch.tensor([4, 9], dtype=dtype), backend="torch"), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("triton", torch.bfloat16)])
def test_gpu_varlen_values_are_checked_on_request(monkeypatch, backend, dtype) -> None:
    """Reading a GPU tensor's values synchronises: unchecked by default (a length past N acts as N),
    checked under ADASPLASH_TUNE_CHECK_VARLEN=1."""
    monkeypatch.delenv("ADASPLASH_TUNE_CHECK_VARLEN", raising=False)
    q, k, v = (t.to("cuda", dtype) for t in _qkv())
    bad, clamped = (torch.tensor(lengths, device="cuda") for lengths in ([3, 12], [3, 9]))
    out = adasplash(q, k, v, varlen=bad, backend=backend)
    assert torch.equal(out, adasplash(q, k, v, varlen=clamped, backend=backend))
    monkeypatch.setenv("ADASPLASH_TUNE_CHECK_VARLEN", "1")
    with pytest.raises(ValueError, match=r"varlen values must be valid lengths in \[0, 9\]"):
        adasplash(q, k, v, varlen=bad, backend=backend)


def test_a_differentiable_alpha_tensor_gets_its_gradient_and_a_detached_one_none() -> None:
    q, k, v = _qkv(n=12, seed=11)
    alpha = torch.tensor(1.4, requires_grad=True)
    adasplash(q, k, v, alpha, backend="torch").square().sum().backward()
    assert alpha.grad is not None and alpha.grad.shape == () and alpha.grad.item() != 0.0
    with torch.no_grad():  # no graph: the alpha is only read
        out = adasplash(q, k, v, alpha, backend="torch")
    assert out.grad_fn is None
    assert relative_error(out, attention_reference(q, k, v, 1.4)) <= tolerance(torch.float32)


def test_entmax_refuses_an_alpha_that_needs_a_gradient() -> None:
    x = torch.randn(3, 40)
    with pytest.raises(ValueError, match=r"entmax has no gradient w\.r\.t\. alpha.*detach"):
        entmax(x, torch.tensor(1.5, requires_grad=True), backend="torch")
    with pytest.raises(ValueError, match=r"entmax has no gradient w\.r\.t\. alpha"):  # select explains no failing call
        select("entmax", x, torch.tensor(1.5, requires_grad=True), backend="torch")
    out = entmax(x, torch.tensor(1.5, requires_grad=True).detach(), backend="torch")
    assert relative_error(out, entmax_reference(x, 1.5)) <= tolerance(torch.float32)


def test_with_several_bad_inputs_the_first_in_the_documented_order_is_named() -> None:
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        adasplash(q.tolist(), k, v, alpha=5.0)
    with pytest.raises(ValueError, match=r"head dim must be in"):
        adasplash(*_qkv(dim=8), alpha=torch.tensor(7.0))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        entmax([1.0, 2.0], torch.tensor(1.5, requires_grad=True))


def test_config_errors_are_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("kernel", KERNELS)
def test_violated_constraint_is_named(kernel: str, monkeypatch) -> None:
    """Triton declarations carry constraints; the API rejects a violating config before any launch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = get_spec(kernel, "triton")
    values, doc = _violating(spec)
    with pytest.raises(ConfigError, match=r"violates constraint") as info:
        spec.validate(values)
    assert doc in str(info.value)
    with pytest.raises(ConfigError, match=r"violates constraint"):
        if kernel == "adasplash":
            adasplash(*_qkv(), backend="triton", config=values)
        else:
            entmax(torch.randn(3, 40), backend="triton", config=values)


@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_on_cpu_without_interpreter_is_an_error(kernel: str, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*backend='torch'"):
        if kernel == "adasplash":
            adasplash(*_qkv(), backend="triton")
        else:
            entmax(torch.randn(3, 40), backend="triton")


# --------------------------------------------------------------------------- bad input: entmax

BAD_ENTMAX = {
    "integer-x": (lambda a: a.update(x=torch.arange(12).view(3, 4)), TypeError, r"x has dtype torch\.int64"),
    "x-not-a-tensor": (lambda a: a.update(x=[[1.0, 2.0]]), TypeError, r"x must be a torch\.Tensor"),
    "x-scalar": (lambda a: a.update(x=torch.tensor(1.0)), ValueError, r"at least one dimension"),
    "alpha-1.0": (lambda a: a.update(alpha=1.0), ValueError, r"alpha must be in \(1, 2\]"),
    "alpha-2.5": (lambda a: a.update(alpha=2.5), ValueError, r"alpha must be in \(1, 2\]"),
    "dim-out-of-range": (lambda a: a.update(dim=2), ValueError, r"dim 2 is out of range for a tensor of rank 2"),
    "dim-float": (lambda a: a.update(dim=1.0), TypeError, r"dim must be an int"),
    "niter-0": (lambda a: a.update(niter=0), ValueError, r"niter must be in"),
    "unknown-backend": (lambda a: a.update(backend="numpy"), ValueError, r"unknown backend 'numpy'"),
    "config-unknown-field": (lambda a: a.update(config={"q_chunk": 64}), ConfigError, r"unknown config field 'q_chunk'"),
    "config-out-of-domain": (lambda a: a.update(config={"niter": 7777}), ConfigError, r"config field 'niter': 7777"),
    "dim-unhashable": (lambda a: a.update(dim=[0]), TypeError, r"dim must be an int, got list"),
    "dim-numpy": (lambda a: a.update(dim=np.int64(0)), TypeError, r"dim must be an int, got numpy\.int64"),
    "backend-unhashable": (lambda a: a.update(backend=["torch"]), ValueError, r"unknown backend \['torch'\]"),
    "niter-unhashable": (lambda a: a.update(niter=[2]), TypeError, r"niter must be an int or None, got list"),
    "x-sparse": (lambda a: a.update(x=a["x"].to_sparse()), TypeError, r"x must be a dense \(strided\) tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTMAX))
def test_entmax_bad_input_is_named(case: str) -> None:
    change, exc, match = BAD_ENTMAX[case]
    call = {"x": torch.randn(3, 40), "alpha": 1.5, "dim": -1, "niter": None, "backend": "torch", "config": None}
    entmax(**call)  # a valid call of the same shape first: the call memo must not let a bad one through
    change(call)
    with pytest.raises(exc, match=match):
        entmax(**call)
    with pytest.raises(exc, match=match):
        select("entmax", **call)


def test_select_unknown_kernel() -> None:
    with pytest.raises(ValueError, match=r"unknown kernel 'softmax'"):
        select("softmax", torch.randn(2, 3))


def test_select_with_a_wrong_argument_list_names_select() -> None:
    """Used to name the private _select_adasplash() / _select_entmax()."""
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(TypeError, match=r"^select\(\) missing 2 required positional arguments: 'k' and 'v'"):
        select("adasplash", q)
    with pytest.raises(TypeError, match=r"^select\(\) got an unexpected keyword argument 'dropout'"):
        select("entmax", q, dropout=0.1)


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_output_has_q_shape_and_dtype(dtype: torch.dtype) -> None:
    q, k, v = _qkv(batch=2, hq=4, hkv=1, n=33, dim=48, dtype=dtype, seed=1)
    out = adasplash(q, k, v, alpha=1.5, is_causal=True, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    ref = attention_reference(q, k, v, 1.5, True)
    assert relative_error(out, ref) <= tolerance(dtype)


def test_upstream_positional_signature() -> None:
    """adasplash(q, k, v, alpha, is_causal, varlen, niter), as in the upstream package."""
    q, k, v = _qkv(batch=2, hq=2, hkv=1, n=21, seed=2)
    varlen = torch.tensor([21, 13], dtype=torch.int32)
    out = adasplash(q, k, v, 2.0, True, varlen, 12)
    assert relative_error(out, attention_reference(q, k, v, 2.0, True, varlen)) <= tolerance(torch.float32)
    assert not out[1, :, 13:].any()


def test_auto_backend_on_cpu_is_torch() -> None:
    q, k, v = _qkv(n=17, seed=3)
    assert select("adasplash", q, k, v).backend == "torch"
    assert torch.equal(adasplash(q, k, v), adasplash(q, k, v, backend="torch"))
    assert torch.equal(adasplash(q, k, v, backend="auto"), adasplash(q, k, v, backend="torch"))


def test_gradients_through_the_api() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(batch=1, hq=2, hkv=1, n=19, seed=4))
    out = adasplash(q, k, v, 1.25, False, torch.tensor([15]))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*leaves, alpha=1.25, varlen=torch.tensor([15]))
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    for g, rg in zip(grads, ref_grads):
        assert relative_error(g, rg) <= tolerance(torch.float32, grad=True)


def test_scale_override_matches_reference() -> None:
    q, k, v = _qkv(n=25, dim=80, seed=6)
    out = adasplash(q, k, v, 1.5, scale=0.37)
    assert relative_error(out, attention_reference(q, k, v, 1.5, scale=0.37)) <= tolerance(torch.float32)
    default = attention_reference(q, k, v, 1.5)
    assert relative_error(out, default) > 10 * tolerance(torch.float32)  # the override really acts


def test_alpha_as_zero_dim_tensor() -> None:
    q, k, v = _qkv(n=11, seed=7)
    out = adasplash(q, k, v, torch.tensor(1.25))
    assert relative_error(out, attention_reference(q, k, v, 1.25)) <= tolerance(torch.float32)


def test_numpy_scalars_are_accepted_for_alpha_and_scale() -> None:
    """np.float32 is a real number (numbers.Real) but not a Python float: it was refused with
    "alpha must be a float ..., got float32"."""
    np = pytest.importorskip("numpy")
    q, k, v = _qkv(n=11, seed=7)
    want = adasplash(q, k, v, 1.25, scale=0.5)
    assert torch.equal(adasplash(q, k, v, np.float32(1.25), scale=np.float32(0.5)), want)
    assert torch.equal(entmax(q, np.float32(1.25)), entmax(q, 1.25))
    with pytest.raises(TypeError, match="alpha"):
        adasplash(q, k, v, True)


def test_niter_override_reaches_the_result() -> None:
    q, k, v = _qkv(batch=1, hq=2, hkv=2, n=128, dim=16, seed=8)
    ref = attention_reference(q, k, v, 1.5)
    err1 = relative_error(adasplash(q, k, v, 1.5, niter=1), ref)
    err10 = relative_error(adasplash(q, k, v, 1.5, niter=10), ref)
    assert err10 <= tolerance(torch.float32) < err1
    # the same override inside an explicit config gives the same numbers
    explicit = adasplash(q, k, v, 1.5, config={"niter": 1})
    assert torch.equal(explicit, adasplash(q, k, v, 1.5, niter=1))
    assert select("adasplash", q, k, v, 1.5, niter=3).config["niter"] == 3


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_any_niter_the_api_takes_runs_on_every_backend(backend: str, triton_device: str) -> None:
    """niter is an override in 1..100, not a config field: the Triton attention op used to refuse
    an override outside the tuned choices (31, 100) with "config field 'niter': 31 is not an
    allowed value", a field the caller never passed."""
    device = triton_device if backend == "triton" else "cpu"
    q, k, v = (t.to(device) for t in _qkv(batch=1, hq=2, hkv=1, n=5, seed=12))
    ref = attention_reference(q, k, v, 1.5, True)
    for niter in (31, 100):
        out = adasplash(q, k, v, 1.5, True, niter=niter, backend=backend)
        assert relative_error(out, ref) <= tolerance(torch.float32)
        assert select("adasplash", q, k, v, 1.5, True, niter=niter, backend=backend).config["niter"] == niter
    with pytest.raises(ConfigError, match=r"config field 'niter': 31"):  # as a config field it is still refused
        adasplash(q, k, v, config={"niter": 31}, backend=backend)


@pytest.mark.parametrize("shape,dim", [((3, 0), -1), ((0, 4), -1), ((2, 0, 3), 0)])
def test_entmax_of_an_empty_tensor_is_empty_and_differentiable(shape, dim) -> None:
    """An empty x that requires grad used to give a result outside the graph: backward raised."""
    x = torch.randn(shape, requires_grad=True)
    y = entmax(x, dim=dim, backend="torch")
    assert y.shape == x.shape and y.dtype == x.dtype and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_entmax_through_the_api() -> None:
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(9))
    out = entmax(x, 1.25, dim=0, backend="torch")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert relative_error(out, entmax_reference(x, 1.25, dim=0)) <= tolerance(torch.float32)


# --------------------------------------------------------------------------- select


def test_select_adasplash_default_and_explicit() -> None:
    q, k, v = _qkv(batch=2, hq=4, hkv=2, n=100, dim=48, dtype=torch.bfloat16)
    sel = select("adasplash", q, k, v, alpha=1.5, is_causal=True, backend="torch")
    spec = get_spec("adasplash", "torch")
    assert sel.source == "default"
    assert isinstance(sel.config, dict) and sel.config == spec.default().as_dict()
    assert isinstance(sel.key, dict)
    assert sel.key == attention_key(backend="torch", dtype="bfloat16", batch=2, q_heads=4, kv_heads=2,
                                    seq_len=100, head_dim=48, alpha=1.5, causal=True, varlen=False)
    explicit = select("adasplash", q, k, v, 1.5, True, config={"q_chunk": 32}, backend="torch")
    assert explicit.source == "explicit"
    assert explicit.config == dict(spec.default().as_dict(), q_chunk=32)
    assert explicit.key == sel.key
    varlen_key = select("adasplash", q, k, v, 2.0, False, torch.tensor([5, 100])).key
    assert varlen_key["varlen"] is True and varlen_key["alpha"] == "2" and varlen_key["causal"] is False


def test_select_entmax_default_and_explicit() -> None:
    x = torch.randn(6, 3, 300)
    sel = select("entmax", x, alpha=2.0, dim=-1, backend="torch")
    spec = get_spec("entmax", "torch")
    assert sel.source == "default"
    assert isinstance(sel.config, dict) and sel.config == spec.default().as_dict()
    assert sel.key == entmax_key(backend="torch", dtype="float32", rows=18, cols=300, alpha=2.0)
    other = select("entmax", x, 1.25, 1).key  # along dim 1: 1800 rows of 3
    assert other == entmax_key(backend="torch", dtype="float32", rows=1800, cols=3, alpha=1.25)
    explicit = select("entmax", x, alpha=2.0, backend="torch", config={"niter": 4})
    assert explicit.source == "explicit" and explicit.config["niter"] == 4


# --------------------------------------------------------------------------- configs as data


@pytest.mark.parametrize("kernel,backend", [(k, b) for k in KERNELS for b in ("torch", "triton")])
def test_config_json_round_trip(kernel: str, backend: str) -> None:
    spec = get_spec(kernel, backend)
    values = {p.name: p.choices[len(p.choices) // 2] for p in spec.params}
    cfg = spec.validate(values) if spec.is_valid(values) else next(spec.grid())
    again = config_from_json(cfg.to_json())
    assert again == cfg and again.as_dict() == cfg.as_dict()
    assert (again.kernel, again.backend) == (kernel, backend)


def test_round_tripped_config_drives_a_call() -> None:
    spec = get_spec("adasplash", "torch")
    cfg = config_from_json(spec.validate({"q_chunk": 16, "k_chunk": 64, "niter": 12}).to_json())
    q, k, v = _qkv(n=100, seed=10)
    sel = select("adasplash", q, k, v, config=cfg)
    assert sel.source == "explicit" and sel.config == cfg.as_dict()
    out = adasplash(q, k, v, config=cfg)
    assert relative_error(out, attention_reference(q, k, v)) <= tolerance(torch.float32)


@pytest.mark.parametrize("kernel,backend", [(k, b) for k in KERNELS for b in ("torch", "triton")])
def test_config_error_messages(kernel: str, backend: str) -> None:
    spec = get_spec(kernel, backend)
    with pytest.raises(ConfigError, match=r"unknown config field 'bogus'") as info:
        spec.validate({"bogus": 1})
    assert all(name in str(info.value) for name in spec.names)  # lists what is known
    first = spec.params[0]
    with pytest.raises(ConfigError, match=rf"config field '{first.name}': -5 is not an allowed value") as info:
        spec.validate({first.name: -5})
    assert str(list(first.choices)) in str(info.value)
    with pytest.raises(ConfigError, match=r"lacks fields"):
        spec.validate({first.name: first.default}, partial=False)
    with pytest.raises(ConfigError, match=r"malformed config JSON"):
        config_from_json('{"kernel": "%s", "backend": "%s"}' % (kernel, backend))


def test_public_names() -> None:
    assert {"adasplash", "entmax", "select", "__version__"} <= set(adasplash_tune.__all__)
