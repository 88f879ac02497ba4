"""Recorded input samples (ADASPLASH_TUNE_RECORD_SAMPLES): saved once per key, bounded, loadable."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import adasplash_tune
from adasplash_tune.cache import samples
from adasplash_tune.tuner.problems import AttentionProblem, problems_from_record


@pytest.fixture(autouse=True)
def _isolated(isolated_locations):
    samples.clear_memo()


def _qkv(b=2, hq=4, hkv=2, n=40, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, n, d, generator=gen).to(dtype), torch.randn(b, hkv, n, d, generator=gen).to(dtype),
            torch.randn(b, hkv, n, d, generator=gen).to(dtype))


def _record_env(tmp_path, monkeypatch, mb=None):
    record, folder = tmp_path / "record.jsonl", tmp_path / "samples"
    monkeypatch.setenv("ADASPLASH_TUNE_RECORD", str(record))
    monkeypatch.setenv(samples.ENV_SAMPLES, str(folder))
    if mb is not None:
        monkeypatch.setenv(samples.ENV_SAMPLE_MB, str(mb))
    return record, folder


def _lines(record):
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_a_new_key_saves_one_sample_and_names_it_in_the_record(tmp_path, monkeypatch):
    record, folder = _record_env(tmp_path, monkeypatch)
    q, k, v = _qkv()
    out = adasplash_tune.adasplash(q, k, v, 1.5, True, backend="torch")
    adasplash_tune.adasplash(q, k, v, 1.5, True, backend="torch")  # the same key: nothing new
    q2, k2, v2 = _qkv(n=45, seed=1)  # another N in the same bucket: same key, no second sample
    adasplash_tune.adasplash(q2, k2, v2, 1.5, True, backend="torch")
    assert torch.isfinite(out).all()
    lines = _lines(record)
    assert [("sample" in r, r.get("count", 1)) for r in lines] == [(False, 1), (True, 0)]
    files = list(folder.iterdir())
    assert len(files) == 1 and lines[1]["sample"] == str(files[0].resolve())
    assert lines[1]["key"] == lines[0]["key"] and lines[1]["shape"]["alpha"] == 1.5
    loaded = samples.load_attention_sample(files[0])
    assert torch.equal(loaded["q"], q[:1]) and torch.equal(loaded["k"], k[:1]) and torch.equal(loaded["v"], v[:1])
    assert json.loads(loaded["meta"]["key"]) == lines[0]["key"] and loaded["meta"]["causal"] == "true"


def test_no_sample_without_the_variable_or_with_an_explicit_config(tmp_path, monkeypatch):
    record, folder = _record_env(tmp_path, monkeypatch)
    q, k, v = _qkv()
    adasplash_tune.adasplash(q, k, v, 2.0, False, backend="torch", config={"q_chunk": 16})
    assert not folder.exists()
    monkeypatch.delenv(samples.ENV_SAMPLES)
    adasplash_tune.adasplash(q, k, v, 1.5, False, backend="torch")
    assert not folder.exists() and all("sample" not in r for r in _lines(record))


def test_the_size_cap_keeps_whole_kv_groups_and_the_scale_is_folded_into_q(tmp_path, monkeypatch):
    q, k, v = _qkv(b=1, hq=6, hkv=3, n=64, d=32)
    group_bytes = (2 + 2) * 64 * 32 * 4  # two query heads + k + v of one kv head, float32
    path = samples.save_attention_sample(tmp_path / "s.safetensors", {"seq": 64}, q, k, v, None, 1.5, False,
                                         0.5, cap_bytes=2.5 * group_bytes)
    loaded = samples.load_attention_sample(path)
    assert loaded["q"].shape == (1, 4, 64, 32) and loaded["k"].shape == (1, 2, 64, 32)
    torch.testing.assert_close(loaded["q"], q[:, :4] * (0.5 * 32 ** 0.5))  # scores as the default scale sees them
    assert loaded["meta"]["heads_kept"] == "4"


def test_a_cap_below_one_group_saves_nothing_and_the_call_goes_on(tmp_path, monkeypatch, caplog):
    record, folder = _record_env(tmp_path, monkeypatch, mb=0.001)
    q, k, v = _qkv(n=64, d=64)
    with caplog.at_level(logging.WARNING, logger="adasplash_tune"):
        out = adasplash_tune.adasplash(q, k, v, 1.5, False, backend="torch")
    assert torch.isfinite(out).all() and "not saved" in caplog.text
    assert not any(folder.glob("*.safetensors")) and all("sample" not in r for r in _lines(record))


def test_a_folder_that_cannot_be_written_warns_once_and_never_fails_the_call(tmp_path, monkeypatch, caplog):
    record, folder = _record_env(tmp_path, monkeypatch)
    folder.write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="adasplash_tune"):
        for n in (40, 300):
            q, k, v = _qkv(n=n)
            assert torch.isfinite(adasplash_tune.adasplash(q, k, v, 1.5, False, backend="torch")).all()
    assert caplog.text.count("cannot save an input sample") == 1
    assert len(_lines(record)) == 2


def test_varlen_lengths_are_kept(tmp_path, monkeypatch):
    record, folder = _record_env(tmp_path, monkeypatch)
    q, k, v = _qkv(n=50)
    lengths = torch.tensor([37, 50])
    adasplash_tune.adasplash(q, k, v, 1.5, True, lengths, backend="torch")
    [path] = folder.iterdir()
    assert samples.load_attention_sample(path)["varlen"].tolist() == [37]


@pytest.mark.parametrize("content, message", [(b"not a safetensors file", "cannot be read"), (None, "does not exist")])
def test_a_bad_sample_file_is_named_in_the_error(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        samples.load_attention_sample(path)
    assert "bad.safetensors" in str(info.value)


def test_foreign_safetensors_files_are_refused_and_plain_qkv_files_read(tmp_path):
    from safetensors.torch import save_file

    weights, other, capture = (tmp_path / f"{n}.safetensors" for n in ("weights", "other", "capture"))
    save_file({"q": torch.zeros(1, 1, 4, 16)}, str(weights))
    with pytest.raises(ValueError, match="lacks 4-d q, k, v"):
        samples.load_attention_sample(weights)
    q, k, v = _qkv(b=2)
    save_file({"q": q, "k": k, "v": v}, str(other), metadata={"format": "something/2"})
    with pytest.raises(ValueError, match="not an adasplash-tune sample"):
        samples.load_attention_sample(other)
    save_file({"q": q, "k": k, "v": v}, str(capture), metadata={"layer": "1"})  # as train_lm --capture writes
    loaded = samples.load_attention_sample(capture)
    assert torch.equal(loaded["q"], q[:1]) and torch.equal(loaded["v"], v[:1])


def test_the_recorded_problem_tunes_on_its_sample(tmp_path, monkeypatch):
    record, folder = _record_env(tmp_path, monkeypatch)
    q, k, v = _qkv(b=2, hq=4, hkv=2, n=40, d=16)
    adasplash_tune.adasplash(q, k, v, 1.5, True, backend="torch")
    [(problem, count)] = problems_from_record(record, "adasplash")
    [path] = folder.iterdir()
    assert count == 1 and problem.inputs == f"recorded:{path.resolve()}"
    assert "recorded:" in problem.label()
    made = problem.make_inputs("cpu", 0, requires_grad=False)
    # batch rows repeat the sample's one row; heads are the call's own
    assert torch.equal(made["q"][1], q[0]) and torch.equal(made["k"][0], k[0]) and torch.equal(made["v"][1], v[0])
    path.unlink()  # an entry whose sample is gone re-checks on randn
    from types import SimpleNamespace

    from adasplash_tune.tuner.problems import problem_for_entry

    entry = SimpleNamespace(kernel="adasplash", key=problem.key("torch"), provenance={"problem": problem.to_dict()})
    assert problem_for_entry(entry).inputs == "randn"


def test_a_sample_tiles_to_more_heads_keeping_the_groups(tmp_path):
    q, k, v = _qkv(b=1, hq=4, hkv=2, n=24, d=16)
    path = samples.save_attention_sample(tmp_path / "s.safetensors", {}, q, k, v, None, 1.5, False, 0.25, 1e9)
    problem = AttentionProblem(batch=2, heads=6, kv_heads=3, seq_len=24, head_dim=16, inputs=f"recorded:{path}")
    made = problem.make_inputs("cpu", 0, requires_grad=True)
    assert made["q"].shape == (2, 6, 24, 16) and made["q"].is_leaf and made["q"].requires_grad
    assert torch.equal(made["q"][0, 4:6], q[0, 0:2]) and torch.equal(made["k"][1, 2], k[0, 0])  # group 2 = group 0
    with pytest.raises(ValueError, match="N x D"):
        AttentionProblem(batch=1, heads=4, kv_heads=2, seq_len=30, head_dim=16,
                         inputs=f"recorded:{path}").make_inputs("cpu", 0, False)
    with pytest.raises(ValueError, match="query heads per kv head"):
        AttentionProblem(batch=1, heads=4, kv_heads=4, seq_len=24, head_dim=16,
                         inputs=f"recorded:{path}").make_inputs("cpu", 0, False)
    with pytest.raises(ValueError, match="no varlen lengths"):
        AttentionProblem(batch=1, heads=4, kv_heads=2, seq_len=24, head_dim=16, varlen=True,
                         inputs=f"recorded:{path}").make_inputs("cpu", 0, False)


def test_samples_without_a_record_file_warn_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(samples.ENV_SAMPLES, str(tmp_path / "samples"))
    with caplog.at_level(logging.WARNING, logger="adasplash_tune"):
        for n in (40, 300):
            q, k, v = _qkv(n=n)
            adasplash_tune.adasplash(q, k, v, 1.5, False, backend="torch")
    assert caplog.text.count("ADASPLASH_TUNE_RECORD is not") == 1 and not (tmp_path / "samples").exists()


def test_a_small_model_records_its_own_attention_for_tuning(tmp_path, monkeypatch):
    """The user's flow: a model with AdaSplashAttention runs a few steps with recording on."""
    from adasplash_tune.nn import AdaSplashAttention

    record, folder = _record_env(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 64))
    attn = AdaSplashAttention(embed_dim=64, num_heads=4, num_kv_heads=2, alpha=1.5, is_causal=True, backend="torch")
    opt = torch.optim.SGD([*model.parameters(), *attn.parameters()], lr=0.1)
    for _ in range(3):
        x = model(torch.randint(0, 50, (2, 30)))
        loss = attn(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    [(problem, count)] = problems_from_record(record, "adasplash")
    assert count == 1 and problem.inputs.startswith("recorded:") and (problem.heads, problem.kv_heads) == (4, 2)
    made = problem.make_inputs("cpu", 0, requires_grad=True)
    assert made["q"].shape == (2, 4, 30, 16) and torch.isfinite(made["q"]).all()
    out = problem.run(made, "torch", {"q_chunk": 16, "k_chunk": 64, "niter": 30})
    assert torch.isfinite(out).all() and len(list(folder.iterdir())) == 1
