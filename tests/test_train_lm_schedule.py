"""examples/train_lm.py's alpha warm-up (--alpha-start A0 --alpha-warmup STEPS): a tiny CPU run trains with
the scheduled alpha at every step, validates with the alpha in force, records it, ends at --alpha; bad
combinations of the options are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from adasplash_tune.kernels.reference import attention_reference, relative_error, tolerance
from tests.test_train_lm import TINY, train_lm  # the example module, loaded once, and its tiny run

SCHEDULE = ["--attention", "adasplash", "--alpha", "1.5", "--alpha-start", "1.25", "--alpha-warmup", "20"]


def expected_alpha(step: int) -> float:
    """The documented rule, written out independently of the script."""
    return 1.5 if step >= 20 else round(1.25 + 0.25 * step / 20, 2)


@pytest.fixture(scope="module", autouse=True)
def _defaults_one_thread(one_torch_thread):
    """Built-in launch configs (no user cache), one intra-op thread (tiny tensors, busy machine)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADASPLASH_TUNE_MODE", "off")
        yield


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory) -> tuple[Path, list[tuple[bool, float]]]:
    """One tiny scheduled run; every model call's (grad enabled = a training step, alpha of layer 0)."""
    out = tmp_path_factory.mktemp("train_lm_schedule") / "run"
    calls: list[tuple[bool, float]] = []
    build = train_lm.build_model

    def spied(args):
        model = build(args)
        model.register_forward_pre_hook(lambda m, _a: calls.append((torch.is_grad_enabled(), m.alphas()[0][0])))
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lm, "build_model", spied)
        assert train_lm.main([*SCHEDULE, *TINY, "--out", str(out)]) == 0
    return out, calls


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_scheduled_run_learns_and_stays_finite(scheduled):
    records = _records(scheduled[0])
    train = [r["train_loss"] for r in records if r["train_loss"] is not None]
    val = [r["val_loss"] for r in records if r["val_loss"] is not None]
    assert all(math.isfinite(x) for x in train + val) and not any(r["nonfinite"] for r in records)
    assert len(train) == 6 and len(val) == 4
    assert sum(train[-2:]) / 2 < sum(train[:2]) / 2 - 0.3
    assert val[-1] < val[0] - 0.5


def test_recorded_alpha_follows_the_schedule(scheduled):
    records = _records(scheduled[0])
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20, 25, 30]
    for r in records:  # layers x heads, one value in force
        assert len(r["alpha"]) == 2 and all(layer == [r["alpha"][0][0]] * 4 for layer in r["alpha"])
    values = [r["alpha"][0][0] for r in records]
    assert values == [expected_alpha(r["step"]) for r in records]
    assert values[0] == 1.25 and values[-1] == 1.5 and values == sorted(values)
    assert values[1:4] == [1.31, 1.38, 1.44]


def test_every_step_and_validation_use_the_alpha_in_force(scheduled):
    calls = scheduled[1]
    training = [alpha for grad, alpha in calls if grad]
    assert training == [expected_alpha(t) for t in range(30)]  # step t (0-based) trains at alpha(t)
    no_grad = [alpha for grad, alpha in calls if not grad]  # validation at 0, 10, 20, 30 (+ density)
    assert no_grad[0] == 1.25 and no_grad[-1] == 1.5 and set(no_grad) == {1.25, 1.38, 1.5}


def test_config_and_summary_record_the_schedule(scheduled):
    out = scheduled[0]
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for doc in (config, summary):
        sched = doc["alpha_schedule"]
        assert (sched["start"], sched["target"], sched["warmup_steps"], sched["rounding"]) == (1.25, 1.5, 20, 0.01)
        assert doc["name"] == "entmax, alpha=1.25->1.5 over 20 steps, N=64"
    assert summary["alpha_final"] == [[1.5] * 4] * 2
    assert summary["final_val_loss"] == _records(out)[-1]["val_loss"]
    assert "alpha schedule: 1.25 -> 1.5 over 20 steps" in train_lm.summary_table(summary)


def test_unscheduled_runs_record_no_schedule(tmp_path):
    args = train_lm.parse_args(["--attention", "adasplash", "--alpha", "1.5", "--out", str(tmp_path)])
    assert args.alpha_start is None and train_lm.alpha_schedule(args) is None


def test_scheduled_alpha_rounds_and_stays_between_the_ends():
    values = [train_lm.scheduled_alpha(t, 1.1, 1.5, 2500) for t in range(3000)]
    assert values[0] == 1.1 and values[2499] == 1.5 and values[2500:] == [1.5] * 500
    assert len(set(values)) == 41 and values == sorted(values)
    assert all(v == round(v, 2) for v in values)
    odd = [train_lm.scheduled_alpha(t, 1.001, 1.5, 100) for t in range(101)]  # 1.001 rounds to 1.0: kept above
    assert odd[0] == 1.001 and min(odd) == 1.001 and odd[-1] == 1.5
    assert train_lm.scheduled_alpha(3, 1.5, 1.2, 10) == 1.41  # towards a denser alpha works the same way
    assert train_lm.scheduled_alpha(0, 1.3, 1.3, 5) == 1.3


def test_set_alpha_changes_what_the_attention_computes():
    model = train_lm.ByteLM(1, 64, 4, 32, lambda: train_lm.EntmaxCore(4, 1.5, False, True))
    model.set_alpha(1.2)
    assert model.alphas() == [[1.2] * 4]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 20, 16, generator=gen) for _ in range(3))
    got = model.blocks[0].core(q, k, v)
    want = attention_reference(q.double(), k.double(), v.double(), 1.2, True, None)
    assert relative_error(got, want) <= tolerance(torch.float32)
    learned = train_lm.EntmaxCore(4, 1.5, True, True)
    with pytest.raises(ValueError, match="cannot be scheduled"):
        learned.set_alpha(1.2)


@pytest.mark.parametrize("flags, message", [
    (["--attention", "sdpa", "--alpha-start", "1.2", "--alpha-warmup", "10"],
     "--alpha-start applies to --attention adasplash"),
    (["--attention", "adasplash", "--alpha", "learned", "--alpha-start", "1.2", "--alpha-warmup", "10"],
     "--alpha-start needs a fixed numeric --alpha"),
    (["--attention", "adasplash", "--alpha-start", "1.0", "--alpha-warmup", "10"],
     "--alpha-start 1.0: must be in (1, 2]"),
    (["--attention", "adasplash", "--alpha-start", "2.5", "--alpha-warmup", "10"],
     "--alpha-start 2.5: must be in (1, 2]"),
    (["--attention", "adasplash", "--alpha-start", "nan", "--alpha-warmup", "10"], "--alpha-start nan: must be in"),
    (["--attention", "adasplash", "--alpha-start", "1.2", "--alpha-warmup", "-1"], "--alpha-warmup -1: must be >= 0"),
    (["--attention", "adasplash", "--alpha-start", "1.2"], "--alpha-start needs --alpha-warmup STEPS >= 1"),
    (["--attention", "adasplash", "--alpha-warmup", "10"], "--alpha-warmup needs --alpha-start"),
])
def test_schedule_option_errors(capsys, flags, message):
    with pytest.raises(SystemExit):
        train_lm.parse_args([*flags, "--out", "x"])
    assert message in capsys.readouterr().err
