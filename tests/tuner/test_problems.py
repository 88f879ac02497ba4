"""Tuning problems: keys identical to the call-time keys, record files, the chunked oracle."""

from __future__ import annotations

import json

import pytest
import torch

import adasplash_tune
from adasplash_tune.cache.store import Entry
from adasplash_tune.kernels.reference import relative_error
from adasplash_tune.tuner import problems as P


@pytest.mark.parametrize("problem", [
    P.AttentionProblem(2, 4, 2, 77, 24, 1.5, True),
    P.AttentionProblem(1, 3, 3, 300, 80, 1.25, False, "float16", varlen=True),
    P.AttentionProblem(3, 2, 1, 16, 16, 2.0, False, "bfloat16"),
])
def test_attention_keys_are_the_call_time_keys(problem):
    inputs = problem.make_inputs("cpu", 1, requires_grad=False)
    sel = adasplash_tune.select("adasplash", inputs["q"], inputs["k"], inputs["v"], alpha=problem.alpha,
                                is_causal=problem.causal, varlen=inputs["varlen"], backend="torch")
    assert sel.key == problem.key("torch")
    assert all(t.abs().sum() > 0 for t in (inputs["q"], inputs["k"], inputs["v"]))  # random, never zeros
    assert P.problem_from_dict(json.loads(json.dumps(problem.to_dict()))) == problem


@pytest.mark.parametrize("problem", [P.EntmaxProblem(7, 130, 1.5), P.EntmaxProblem(1, 5, 1.9, "bfloat16")])
def test_entmax_keys_are_the_call_time_keys(problem):
    x = problem.make_inputs("cpu", 2, requires_grad=False)["x"]
    assert adasplash_tune.select("entmax", x, alpha=problem.alpha, backend="torch").key == problem.key("torch")


def test_invalid_problems_are_refused():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        P.AttentionProblem(1, 3, 2, 64, 64)
    with pytest.raises(ValueError, match="head_dim"):
        P.AttentionProblem(1, 2, 2, 64, 8)
    with pytest.raises(ValueError, match="alpha"):
        P.EntmaxProblem(4, 4, alpha=1.0)
    with pytest.raises(ValueError, match="unknown problem kernel"):
        P.problem_from_dict({"kernel": "softmax"})


def test_chunked_oracle_equals_the_dense_one(monkeypatch):
    problem = P.AttentionProblem(2, 4, 2, 37, 16, 1.5, True, varlen=True)
    inputs = problem.make_inputs("cpu", 5, requires_grad=True)
    dense, dense_grads = problem.reference(inputs, with_grad=True)
    monkeypatch.setattr(P, "_DENSE_LIMIT", 0)
    chunked, chunked_grads = problem.reference(inputs, with_grad=True)
    assert relative_error(chunked, dense) < 1e-12
    for a, b in zip(chunked_grads, dense_grads):
        assert relative_error(a, b) < 1e-12


def test_sampled_oracle_matches_the_full_one_on_its_slices(monkeypatch):
    """Above the oracle limit the gate checks evenly spaced (batch, kv group) slices: the
    sampled oracle equals the full one there, and oracle_view picks the same slices."""
    problem = P.AttentionProblem(3, 4, 2, 33, 16, 1.5, False)
    inputs = problem.make_inputs("cpu", 7, requires_grad=True)
    full, full_grads = problem.reference(inputs, with_grad=True)
    assert problem.oracle_slices() is None
    monkeypatch.setattr(P, "_ORACLE_LIMIT", 2 * 33 ** 2 * 2)  # two slices of (2 q heads x N x N)
    slices = problem.oracle_slices()
    assert slices == [(0, 0), (1, 1)]
    sampled, sampled_grads = problem.reference(inputs, with_grad=True)
    assert sampled.shape == (2, 2, 33, 16)
    view, view_grads = problem.oracle_view(full, full_grads)
    assert relative_error(view, sampled) < 1e-12
    for a, b in zip(view_grads, sampled_grads):
        assert relative_error(a, b) < 1e-12
    monkeypatch.setattr(P, "_ORACLE_LIMIT", 1)  # never fewer than one slice
    assert problem.oracle_slices() == [(0, 0)]


def test_record_file_gives_problems_most_frequent_first(tmp_path):
    key = P.AttentionProblem(1, 8, 2, 1000, 64, 1.5, True).key("triton")
    shape = {"batch": 1, "heads": 8, "kv_heads": 2, "seq_len": 1000, "head_dim": 64, "alpha": 1.5,
             "causal": True, "varlen": False, "dtype": "float32"}
    other = P.AttentionProblem(1, 2, 2, 64, 32, 2.0, False).key("torch")
    lines = [json.dumps({"kernel": "adasplash", "key": other})]
    lines += [json.dumps({"kernel": "adasplash", "key": key, "shape": shape})] * 2
    lines += [json.dumps({"kernel": "entmax", "key": {"rows": 4}}), "{broken"]
    path = tmp_path / "rec.jsonl"
    path.write_text("\n".join(lines))
    got = P.problems_from_record(path, "adasplash")
    assert [count for _, count in got] == [2, 1]
    assert got[0][0] == P.AttentionProblem(1, 8, 2, 1000, 64, 1.5, True)
    # a key without a shape becomes a representative problem with that key
    assert got[1][0].key("torch") == other


def test_problem_for_entry_prefers_the_tuned_problem():
    problem = P.AttentionProblem(2, 4, 1, 900, 96, 1.5, False, "bfloat16")
    entry = Entry(kernel="adasplash", backend="triton", device={"device_id": "x"}, kernel_hash="h",
                  key=problem.key("triton"), config={}, provenance={"problem": problem.to_dict()})
    assert P.problem_for_entry(entry) == problem
    entry.provenance = {}
    assert P.problem_for_entry(entry).key("triton") == problem.key("triton")
