"""transformers integration: attn_implementation="adasplash" on tiny randomly initialised BERT and
Llama models against the same models running a dense fp64 entmax oracle on the model's own mask."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AttentionInterface, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adasplash_tune.integrations import register_transformers
from adasplash_tune.integrations.transformers import adasplash_attention_forward, mask_to_varlen, register
from adasplash_tune.kernels.reference import entmax_reference, relative_error, tolerance

ORACLE = "adasplash-test-oracle"
F32, F32_GRAD = tolerance(torch.float32), tolerance(torch.float32, grad=True)


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """Dense fp64 entmax attention that applies whatever boolean mask the model built."""
    alpha = getattr(getattr(module, "config", None), "adasplash_alpha", None) or 1.5
    group = query.shape[1] // key.shape[1]
    q = query.double()
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = scaling * q @ k.transpose(-1, -2)
    n = query.shape[2]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else module.is_causal
        valid = torch.ones(n, n, dtype=torch.bool)
        valid = valid.tril() if causal else valid
    else:
        valid = attention_mask.bool()
    probs = entmax_reference(scores, alpha, dim=-1, valid=valid.expand_as(scores))
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_transformers()
    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, sdpa_mask)


@pytest.fixture(autouse=True)
def _defaults_only(monkeypatch, tmp_path):
    monkeypatch.setenv("ADASPLASH_TUNE_MODE", "off")
    monkeypatch.setenv("ADASPLASH_TUNE_CACHE", str(tmp_path / "cache.sqlite"))


def _bert_config(**kw) -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def _llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                       **kw)


def _pair(model_cls, config):
    """The model under ``adasplash`` and the same weights under the oracle."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(config)
    cfg._attn_implementation = "adasplash"
    model = model_cls(cfg).eval()
    ref_cfg = copy.deepcopy(config)
    ref_cfg._attn_implementation = ORACLE
    ref = model_cls(ref_cfg).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _inputs(vocab: int, lengths: list[int], n: int, *, left: bool = False):
    gen = torch.Generator().manual_seed(sum(lengths) + n)
    ids = torch.randint(1, vocab, (len(lengths), n), generator=gen)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        if left:
            mask[row, n - length:] = 1
        else:
            mask[row, :length] = 1
    return ids, mask


def _valid(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t[mask.bool()]


def _compare(model, ref, ids, mask, output: str):
    out = getattr(model(ids, attention_mask=mask), output)
    want = getattr(ref(ids, attention_mask=mask), output)
    assert relative_error(_valid(out, mask), _valid(want, mask)) <= F32
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    _valid(out * w, mask).sum().backward()
    _valid(want * w, mask).sum().backward()
    ref_grads = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([g.flatten() for g in ref_grads.values()])
    assert relative_error(flat, ref_flat) <= F32_GRAD
    floor = 1e-2 * ref_flat.norm().item()  # e.g. key biases: exactly zero gradient, round-off only
    for name, g in grads.items():
        scale = max(ref_grads[name].norm().item(), floor)
        assert (g - ref_grads[name]).norm().item() <= F32_GRAD * scale, name


def test_bert_with_right_padding_matches_the_oracle():
    model, ref = _pair(BertModel, _bert_config())
    ids, mask = _inputs(50, [13, 8], 13)
    _compare(model, ref, ids, mask, "last_hidden_state")


def test_llama_causal_lm_with_gqa_padding_and_config_alpha_matches_the_oracle():
    model, ref = _pair(LlamaForCausalLM, _llama_config(adasplash_alpha=1.25))
    ids, mask = _inputs(61, [6, 11, 3], 11)
    _compare(model, ref, ids, mask, "logits")


def test_llama_without_a_mask_is_causal_and_matches_the_oracle():
    model, ref = _pair(LlamaForCausalLM, _llama_config())
    ids, _ = _inputs(61, [9, 9], 9)
    out = model(ids).logits
    assert relative_error(out, ref(ids).logits) <= F32
    # causal: the logits of a prefix do not depend on later tokens
    assert relative_error(model(ids[:, :5]).logits, out[:, :5]) <= F32


def test_compiled_llama_with_fullgraph_matches_eager_and_checks_its_mask():
    torch._dynamo.reset()
    model, _ = _pair(LlamaForCausalLM, _llama_config())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask = _inputs(61, [9, 5], 9)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
        assert relative_error(_valid(got, mask), _valid(want, mask)) <= F32
        left_ids, left = _inputs(61, [9, 5], 9, left=True)
        with pytest.raises(ValueError, match="right-padded"):
            compiled(left_ids, attention_mask=left, use_cache=False)
    torch._dynamo.reset()


def test_mask_check_op_passes_opcheck():
    mask = _bool_mask([7, 3], 7, True)
    op = torch.ops.adasplash_tune.hf_mask_lengths.default
    result = torch.library.opcheck(op, (mask, 2, 7, True), test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}
    assert op(mask, 2, 7, True).tolist() == [7, 3]
    with pytest.raises(ValueError, match="right-padded"):
        op(mask, 2, 7, False)


def test_left_padding_is_refused():
    model, _ = _pair(LlamaForCausalLM, _llama_config())
    ids, mask = _inputs(61, [7, 4], 7, left=True)
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, attention_mask=mask)


def test_attention_dropout_in_training_is_refused():
    cfg = _bert_config()
    cfg.attention_probs_dropout_prob = 0.1
    model, _ = _pair(BertModel, cfg)
    ids, mask = _inputs(50, [5, 5], 5)
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(ids, attention_mask=mask)


def _module(causal: bool):
    module = torch.nn.Module()
    module.is_causal = causal
    return module


def test_kv_cache_decoding_shapes_are_refused():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 16, generator=gen)
    kv = torch.randn(1, 2, 5, 16, generator=gen)
    with pytest.raises(ValueError, match="use_cache=False"):
        adasplash_attention_forward(_module(True), q, kv, kv, None, scaling=0.25)


def test_direct_call_returns_batch_sequence_heads_layout():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 7, 16, generator=gen)
    kv = torch.randn(2, 2, 7, 16, generator=gen)
    out, weights = adasplash_attention_forward(_module(True), q, kv, kv, None, scaling=0.25, backend="torch")
    ref, _ = _oracle_attention(_module(True), q, kv, kv, None, scaling=0.25)
    assert weights is None and out.shape == (2, 7, 4, 16)
    assert relative_error(out, ref) <= F32


# --------------------------------------------------------------------------- mask mapping


def _bool_mask(lengths, n, causal):
    rows = torch.arange(n).view(1, 1, n, 1)
    cols = torch.arange(n).view(1, 1, 1, n)
    mask = cols < torch.tensor(lengths).view(-1, 1, 1, 1)
    return mask & (cols <= rows) if causal else mask


@pytest.mark.parametrize("causal", [True, False])
def test_right_padded_masks_map_to_lengths(causal):
    mask = _bool_mask([9, 4, 1], 9, causal)
    is_causal, varlen = mask_to_varlen(mask, 3, 9, causal_hint=not causal)
    assert is_causal is causal and varlen.tolist() == [9, 4, 1]
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert mask_to_varlen(additive, 3, 9, causal_hint=causal)[1].tolist() == [9, 4, 1]
    assert mask_to_varlen(_bool_mask([9, 9], 9, causal), 2, 9, causal)[1] is None
    assert mask_to_varlen(None, 2, 9, causal) == (causal, None)


def test_masks_that_cannot_be_expressed_raise():
    mask = _bool_mask([6, 6], 6, True)
    holed = mask.clone()
    holed[0, 0, 5, 2] = False
    with pytest.raises(ValueError, match="right-padded"):
        mask_to_varlen(holed, 2, 6, True)
    bias = torch.zeros(2, 1, 6, 6)
    bias[..., 0] = -math.log(2.0)  # an ALiBi-like additive bias
    with pytest.raises(ValueError, match="additive attention bias"):
        mask_to_varlen(bias, 2, 6, False)
    per_head = torch.cat([mask, _bool_mask([6, 3], 6, True)], dim=1)
    with pytest.raises(ValueError, match="per head"):
        mask_to_varlen(per_head, 2, 6, True)
    with pytest.raises(ValueError, match="does not fit"):
        mask_to_varlen(mask, 3, 6, True)


def test_register_validates_its_options():
    with pytest.raises(ValueError, match="alpha"):
        register("adasplash-bad", alpha=2.5)
    with pytest.raises(ValueError, match="unknown backend"):
        register("adasplash-bad", backend="cuda")
    # used to register, then fail at the model's first forward
    with pytest.raises(ValueError, match="unknown config field 'bogus'"):
        register("adasplash-bad", backend="torch", config={"bogus": 1})
    with pytest.raises(TypeError, match="config must be a mapping or a Config, got str"):
        register("adasplash-bad", config="q_chunk=16")
    assert "adasplash-bad" not in AttentionInterface._global_mapping
    assert register("adasplash-2", alpha=2.0) == "adasplash-2"
    assert "adasplash-2" in AttentionInterface._global_mapping
    assert "adasplash-2" in AttentionMaskInterface._global_mapping
