"""Input families the tuner times and gates on (``AttentionProblem.inputs``) and ``tune --inputs``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import adasplash_tune
from adasplash_tune.cache import locations, samples
from adasplash_tune.cache.store import open_store
from adasplash_tune.cli import main
from adasplash_tune.kernels.reference import attention_reference, entmax_reference
from adasplash_tune.tuner.inputs import inputs_label, parse_inputs, split_inputs, synthetic_inputs
from adasplash_tune.tuner.problems import AttentionProblem, problem_from_dict


@pytest.mark.parametrize("spec, want", [("randn", ("randn", 1.0)), ("randn:8", ("randn", 8.0)),
                                        ("local:2.5", ("local", 2.5)), ("recorded:/x/s.safetensors",
                                                                        ("recorded", "/x/s.safetensors"))])
def test_specs_parse(spec, want):
    assert parse_inputs(spec) == want


@pytest.mark.parametrize("spec, message", [("", "non-empty"), ("gauss", "unknown input family"),
                                           ("local", "needs its logit scale"), ("randn:x", "must be a number"),
                                           ("randn:-1", "positive"), ("local:inf", "positive"),
                                           ("recorded", "needs the sample file")])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_inputs(spec)
    with pytest.raises(ValueError, match=message):
        AttentionProblem(batch=1, heads=1, kv_heads=1, seq_len=8, head_dim=16, inputs=spec)


def test_label_names_a_sample_by_its_file():
    assert inputs_label("recorded:/a/b/adasplash-12.safetensors") == "recorded:adasplash-12.safetensors"
    assert inputs_label("local:2") == "local:2"


def test_randn_problems_draw_exactly_as_before():
    """The default spec keeps every seed's inputs (resumed studies time the same tensors)."""
    problem = AttentionProblem(batch=2, heads=2, kv_heads=1, seq_len=20, head_dim=16, varlen=True)
    made = problem.make_inputs("cpu", 4, requires_grad=False)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(s, generator=gen) for s in ((2, 2, 20, 16), (2, 1, 20, 16), (2, 1, 20, 16)))
    lengths = torch.randint(10, 21, (2,), generator=gen)
    assert torch.equal(made["q"], q) and torch.equal(made["k"], k) and torch.equal(made["v"], v)
    assert torch.equal(made["varlen"], lengths)
    assert problem_from_dict(problem.to_dict()) == problem
    assert problem_from_dict({k: v for k, v in problem.to_dict().items() if k != "inputs"}) == problem


def test_a_larger_scale_makes_attention_sparser():
    def support(spec: str) -> float:
        problem = AttentionProblem(batch=1, heads=2, kv_heads=1, seq_len=128, head_dim=32, causal=True,
                                   inputs=spec)
        made = problem.make_inputs("cpu", 0, requires_grad=False)
        scores = made["q"].double() @ made["k"].double().transpose(-1, -2) / 32 ** 0.5
        mask = torch.ones(128, 128, dtype=torch.bool).tril()
        p = entmax_reference((0.5 * scores).masked_fill(~mask, float("-inf")), 1.5)
        return float((p > 0).sum() / mask.sum() / 2)

    assert support("randn:16") < support("randn")
    assert support("local:8") < support("local:1")


def test_local_family_has_a_sink_and_a_diagonal_band_per_kv_head():
    gen = torch.Generator().manual_seed(0)
    q, k = synthetic_inputs("local", 4.0, (1, 4, 256, 32), 2, gen, "cpu")
    assert q.shape == (1, 4, 256, 32) and k.shape == (1, 2, 256, 32)
    scores = q[0, 2] @ k[0, 1].T  # query head 2 belongs to kv head 1
    diag = scores.diagonal()
    assert torch.allclose(scores[:, 0], torch.full((256,), 4.0 * 32 ** 0.5))  # the sink column
    assert torch.allclose(diag[1:], torch.full((255,), 4.0 * 32 ** 0.5), rtol=1e-4)  # q_i . k_i = s sqrt(D)
    far = scores[128:, 1:64]
    assert far.abs().mean() < 0.5 * diag.mean()


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def cli_env(isolated_locations, tmp_path, monkeypatch):
    monkeypatch.setenv(locations.ENV_CACHE, str(tmp_path / "cache.sqlite"))
    samples.clear_memo()
    return ["--storage", f"sqlite:///{tmp_path / 'studies.sqlite'}"]


def test_tune_on_a_family_records_it_in_the_entry(tmp_path, cli_env):
    result = _run("tune", "--backend", "torch", "--seq-len", "48", "--head-dim", "16", "--heads", "2", "--batch",
                  "1", "--causal", "--trials", "2", "--seed", "1", "--inputs", "local:4", "--json", *cli_env)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["problem"]["inputs"] == "local:4" and row["status"] == "tuned"
    with open_store(str(tmp_path / "cache.sqlite"), readonly=True) as store:
        [entry] = store.entries(kernel="adasplash")
    assert entry.provenance["inputs"] == "local:4" and entry.provenance["problem"]["inputs"] == "local:4"


def test_tune_from_record_runs_on_the_recorded_samples(tmp_path, cli_env, monkeypatch):
    record, folder = tmp_path / "record.jsonl", tmp_path / "samples"
    monkeypatch.setenv("ADASPLASH_TUNE_RECORD", str(record))
    monkeypatch.setenv(samples.ENV_SAMPLES, str(folder))
    gen = torch.Generator().manual_seed(0)
    q = 6 * torch.randn(1, 2, 40, 16, generator=gen)  # sharp scores: a sparse sample
    k, v = torch.randn(2, 1, 2, 40, 16, generator=gen)
    adasplash_tune.adasplash(q, k, v, 1.5, True, backend="torch")
    q2, k2, v2 = torch.randn(3, 1, 2, 200, 16, generator=gen)  # a key recorded before samples were on
    monkeypatch.delenv(samples.ENV_SAMPLES)
    adasplash_tune.adasplash(q2, k2, v2, 1.5, True, backend="torch")
    monkeypatch.delenv("ADASPLASH_TUNE_RECORD")
    [sample] = folder.iterdir()

    result = _run("tune", "--backend", "torch", "--from-record", str(record), "--inputs", "recorded", "--trials",
                  "2", "--seed", "2", "--json", *cli_env)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)  # the key without a sample is skipped
    assert row["problem"]["inputs"] == f"recorded:{sample.resolve()}" and row["problem"]["seq_len"] == 40
    with open_store(str(tmp_path / "cache.sqlite"), readonly=True) as store:
        [entry] = store.entries(kernel="adasplash")
    assert entry.provenance["inputs"] == f"recorded:{sample.name}"
    # the stored config is accurate on the recorded inputs themselves
    out = adasplash_tune.adasplash(q, k, v, 1.5, True, backend="torch", config=entry.config)
    torch.testing.assert_close(out.double(), attention_reference(q.double(), k.double(), v.double(), 1.5, True),
                               rtol=0, atol=1e-3)

    verified = _run("verify", "--json")  # re-checked on the same recorded inputs
    assert verified.exit_code == 0, verified.output
    [checked] = json.loads(verified.stdout)
    assert checked["inputs"] == f"recorded:{sample.name}" and checked["status"] == "ok"

    default = _run("tune", "--backend", "torch", "--from-record", str(record), "--trials", "1", "--seed", "2",
                   "--confirm", "0", "--json", *cli_env, "--cache", str(tmp_path / "other.sqlite"))
    assert default.exit_code == 0, default.output
    assert sorted(r["problem"]["inputs"].split(":")[0] for r in json.loads(default.stdout)) == ["randn", "recorded"]


@pytest.mark.parametrize("args, message", [
    (["--inputs", "recorded"], "--inputs recorded needs --from-record"),
    (["--inputs", "gauss"], "unknown input family"),
    (["--kernel", "entmax", "--inputs", "local:2"], "--inputs applies to --kernel adasplash"),
    (["--inputs", "randn+recorded:/x.safetensors"], "a mix takes synthetic families only"),
    (["--inputs", "randn+randn"], "appears twice"),
    (["--inputs", "randn+gauss:2"], "unknown input family"),
])
def test_tune_inputs_usage_errors(args, message, cli_env):
    result = _run("tune", "--backend", "torch", *args, *cli_env)
    assert result.exit_code == 2 and message in result.output


def test_tune_inputs_recorded_without_samples_fails_clearly(tmp_path, cli_env):
    record = tmp_path / "record.jsonl"
    key = {"backend": "torch", "dtype": "float32", "head_dim": 16, "causal": False, "alpha": "1.5", "gqa": 1,
           "varlen": False, "seq": 64, "bh": 1}
    record.write_text(json.dumps({"kernel": "adasplash", "key": key}) + "\n")
    result = _run("tune", "--backend", "torch", "--from-record", str(record), "--inputs", "recorded", *cli_env)
    assert result.exit_code == 1 and "holds no input samples" in result.output


def test_a_mix_splits_into_its_families_and_keeps_its_name():
    assert split_inputs("randn+randn:16+local:2") == ["randn", "randn:16", "local:2"]
    assert split_inputs("local:2") == ["local:2"]
    assert split_inputs("recorded:/a+b/s.safetensors") == ["recorded:/a+b/s.safetensors"]  # a path, not a mix
    assert inputs_label("randn+local:2") == "randn+local:2"
    problem = AttentionProblem(1, 2, 1, 40, 16, 1.5, True, inputs="randn+local:2")
    assert [p.inputs for p in problem.parts()] == ["randn", "local:2"]
    assert all(p.seq_len == 40 and p.kv_heads == 1 for p in problem.parts())
    assert AttentionProblem(1, 2, 2, 40, 16).parts() == [AttentionProblem(1, 2, 2, 40, 16)]
    assert problem_from_dict(problem.to_dict()) == problem
    with pytest.raises(ValueError, match="is a mix"):
        problem.make_inputs("cpu", 0, False)


def test_a_trial_on_a_mix_is_gated_on_every_family_and_timed_as_their_geometric_mean():
    from adasplash_tune.tuner.evaluate import Evaluator, TrialRequest
    from adasplash_tune.tuner.timing import TimingOptions

    quick = TimingOptions(warmup_ms=1.0, rep_ms=5.0, min_reps=3, max_reps=10)
    mix = AttentionProblem(1, 2, 2, 48, 16, 1.5, True, "float32", inputs="randn+local:4")
    with Evaluator("cpu", in_process=True) as ev:
        both = ev.evaluate(TrialRequest(mix, "torch", {}, backward=True, timing=quick))
        parts = [ev.evaluate(TrialRequest(p, "torch", {}, backward=True, timing=quick)) for p in mix.parts()]
        strict = ev.evaluate(TrialRequest(mix, "torch", {}, backward=True, timing=quick, gate=1e-12))
    assert both.ok and all(p.ok for p in parts)
    # the errors are the worst family's (each family's inputs are drawn as on its own)
    assert both.error == max(p.error for p in parts)
    assert both.grad_error == max(p.grad_error for p in parts)
    assert both.fwd_ms > 0 and both.bwd_ms > 0 and both.reps >= 2 * quick.min_reps
    assert strict.status == "accuracy" and "on randn" in strict.detail


def test_tune_on_a_mix_records_it(tmp_path, cli_env):
    result = _run("tune", "--backend", "torch", "--seq-len", "48", "--head-dim", "16", "--heads", "2", "--batch",
                  "1", "--trials", "2", "--seed", "1", "--inputs", "randn+local:4", "--json", *cli_env)
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["problem"]["inputs"] == "randn+local:4" and row["status"] == "tuned"
    with open_store(str(tmp_path / "cache.sqlite"), readonly=True) as store:
        [entry] = store.entries(kernel="adasplash")
    assert entry.provenance["inputs"] == "randn+local:4"


def test_skip_tuned_resumes_from_the_cache_alone(tmp_path, cli_env):
    shape = ["--backend", "torch", "--seq-len", "48,200", "--head-dim", "16", "--heads", "2", "--batch", "1",
             "--trials", "2", "--seed", "1", "--json"]
    unconfirmed = _run("tune", *shape[:-1], "--seq-len", "48", "--confirm", "0", "--json", *cli_env)
    assert unconfirmed.exit_code == 0, unconfirmed.output
    # a new study storage: only the cache says what is done; N = 48's entry has no duel yet
    fresh = ["--storage", f"sqlite:///{tmp_path / 'other-studies.sqlite'}"]
    first = _run("tune", *shape, "--skip-tuned", *fresh)
    assert first.exit_code == 0, first.output
    assert sorted(r["problem"]["seq_len"] for r in json.loads(first.stdout)) == [48, 200]
    again = _run("tune", *shape, "--skip-tuned", *fresh)
    assert again.exit_code == 0 and "every problem already has a finished entry" in again.output
    other = _run("tune", *shape, "--skip-tuned", "--inputs", "local:2", *fresh)  # other inputs: not done
    assert other.exit_code == 0, other.output
    assert len(json.loads(other.stdout[other.stdout.index("["):])) == 2
