"""examples/train_lm.py and examples/plot_train_lm.py: a tiny byte-level LM trained on CPU with each
attention (softmax, alpha = 1.5, learned alpha per head) learns, stays finite, and reports what the
documentation says (JSON lines, density, captured q/k/v)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch


from adasplash_tune.kernels.reference import (attention_mask, attention_reference, entmax_reference, relative_error,
                                              tolerance)
from tests.scripts import load_script


def _load(name: str):
    return load_script(f"examples/{name}.py", register=True)


train_lm = _load("train_lm")
plot_train_lm = _load("plot_train_lm")

TINY = ["--device", "cpu", "--layers", "2", "--width", "64", "--heads", "4", "--seq-len", "64",
        "--batch", "8", "--steps", "30", "--max-bytes", "200000", "--eval-every", "10", "--log-every", "5",
        "--eval-windows", "8", "--time-budget", "0", "--seed", "0"]
ATTENTIONS = {
    "sdpa": ["--attention", "sdpa"],
    "alpha1.5": ["--attention", "adasplash", "--alpha", "1.5"],
    "learned": ["--attention", "adasplash", "--alpha", "learned"],
}
RECORD_FIELDS = {"step", "wall_s", "lr", "train_loss", "val_loss", "step_time_s", "tokens_per_s", "tokens_seen",
                 "peak_mem_bytes", "warmup", "alpha", "density", "nonfinite"}


@pytest.fixture(scope="module", autouse=True)
def _defaults_one_thread(one_torch_thread):
    """Built-in launch configs (no user cache), one intra-op thread (tiny tensors, busy machine)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADASPLASH_TUNE_MODE", "off")
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The three tiny runs, trained once for the module; adasplash runs also capture q/k/v."""
    root = tmp_path_factory.mktemp("train_lm")
    folders = {}
    for name, flags in ATTENTIONS.items():
        extra = [] if name == "sdpa" else ["--capture", str(root / f"capture-{name}")]
        assert train_lm.main([*flags, *TINY, "--out", str(root / name), *extra]) == 0
        folders[name] = root / name
    return folders


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_loss_falls_and_stays_finite(runs, name):
    records = _records(runs[name])
    train = [r["train_loss"] for r in records if r["train_loss"] is not None]
    val = [r["val_loss"] for r in records if r["val_loss"] is not None]
    assert all(math.isfinite(x) for x in train + val)
    assert not any(r["nonfinite"] for r in records)
    assert len(train) == 6 and len(val) == 4  # steps 5, 10, ..., 30; validation at 0, 10, 20, 30
    assert sum(train[-2:]) / 2 < sum(train[:2]) / 2 - 0.3
    assert val[-1] < val[0] - 0.5  # from ~ln(256) = 5.55 at step 0
    summary = json.loads((runs[name] / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["stop_reason"] == "steps" and summary["steps_done"] == 30
    assert summary["final_val_loss"] == val[-1]


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_records_have_documented_fields(runs, name):
    records = _records(runs[name])
    assert [r["step"] for r in records] == [0, 5, 10, 15, 20, 25, 30]
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert r["peak_mem_bytes"] is None  # CPU: no CUDA peak
        assert r["tokens_seen"] == r["step"] * 8 * 64
    for r in records[1:]:
        assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_time_s"])
    assert [r["warmup"] for r in records] == [True, True] + [False] * 5
    learned = name == "learned"
    for r in records:
        assert (r["alpha"] is not None) == learned
        if learned:
            assert len(r["alpha"]) == 2 and all(len(layer) == 4 for layer in r["alpha"])
    if learned:  # alpha gets a gradient: it moves, differently per head, inside (1, 2)
        final = [a for layer in records[-1]["alpha"] for a in layer]
        assert all(1.0 < a < 2.0 for a in final)
        assert max(abs(a - 1.5) for a in final) > 1e-4 and len(set(final)) > 1


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_density_checkpoints_in_unit_interval(runs, name):
    records = _records(runs[name])
    points = [r for r in records if r["density"] is not None]
    assert [r["step"] for r in points] == [10, 20, 30]  # first evaluation, mid-training, end
    for r in points:
        assert [d["layer"] for d in r["density"]] == [0, 1]
        for d in r["density"]:
            for tile in (16, 64):
                assert 0.0 < d[f"tile{tile}"] <= 1.0
                assert len(d[f"heads{tile}"]) == 4 and all(0.0 < x <= 1.0 for x in d[f"heads{tile}"])
                if name == "sdpa":
                    assert d[f"tile{tile}"] == 1.0  # softmax: dense by definition


@pytest.mark.parametrize("name", ["alpha1.5", "learned"])
def test_capture_loads_without_pickle(runs, name):
    from safetensors.torch import load_file

    folder = runs[name].parent / f"capture-{name}"
    manifest = json.loads((folder / "manifest.json").read_text())
    summary = json.loads((runs[name] / "summary.json").read_text())
    assert manifest["model_step"] == 30 and manifest["seq_len"] == 64 and manifest["is_causal"] is True
    assert manifest["val_loss"] == summary["final_val_loss"] and manifest["heads_kept"] == 4
    assert summary["capture_manifest"] == str(folder / "manifest.json")
    assert [entry["layer"] for entry in manifest["layers"]] == [0, 1]
    for entry in manifest["layers"]:
        tensors = load_file(str(folder / entry["file"]))
        assert sorted(tensors) == ["k", "q", "v"]
        for t in tensors.values():
            assert t.shape == (1, 4, 64, 16) and t.dtype == torch.float32 and torch.isfinite(t).all()
        assert entry["shape"] == [1, 4, 64, 16] and entry["dtype"] == "float32"
        expected = summary["alpha_final"][entry["layer"]] if name == "learned" else [1.5] * 4
        assert entry["alpha"] == pytest.approx(expected)


def test_a_capture_is_an_input_the_tuner_can_time_on(runs):
    from safetensors.torch import load_file

    from adasplash_tune.tuner.problems import AttentionProblem

    path = runs["alpha1.5"].parent / "capture-alpha1.5" / "layer01.safetensors"
    problem = AttentionProblem(batch=2, heads=4, kv_heads=4, seq_len=64, head_dim=16, causal=True,
                               inputs=f"recorded:{path}")
    made = problem.make_inputs("cpu", 0, requires_grad=False)
    captured = load_file(str(path))
    assert all(torch.equal(made[name][1], captured[name][0]) for name in "qkv")


def test_capture_size_cap_keeps_fewer_heads(tmp_path):
    model = train_lm.ByteLM(2, 64, 4, 32, lambda: train_lm.EntmaxCore(4, 1.5, False, True))
    train_lm.init_weights(model, 0)
    tokens = torch.randint(0, 256, (1, 32))
    per_head_mb = 3 * 32 * 16 * 4 / 2**20  # q, k, v of one head, float32
    manifest = train_lm.capture(model, tokens, torch.device("cpu"), tmp_path, 2 * 2.5 * per_head_mb,
                                {"model_step": 0})
    assert manifest["heads_kept"] == 2 and manifest["layers"][0]["shape"] == [1, 2, 32, 16]
    with pytest.raises(SystemExit, match="below one head per layer"):
        train_lm.capture(model, tokens, torch.device("cpu"), tmp_path, per_head_mb, {"model_step": 0})


def test_plot_helper_compares_runs(runs, tmp_path, capsys):
    out_json, out_png = tmp_path / "compare.json", tmp_path / "curves.png"
    folders = [str(runs[name]) for name in ATTENTIONS]
    assert plot_train_lm.main([*folders, "--json", str(out_json), "--png", str(out_png)]) == 0
    report = json.loads(out_json.read_text())
    assert report["baseline"] == "softmax (sdpa), N=64" and report["common_step"] == 30
    assert report["mismatches"] == {}
    by_name = {r["name"]: r for r in report["runs"]}
    assert by_name["softmax (sdpa), N=64"]["gap_vs_baseline"] == 0.0
    entmax = by_name["entmax, alpha=1.5, N=64"]
    sdpa_val = _records(runs["sdpa"])[-1]["val_loss"]
    assert entmax["gap_vs_baseline"] == pytest.approx(entmax["val_loss_at_common_step"] / sdpa_val - 1.0)
    assert entmax["density_final"]["step"] == 30
    printed = capsys.readouterr()
    assert "validation losses compared at step 30" in printed.out and "WARNING" not in printed.out
    assert [c["points"][-1]["val_loss"] for c in report["curves"]] == [r["final_val_loss"] for r in report["runs"]]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not out_png.exists() and "matplotlib is not installed" in printed.err
    else:
        assert out_png.stat().st_size > 0


def test_plot_helper_names_a_bad_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "attention": "sdpa"}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    assert plot_train_lm.main([str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics.jsonl'}:2: not JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------- pieces


def _model(attention: str, seq_len: int = 32, **kw):
    args = train_lm.parse_args(["--attention", attention, *kw.get("extra", []), "--layers", "2", "--width", "64",
                                "--heads", "4", "--seq-len", str(seq_len), "--out", "unused"])
    return train_lm.build_model(args)


def test_same_seed_same_initial_weights_for_every_attention():
    models = [_model("sdpa"), _model("adasplash"), _model("adasplash", extra=["--alpha", "learned"])]
    states = [{k: v for k, v in m.state_dict().items() if "alpha" not in k} for m in models]
    assert list(states[0]) == list(states[1]) == list(states[2])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]) and torch.equal(states[0][key], states[2][key])
    learned = [k for k in models[2].state_dict() if "alpha" in k]
    assert len(learned) == 2 * 4  # one alpha per head per layer


def test_learned_alpha_per_layer_is_one_parameter_per_layer():
    model = _model("adasplash", extra=["--alpha", "learned", "--alpha-per", "layer", "--alpha-init", "1.3"])
    assert len([k for k in model.state_dict() if "alpha" in k]) == 2
    assert model.alphas() == [pytest.approx([1.3] * 4)] * 2


def test_score_scale_multiplies_the_attention_scale_and_the_scores():
    model = _model("adasplash", extra=["--score-scale", "2"])
    modules = [m for block in model.blocks for m in block.core.attn]
    assert [m.scale for m in modules] == [pytest.approx(2 / 4.0)] * 2  # head dim 16
    assert [m.scale for m in _model("adasplash").blocks[0].core.attn] == [None]  # the kernel's 1/sqrt(d)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=gen) for _ in range(3))
    got = modules[0](q, k, v)
    want = attention_reference(q.double() * 2, k.double(), v.double(), 1.5, True, None)
    assert relative_error(got, want) <= tolerance(torch.float32)


def test_same_seed_same_data_order():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    first = train_lm.training_batches(data, 16, 4, seed=3)
    second = train_lm.training_batches(data, 16, 4, seed=3)
    for _ in range(3):
        (x1, y1), (x2, y2) = next(first), next(second)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one byte
    other = next(train_lm.training_batches(data, 16, 4, seed=4))[0]
    assert not torch.equal(other, next(train_lm.training_batches(data, 16, 4, seed=3))[0])


@pytest.mark.parametrize("attention", ["sdpa", "adasplash"])
def test_attention_is_causal(attention):
    model = _model(attention)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-3)


def test_active_tiles_one_hot_attention():
    eye = 8.0 * torch.eye(64)  # q = k: each query's only large score is its own key
    assert train_lm.active_tiles(eye, eye, 1.5, 16) == (4, 10)  # the 4 diagonal tiles of 4 x 4
    assert train_lm.active_tiles(eye, eye, 1.5, 64) == (1, 1)


@pytest.mark.parametrize("alpha", [1.5, 1.3])
def test_active_tiles_match_the_oracle(monkeypatch, alpha):
    monkeypatch.setattr(train_lm, "DENSITY_SCORE_BYTES", 4 * 100 * 16)  # row chunks of 16: chunking is tested
    gen = torch.Generator().manual_seed(1)
    n, dim = 100, 16  # n not a multiple of the tile
    q, k = 3.0 * torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
    valid = attention_mask(n, n, 1, is_causal=True, varlen=None)[0, 0]
    p = entmax_reference(q @ k.t() / math.sqrt(dim), alpha, valid=valid)
    for tile in (16, 64):
        side = -(-n // tile)
        padded = torch.nn.functional.pad(p > 0, (0, side * tile - n, 0, side * tile - n))
        expected = int(padded.view(side, tile, side, tile).any(3).any(1).sum())
        assert train_lm.active_tiles(q, k, alpha, tile) == (expected, side * (side + 1) // 2)
        assert expected < side * (side + 1) // 2 or tile == 64  # sparse enough to mean something


def test_corpus_from_a_folder_skips_binary_and_holds_out_the_tail(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "b.txt").write_text("more text\n" * 50)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / ".hidden").write_text("secret\n" * 100)
    corpus = train_lm.read_corpus(str(tmp_path), 10**6, 0.25, 32)
    total = len("hello world\n" * 50) + len("more text\n" * 50) + 2
    assert corpus.files == 2 and corpus.train.numel() + corpus.val.numel() == total
    assert corpus.val.numel() == int(total * 0.25)
    text = bytes(torch.cat([corpus.train, corpus.val]).tolist())
    assert b"\0" not in text and b"secret" not in text
    again = train_lm.read_corpus(str(tmp_path), 10**6, 0.25, 32)
    assert again.sha256 == corpus.sha256 and torch.equal(again.val, corpus.val)
    budget = train_lm.read_corpus(str(tmp_path), 400, 0.25, 32)
    assert budget.train.numel() + budget.val.numel() == 400


def test_stdlib_corpus_is_deterministic():
    a = train_lm.read_corpus(None, 50_000, 0.1, 64)
    b = train_lm.read_corpus(None, 50_000, 0.1, 64)
    assert a.sha256 == b.sha256 and a.train.numel() + a.val.numel() == 50_000 and a.files >= 1


def test_clear_errors(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    assert train_lm.main(["--attention", "sdpa", "--data", str(small), "--out", str(tmp_path / "o")]) == 1
    assert "needs at least --seq-len + 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--attention", "sdpa", "--alpha", "1.5", "--out", "x"])
    assert "--alpha applies to --attention adasplash" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--attention", "adasplash", "--alpha", "2.5", "--out", "x"])
    assert "must be in (1, 2]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--attention", "adasplash", "--width", "96", "--heads", "8", "--out", "x"])
    assert "head dim 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--attention", "sdpa", "--score-scale", "2", "--out", "x"])
    assert "--score-scale applies to --attention adasplash" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_lm.parse_args(["--attention", "adasplash", "--score-scale", "-1", "--out", "x"])
    assert "must be a positive number" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(runs):
    with pytest.raises(SystemExit, match="exists; choose another --out or pass --overwrite"):
        train_lm.run(train_lm.parse_args([*ATTENTIONS["sdpa"], *TINY, "--out", str(runs["sdpa"])]))


def test_nonfinite_loss_stops_loudly(tmp_path, monkeypatch, capsys):
    schedule = train_lm.learning_rate  # a NaN learning rate from the second step on: NaN weights at step 2

    monkeypatch.setattr(train_lm, "learning_rate",
                        lambda step, steps, peak: schedule(step, steps, peak) if step < 1 else math.nan)
    out = tmp_path / "nan"
    assert train_lm.main([*ATTENTIONS["alpha1.5"], *TINY, "--out", str(out)]) == 1
    assert "non-finite loss or gradient between steps 0 and 5" in capsys.readouterr().err
    records = _records(out)
    assert records[-1]["step"] == 5 and records[-1]["nonfinite"] is True
    assert json.loads((out / "summary.json").read_text())["status"] == "nonfinite"


@pytest.mark.parametrize("alpha", ["1.5", "learned"])
def test_triton_backend_trains_like_the_torch_backend(tmp_path, triton_device, alpha):
    """The Triton kernels (the interpreter on CPU) in the loop: same losses as the PyTorch backend."""
    flags = ["--attention", "adasplash", "--alpha", alpha, "--device", triton_device, "--layers", "1",
             "--width", "32", "--heads", "2", "--seq-len", "32", "--batch", "2", "--steps", "3",
             "--max-bytes", "100000", "--eval-windows", "2", "--time-budget", "0"]
    for backend in ("triton", "torch"):
        assert train_lm.main([*flags, "--backend", backend, "--out", str(tmp_path / backend)]) == 0
    triton, torch_ = (_records(tmp_path / backend)[-1] for backend in ("triton", "torch"))
    tol = 1e-4 if triton_device == "cpu" else 2e-2  # float32 on CPU; bf16 autocast on a GPU
    assert triton["val_loss"] == pytest.approx(torch_["val_loss"], rel=tol)
    assert triton["train_loss"] == pytest.approx(torch_["train_loss"], rel=tol)


@pytest.mark.gpu
def test_cuda_run_reports_memory_and_bf16_capture(tmp_path):
    from safetensors.torch import load_file

    out, cap = tmp_path / "run", tmp_path / "cap"
    flags = ["--attention", "adasplash", "--alpha", "learned", "--device", "cuda", "--layers", "2", "--width", "128",
             "--heads", "2", "--seq-len", "512", "--batch", "4", "--steps", "40", "--eval-every", "20",
             "--log-every", "10", "--time-budget", "0", "--max-bytes", "2000000"]
    assert train_lm.main([*flags, "--out", str(out), "--capture", str(cap)]) == 0
    records = _records(out)
    assert all(r["peak_mem_bytes"] > 0 for r in records)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16 autocast" and summary["peak_mem_bytes"] > 0
    tensors = load_file(str(cap / "layer00.safetensors"))
    assert tensors["q"].dtype == torch.bfloat16 and tensors["q"].shape == (1, 2, 512, 64)


def test_plot_helper_warns_when_runs_differ(runs, tmp_path, capsys):
    other = tmp_path / "other-seed"
    shutil.copytree(runs["sdpa"], other)
    config = json.loads((other / "config.json").read_text())
    config["args"]["seed"] = 1
    (other / "config.json").write_text(json.dumps(config))
    assert plot_train_lm.main([str(runs["alpha1.5"]), str(other)]) == 0
    assert "WARNING: the runs differ in more than the attention: seed [0, 1]" in capsys.readouterr().out
