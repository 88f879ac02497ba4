#!/usr/bin/env python3
"""Train a small byte-level language model with softmax (SDPA) or alpha-entmax (AdaSplash) attention.

A decoder-only transformer (pre-norm blocks, learned positions, tied byte embeddings, causal
self-attention) trained from scratch on text every machine has: the Python standard library's
own ``.py`` sources (or any text file or folder given with ``--data``). Only the public API of
adasplash-tune is used: ``adasplash_tune.nn.AdaSplashAttention`` (a fixed alpha, or
``learn_alpha=True``) and ``adasplash_tune.entmax`` (for the block-density measurement).

It writes to ``--out``: ``config.json`` (the run's settings, corpus and model), ``metrics.jsonl``
(one JSON object per log point: step, wall time, train and validation loss, step time, tokens/s,
peak memory, alpha per head (learned or scheduled) and, at three checkpoints, the block density
of each layer's attention at 16x16 and 64x64 tiles) and ``summary.json``; ``--capture DIR`` also saves the q/k/v
of one validation sequence per layer (safetensors + ``manifest.json``) at the end. A summary
table is printed at the end. ``examples/plot_train_lm.py`` compares runs and draws the curves.

The three comparison runs (N = 2048, same seed, same initial weights, same data order; each
stops after --steps 5000 or the 120 s --time-budget, whichever comes first), their comparison,
then the N = 8192 probes (step time and peak memory only; the same 16k tokens per step):

    python examples/train_lm.py --attention sdpa --out $OUT/sdpa
    python examples/train_lm.py --attention adasplash --alpha 1.5 --out $OUT/alpha1.5 \\
        --capture $OUT/capture-alpha1.5
    python examples/train_lm.py --attention adasplash --alpha learned --out $OUT/alpha-learned \\
        --capture $OUT/capture-alpha-learned
    python examples/plot_train_lm.py $OUT/sdpa $OUT/alpha1.5 $OUT/alpha-learned \\
        --png $OUT/h200-train-lm.png --json $OUT/h200-train-lm.json

    N8K="--seq-len 8192 --batch 2 --steps 12 --time-budget 240"
    python examples/train_lm.py --attention sdpa $N8K --out $OUT/n8192-sdpa
    python examples/train_lm.py --attention adasplash --alpha 1.5 $N8K --out $OUT/n8192-alpha1.5
    python examples/train_lm.py --attention adasplash --alpha learned $N8K --out $OUT/n8192-alpha-learned

A fixed alpha can be reached through a warm-up from a denser one: ``--alpha-start A0 --alpha-warmup
STEPS`` moves alpha linearly from A0 to ``--alpha`` over STEPS steps (rounded to 0.01), then keeps it;
validation uses the alpha in force at its step. E.g.

    python examples/train_lm.py --attention adasplash --alpha 1.5 --alpha-start 1.25 --alpha-warmup 2500 \
        --time-budget 0 --out $OUT/alpha1.5-from1.25

A learned alpha per head runs one attention call per head (``adasplash`` takes one alpha per call),
so that run may reach fewer steps in the time budget; compare runs at equal steps
(plot_train_lm.py does). On the Triton backend the alpha gradient comes from the dQ kernel.

On CPU (float32; the torch backend of AdaSplash) a tiny run for a first look:

    python examples/train_lm.py --attention adasplash --device cpu --layers 2 --width 64 \\
        --heads 4 --seq-len 128 --batch 8 --steps 200 --eval-every 50 --max-bytes 2000000 --out /tmp/lm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
import sysconfig
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import adasplash_tune
from adasplash_tune.nn import AdaSplashAttention

VOCAB = 256  # bytes
TILES = (16, 64)  # block-density tile sides
WARMUP_RECORD_STEP = 5  # the first record closes after this step: kernel compilation, not steady speed
DENSITY_SCORE_BYTES = 64 << 20  # bound on one chunk of the density measurement's score matrix


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """A byte stream split into a training part and a held-out validation tail (uint8 tensors)."""

    train: Tensor
    val: Tensor
    source: str
    files: int
    sha256: str


class CorpusError(ValueError):
    """The corpus cannot be read or is too small for the run."""


def stdlib_sources() -> tuple[Path, list[Path]]:
    """The standard library's folder and its ``.py`` files (installed packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    return root, files


def folder_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, hidden files and folders excluded."""
    return [p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def in_fixed_order(root: Path, files: Sequence[Path]) -> list[Path]:
    """Files in a fixed pseudo-random order (sha1 of the relative path): the same on every run and
    machine, and a byte budget or the validation tail samples the whole tree, not its first folders."""
    def key(p: Path) -> tuple[str, str]:
        rel = p.relative_to(root).as_posix()
        return hashlib.sha1(rel.encode()).hexdigest(), rel

    return sorted(files, key=key)


def read_corpus(data: str | None, max_bytes: int, val_fraction: float, seq_len: int) -> Corpus:
    """Concatenate the corpus's files (each followed by a newline; binary files skipped) up to
    ``max_bytes`` and hold out the last ``val_fraction`` of the bytes for validation."""
    if data is None:
        root, files = stdlib_sources()
        source = f"python stdlib {root}"
    else:
        path = Path(data)
        if path.is_file():
            root, files = path.parent, [path]
        elif path.is_dir():
            root, files = path, folder_files(path)
        else:
            raise CorpusError(f"--data {data}: no such file or folder")
        source = str(path)
    chunks, total, used = [], 0, 0
    for f in in_fixed_order(root, files):
        if total >= max_bytes:
            break
        content = f.read_bytes()
        if b"\0" in content[:8192]:
            continue  # binary
        piece = (content + b"\n")[: max_bytes - total]
        chunks.append(piece)
        total += len(piece)
        used += 1
    blob = b"".join(chunks)
    n_val = int(len(blob) * val_fraction)
    if n_val < seq_len + 1 or len(blob) - n_val < seq_len + 1:
        raise CorpusError(
            f"corpus {source}: {len(blob)} bytes from {used} files leave {len(blob) - n_val} training and "
            f"{n_val} validation bytes; each part needs at least --seq-len + 1 = {seq_len + 1} "
            "(raise --max-bytes or --val-fraction, or give a larger --data)")
    stream = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return Corpus(stream[:-n_val].clone(), stream[-n_val:].clone(), source, used,
                  hashlib.sha256(blob).hexdigest())


def training_batches(data: Tensor, seq_len: int, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs, targets) of random windows of ``data``, drawn from a generator of their own:
    the same seed gives the same order whatever the model (and its attention) does."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=gen)
        window = data[(starts[:, None] + offsets).to(data.device)].long()
        yield window[:, :-1], window[:, 1:]


def validation_batches(data: Tensor, seq_len: int, batch: int, windows: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed validation set: ``windows`` windows evenly spaced over ``data``, in batches."""
    starts = torch.linspace(0, data.numel() - seq_len - 1, windows).long()
    window = data[(starts[:, None] + torch.arange(seq_len + 1)).to(data.device)].long()
    return [(w[:, :-1], w[:, 1:]) for w in window.split(batch)]


# --------------------------------------------------------------------------- model


class SoftmaxCore(nn.Module):
    """Causal softmax attention through ``scaled_dot_product_attention``."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def alphas(self) -> list[float] | None:
        return None


class EntmaxCore(nn.Module):
    """Causal alpha-entmax attention through the public ``AdaSplashAttention`` (heads in, heads out).

    A fixed alpha, or one learned alpha per layer, is one module for all heads; a learned alpha per
    head is one module per head, each called on its head (``adasplash`` takes one alpha per call).
    """

    def __init__(self, heads: int, alpha: float, learn: bool, per_head: bool, backend: str | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        self.heads = heads
        count = heads if learn and per_head else 1
        self.attn = nn.ModuleList(AdaSplashAttention(alpha=alpha, learn_alpha=learn, is_causal=True, scale=scale,
                                                     backend=backend)
                                  for _ in range(count))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if len(self.attn) == 1:
            return self.attn[0](q, k, v)
        return torch.cat([m(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1]) for h, m in enumerate(self.attn)], 1)

    def alphas(self) -> list[float]:
        values = [float(m.alpha.detach()) if m.learn_alpha else m.alpha for m in self.attn]  # a float stays exact
        return values * self.heads if len(values) == 1 else values

    def set_alpha(self, alpha: float) -> None:
        """Replace a fixed alpha (the module reads its ``_alpha`` on every call); a learned one raises."""
        for m in self.attn:
            if m.learn_alpha:
                raise ValueError("a learned alpha is a parameter: it cannot be scheduled")
            m._alpha = alpha


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, core: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.core = core
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.core(q, k, v).transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Decoder-only byte-level language model; the output layer is the byte embedding (tied)."""

    def __init__(self, layers: int, width: int, heads: int, seq_len: int, make_core: Callable[[], nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, make_core()) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()

    def alphas(self) -> list[list[float]] | None:
        per_layer = [block.core.alphas() for block in self.blocks]
        return None if per_layer[0] is None else per_layer

    def set_alpha(self, alpha: float) -> None:
        """Give every layer's entmax attention the fixed ``alpha`` (the alpha schedule)."""
        for block in self.blocks:
            block.core.set_alpha(alpha)


def init_weights(model: ByteLM, seed: int) -> None:
    """GPT-2 style initialisation from a CPU generator of its own, module by module in a fixed order:
    the same seed gives the same weights whatever the attention (alpha parameters keep their
    constructor value and draw nothing)."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * len(model.blocks))
    residual_out = {id(b.proj) for b in model.blocks} | {id(b.mlp[2]) for b in model.blocks}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if id(module) in residual_out else 0.02
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def build_model(args: argparse.Namespace) -> ByteLM:
    if args.attention == "sdpa":
        make_core: Callable[[], nn.Module] = SoftmaxCore
    else:
        learn = args.alpha == "learned"
        alpha = args.alpha_init if learn else float(args.alpha)
        per_head = args.alpha_per == "head"
        scale = None if args.score_scale == 1.0 else args.score_scale / math.sqrt(args.width // args.heads)
        make_core = lambda: EntmaxCore(args.heads, alpha, learn, per_head, args.backend, scale)  # noqa: E731
    model = ByteLM(args.layers, args.width, args.heads, args.seq_len, make_core)
    init_weights(model, args.seed)
    return model


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms or alpha parameters)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% of steps (at most 100), then cosine decay to peak / 10."""
    warmup = min(100, max(1, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def scheduled_alpha(step: int, start: float, target: float, warmup: int) -> float:
    """The alpha in force at 0-based ``step``: linear from ``start`` to ``target`` over ``warmup`` steps,
    rounded to 0.01 (few distinct values: the library's per-alpha caches stay small) and kept between
    the two ends; exactly ``target`` from step ``warmup`` on."""
    if step >= warmup:
        return target
    value = round(start + (target - start) * step / warmup, 2)
    return min(max(value, min(start, target)), max(start, target))


def alpha_schedule(args: argparse.Namespace) -> Callable[[int], float] | None:
    """The run's alpha at each step, or None without ``--alpha-start``."""
    if args.alpha_start is None:
        return None
    target = float(args.alpha)
    return lambda step: scheduled_alpha(step, args.alpha_start, target, args.alpha_warmup)


# --------------------------------------------------------------------------- measurements


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU; float32 (no autocast) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: ByteLM, batches: Sequence[tuple[Tensor, Tensor]], device: torch.device) -> float:
    """Mean validation loss (nats per byte) over the fixed validation set."""
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for inputs, targets in batches:
        with autocast_for(device):
            logits = model(inputs)
        total += F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1), reduction="sum")
        count += targets.numel()
    model.train()
    return float(total) / count


@torch.no_grad()
def attention_inputs(model: ByteLM, tokens: Tensor, device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each layer's (q, k, v) for ``tokens`` (B, N), as the attention receives them (B, H, N, D)."""
    seen: list[tuple[Tensor, Tensor, Tensor]] = []
    hooks = [block.core.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.detach() for a in args)))
             for block in model.blocks]
    try:
        with autocast_for(device):
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def active_tiles(q: Tensor, k: Tensor, alpha: float, tile: int) -> tuple[int, int]:
    """(tiles holding any nonzero causal alpha-entmax probability, tiles of the causal lower
    triangle) of one head's N x N attention; q, k: (N, D). Rows go in chunks (bounded memory)."""
    n, dim = q.shape
    side = -(-n // tile)
    rows = max(tile, DENSITY_SCORE_BYTES // (4 * n) // tile * tile)
    q, k = q.float(), k.float()
    active = 0
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        scores = (q[r0:r1] @ k[:r1].t()) / math.sqrt(dim)
        future = torch.arange(r1, device=q.device)[None, :] > torch.arange(r0, r1, device=q.device)[:, None]
        nonzero = adasplash_tune.entmax(scores.masked_fill(future, -math.inf), alpha) > 0
        pad_r, pad_c = -(r1 - r0) % tile, -r1 % tile
        nonzero = F.pad(nonzero, (0, pad_c, 0, pad_r))
        t_r, t_c = nonzero.shape[0] // tile, nonzero.shape[1] // tile
        active += int(nonzero.view(t_r, tile, t_c, tile).any(3).any(1).sum())
    return active, side * (side + 1) // 2


def block_density(model: ByteLM, tokens: Tensor, device: torch.device) -> list[dict[str, Any]]:
    """Per layer: the share of causal tiles (16x16 and 64x64) holding any nonzero attention
    probability, for the first sequence of ``tokens``, per head and over all heads.
    Softmax attention is dense: 1 by definition (not computed)."""
    alphas = model.alphas()
    result = []
    for layer, (q, k, _v) in enumerate(attention_inputs(model, tokens[:1], device)):
        heads = q.shape[1]
        entry: dict[str, Any] = {"layer": layer}
        for tile in TILES:
            if alphas is None:
                per_head = [1.0] * heads
                entry[f"tile{tile}"] = 1.0
            else:
                counts = [active_tiles(q[0, h], k[0, h], alphas[layer][h], tile) for h in range(heads)]
                per_head = [a / t for a, t in counts]
                entry[f"tile{tile}"] = sum(a for a, _ in counts) / sum(t for _, t in counts)
            entry[f"heads{tile}"] = per_head
        result.append(entry)
    return result


def capture(model: ByteLM, tokens: Tensor, device: torch.device, folder: Path, max_mb: float,
            info: dict[str, Any]) -> dict[str, Any]:
    """Save each layer's q, k, v for the first sequence of ``tokens`` as safetensors files (all heads,
    or as many heads as fit ``max_mb`` in total), with ``manifest.json``; returns the manifest."""
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise SystemExit(f"error: --capture needs safetensors ({exc}); pip install safetensors") from exc
    qkv = attention_inputs(model, tokens[:1], device)
    _, heads, n, dim = qkv[0][0].shape
    per_head = 3 * n * dim * qkv[0][0].element_size()
    keep = min(heads, int(max_mb * 2**20) // (per_head * len(qkv)))
    if keep < 1:
        need = per_head * len(qkv) / 2**20
        raise SystemExit(f"error: --capture-mb {max_mb} is below one head per layer ({need:.1f} MB)")
    folder.mkdir(parents=True, exist_ok=True)
    alphas = model.alphas()
    layers = []
    for layer, tensors in enumerate(qkv):
        alpha = None if alphas is None else alphas[layer][:keep]
        name = f"layer{layer:02d}.safetensors"
        data = {key: t[:, :keep].contiguous().cpu() for key, t in zip("qkv", tensors)}
        meta = {"layer": str(layer), "alpha": json.dumps(alpha), "model_step": str(info["model_step"])}
        save_file(data, str(folder / name), metadata=meta)
        layers.append({"layer": layer, "file": name, "shape": list(data["q"].shape),
                       "dtype": str(data["q"].dtype).removeprefix("torch."), "alpha": alpha})
    manifest = {
        "format": "adasplash-tune train_lm capture v1",
        "tensors": "q, k, v of shape (1, heads, seq_len, head_dim), as the attention received them",
        "is_causal": True, "scale": 1.0 / math.sqrt(dim), "heads_kept": keep, "heads": heads,
        "window": "the first validation window (validation split, offset 0)", **info, "layers": layers,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# --------------------------------------------------------------------------- training loop


class NonFiniteLoss(RuntimeError):
    """A loss or gradient norm went NaN or infinite."""


class Recorder:
    """Accumulates training steps on the device (no host sync per step) and writes one JSON line per
    log point: the interval's mean loss and speed, peak memory, alpha, and optionally the validation
    loss and block density (measured after the interval's clock and peak memory are read)."""

    def __init__(self, path: Path, model: ByteLM, val_set: list[tuple[Tensor, Tensor]], device: torch.device,
                 args: argparse.Namespace) -> None:
        self.path, self.model, self.val_set, self.device, self.args = path, model, val_set, device, args
        self.cuda = device.type == "cuda"
        self.records: list[dict[str, Any]] = []
        self.tokens_per_step = args.batch * args.seq_len
        path.write_text("")
        self.restart_clock()

    def restart_clock(self) -> None:
        """Training time (for wall_s) counts from here; the interval starts afresh."""
        self.start = time.perf_counter()
        self._new_interval()

    def _new_interval(self) -> None:
        self.steps, self.loss_sum, self.bad = 0, None, None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)  # each record's peak is its interval's
        self.interval_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add_step(self, loss: Tensor, grad_norm: Tensor) -> None:
        loss = loss.detach()
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.bad = bad if self.bad is None else self.bad | bad
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1

    def record(self, step: int, evaluate_now: bool, density_now: bool) -> dict[str, Any]:
        """Write the record of ``step``; raise NonFiniteLoss if a loss or gradient was not finite."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.interval_start
        n, args = self.steps, self.args
        rec: dict[str, Any] = {
            "step": step, "wall_s": round(self.elapsed(), 4), "lr": learning_rate(step - 1, args.steps, args.lr),
            "train_loss": float(self.loss_sum) / n if n else None, "val_loss": None,
            "step_time_s": seconds / n if n else None, "tokens_per_s": self.tokens_per_step * n / seconds if n else None,
            "tokens_seen": step * self.tokens_per_step,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
            "warmup": step <= WARMUP_RECORD_STEP,
            "alpha": self.model.alphas() if args.alpha == "learned" or args.alpha_start else None,
            "density": None, "nonfinite": bool(self.bad) if self.bad is not None else False,
        }
        if evaluate_now and not rec["nonfinite"]:
            rec["val_loss"] = evaluate(self.model, self.val_set, self.device)
            rec["nonfinite"] = not math.isfinite(rec["val_loss"])
        if density_now and not rec["nonfinite"]:
            rec["density"] = block_density(self.model, self.val_set[0][0], self.device)
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        self.records.append(rec)
        print(format_record(rec), flush=True)
        if rec["nonfinite"]:
            since = self.records[-2]["step"] if len(self.records) > 1 else None
            where = "of the initial weights" if since is None else f"between steps {since} and {step}"
            raise NonFiniteLoss(f"non-finite loss or gradient {where} (see {self.path})")
        self._new_interval()
        return rec


def density_now(due: list[str], step: int, elapsed: float, last: bool, args: argparse.Namespace) -> bool:
    """Whether this evaluation measures the density: the first one, the first past half the steps or
    half the time budget, and the last (``due`` lists the checkpoints still to come; consumed)."""
    half = step >= args.steps / 2 or (args.time_budget > 0 and elapsed >= args.time_budget / 2)
    if last or (due and (due[0] == "first" or (due[0] == "mid" and half))):
        del due[: len(due) if last else 1]
        return True
    return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, writing ``config.json``, ``metrics.jsonl`` and ``summary.json`` to ``args.out``;
    returns the summary. Raises NonFiniteLoss (after writing the summary) on NaN/inf."""
    device = torch.device(args.device)
    out = Path(args.out)
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists() and not args.overwrite:
        raise SystemExit(f"error: {metrics_path} exists; choose another --out or pass --overwrite")
    torch.manual_seed(args.seed)
    corpus = read_corpus(args.data, args.max_bytes, args.val_fraction, args.seq_len)
    model = build_model(args).to(device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    batches = training_batches(corpus.train.to(device), args.seq_len, args.batch, args.seed)
    val_set = validation_batches(corpus.val.to(device), args.seq_len, args.batch, args.eval_windows)
    config = describe(args, corpus, model, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{config['name']}: {config['params']:,} parameters on {config['device_name']}; corpus "
          f"{corpus.source}: {corpus.train.numel():,} training and {corpus.val.numel():,} validation bytes "
          f"({corpus.files} files); writing {out}", flush=True)

    recorder = Recorder(metrics_path, model, val_set, device, args)
    schedule = alpha_schedule(args)
    due = ["first", "mid", "end"]
    stop_reason, step = "steps", 0
    try:
        if schedule is not None:
            model.set_alpha(schedule(0))
        recorder.record(0, evaluate_now=True, density_now=False)
        recorder.restart_clock()  # the step-0 evaluation is not training time
        for step in range(1, args.steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step - 1, args.steps, args.lr)
            inputs, targets = next(batches)
            with autocast_for(device):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recorder.add_step(loss, grad_norm)
            if schedule is not None:  # the alpha of this step's record (its validation) and of the next step
                model.set_alpha(schedule(step))

            elapsed = recorder.elapsed()
            out_of_time = args.time_budget > 0 and elapsed >= args.time_budget
            last = step == args.steps or out_of_time
            evaluate_now = last or (args.eval_every > 0 and step % args.eval_every == 0)
            if evaluate_now or step == WARMUP_RECORD_STEP or step % args.log_every == 0:
                recorder.record(step, evaluate_now, evaluate_now and density_now(due, step, elapsed, last, args))
            if out_of_time:
                stop_reason = "time_budget"
                break
    except NonFiniteLoss:
        summary = summarize(config, recorder.records, "nonfinite", None)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        raise

    manifest_path = None
    if args.capture:
        final = recorder.records[-1]
        info = {"name": config["name"], "attention": config["attention"], "model_step": step,
                "train_loss": final["train_loss"], "val_loss": final["val_loss"], "seq_len": args.seq_len,
                "corpus_sha256": corpus.sha256}
        capture(model, val_set[0][0], device, Path(args.capture), args.capture_mb, info)
        manifest_path = str(Path(args.capture) / "manifest.json")
    summary = summarize(config, recorder.records, stop_reason, manifest_path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def describe(args: argparse.Namespace, corpus: Corpus, model: ByteLM, device: torch.device) -> dict[str, Any]:
    """The run's settings, corpus, model and software: what makes two runs comparable."""
    return {
        "name": args.name or run_name(args), "attention": args.attention,
        "alpha": None if args.attention == "sdpa" else args.alpha,
        "alpha_init": args.alpha_init if args.alpha == "learned" else None,
        "alpha_per": args.alpha_per if args.alpha == "learned" else None,
        "alpha_schedule": None if args.alpha_start is None else {
            "start": args.alpha_start, "target": float(args.alpha), "warmup_steps": args.alpha_warmup,
            "rounding": 0.01, "rule": "alpha(t) = start + (target - start) * min(1, t / warmup_steps), rounded"},
        "args": dict(vars(args)),
        "corpus": {"source": corpus.source, "files": corpus.files, "sha256": corpus.sha256,
                   "train_bytes": corpus.train.numel(), "val_bytes": corpus.val.numel()},
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "adasplash_tune": adasplash_tune.__version__,
        "python": platform.python_version(),
    }


def run_name(args: argparse.Namespace) -> str:
    if args.attention == "sdpa":
        kind = "softmax (sdpa)"
    elif args.alpha == "learned":
        kind = f"entmax, learned alpha per {args.alpha_per}, from {args.alpha_init:g}"
    elif args.alpha_start is not None:
        kind = f"entmax, alpha={args.alpha_start:g}->{float(args.alpha):g} over {args.alpha_warmup} steps"
    else:
        kind = f"entmax, alpha={float(args.alpha):g}"
    if args.attention == "adasplash" and args.score_scale != 1.0:
        kind += f", score scale {args.score_scale:g}"
    return f"{kind}, N={args.seq_len}"


def summarize(config: dict[str, Any], records: list[dict[str, Any]], stop_reason: str,
              capture_manifest: str | None) -> dict[str, Any]:
    """The run's results: final and best losses, steady step time and tokens/s (records after the
    warm-up), training peak memory, alpha and the density checkpoints."""
    steady = [r for r in records if r["step_time_s"] is not None and not r["warmup"]]
    evals = [r for r in records if r["val_loss"] is not None]
    train_losses = [r for r in records if r["train_loss"] is not None]
    peaks = [r["peak_mem_bytes"] for r in records if r["peak_mem_bytes"] is not None and r["step"] > 0]
    return {
        **config, "status": "nonfinite" if stop_reason == "nonfinite" else "ok", "stop_reason": stop_reason,
        "steps_done": records[-1]["step"], "wall_s": records[-1]["wall_s"],
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(r["val_loss"] for r in evals) if evals else None,
        "final_train_loss": train_losses[-1]["train_loss"] if train_losses else None,
        "step_time_s": statistics.median(r["step_time_s"] for r in steady) if steady else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "peak_mem_bytes": max(peaks) if peaks else None,
        "alpha_final": next((r["alpha"] for r in reversed(records) if r["alpha"] is not None), None),
        "density": [{"step": r["step"], "layers": r["density"]} for r in records if r["density"] is not None],
        "capture_manifest": capture_manifest,
    }


# --------------------------------------------------------------------------- printing


def format_record(rec: dict[str, Any]) -> str:
    parts = [f"step {rec['step']:>6}"]
    if rec["train_loss"] is not None:
        parts.append(f"train {rec['train_loss']:.4f}")
    if rec["val_loss"] is not None:
        parts.append(f"val {rec['val_loss']:.4f}")
    if rec["tokens_per_s"] is not None:
        parts.append(f"{rec['step_time_s'] * 1e3:.1f} ms/step, {rec['tokens_per_s']:,.0f} tok/s")
    if rec["alpha"] is not None:
        flat = [a for layer in rec["alpha"] for a in layer]
        parts.append(f"alpha {min(flat):.3f}..{max(flat):.3f}")
    if rec["density"] is not None:
        parts.append("density@64 " + " ".join(f"{d['tile64']:.2f}" for d in rec["density"]))
    if rec["nonfinite"]:
        parts.append("NON-FINITE")
    return "  ".join(parts)


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as plain-text tables: results, then density per layer and checkpoint, then alpha."""
    mib = summary["peak_mem_bytes"] / 2**20 if summary["peak_mem_bytes"] is not None else None
    lines = [
        f"== {summary['name']} ({summary['dtype']}, {summary['device_name']}) ==",
        f"steps {summary['steps_done']} (stopped by {summary['stop_reason']}), wall {summary['wall_s']:.1f} s",
        f"val loss final {fmt(summary['final_val_loss'], '.4f')}, best {fmt(summary['best_val_loss'], '.4f')}; "
        f"train loss final {fmt(summary['final_train_loss'], '.4f')}",
        f"step time {fmt(summary['step_time_s'] and summary['step_time_s'] * 1e3, '.2f')} ms, "
        f"{fmt(summary['tokens_per_s'], ',.0f')} tokens/s, peak memory {fmt(mib, ',.0f')} MiB",
    ]
    if summary["density"]:
        lines.append("block density (share of causal tiles with any nonzero probability):")
        lines.append("  step   layer  16x16   64x64")
        for point in summary["density"]:
            for d in point["layers"]:
                lines.append(f"  {point['step']:>6} {d['layer']:>5}  {d['tile16']:.3f}   {d['tile64']:.3f}")
    if summary.get("alpha_schedule"):
        sched = summary["alpha_schedule"]
        lines.append(f"alpha schedule: {sched['start']:g} -> {sched['target']:g} over {sched['warmup_steps']} steps")
    if summary["alpha_final"] is not None:
        lines.append("alpha per head (final):")
        for layer, values in enumerate(summary["alpha_final"]):
            lines.append(f"  layer {layer}: " + " ".join(f"{a:.3f}" for a in values))
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--attention", choices=("sdpa", "adasplash"), required=True,
                   help="softmax (scaled_dot_product_attention) or alpha-entmax (AdaSplash)")
    p.add_argument("--alpha", default=None,
                   help="adasplash: a fixed alpha in (1, 2], or 'learned' (default 1.5)")
    p.add_argument("--alpha-init", type=float, default=1.1,
                   help="initial value of a learned alpha (1.1, near softmax: started at 1.5 it trained worse)")
    p.add_argument("--alpha-start", type=float, default=None, metavar="A0",
                   help="adasplash, fixed --alpha: start at alpha A0 in (1, 2] and move linearly to --alpha over "
                        "--alpha-warmup steps (rounded to 0.01); validation uses the alpha in force at its step, "
                        "so the final one is at --alpha when the warm-up ends before the run stops; None: no schedule")
    p.add_argument("--alpha-warmup", type=int, default=0, metavar="STEPS",
                   help="length of the --alpha-start warm-up in steps (at least 1 with --alpha-start)")
    p.add_argument("--score-scale", type=float, default=1.0,
                   help="adasplash: scores are q.k * SCORE_SCALE / sqrt(head dim); 1 / (alpha - 1) gives entmax's "
                        "(alpha - 1)-scaled scores the logits softmax sees")
    p.add_argument("--alpha-per", choices=("head", "layer"), default="head", help="granularity of a learned alpha")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="AdaSplash backend (auto: Triton on a GPU, PyTorch on CPU)")
    p.add_argument("--data", default=None, help="a text file or folder (default: the Python stdlib's .py sources)")
    p.add_argument("--max-bytes", type=int, default=32 << 20, help="corpus byte budget")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of the corpus")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5000, help="training steps (also the LR schedule's length)")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="stop after this many seconds of training (0: no limit)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="output folder (config.json, metrics.jsonl, summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --out")
    p.add_argument("--name", default=None, help="label of the run in tables and plots")
    p.add_argument("--eval-every", type=int, default=200, help="validation every N steps (0: at the end only)")
    p.add_argument("--log-every", type=int, default=50, help="a training record every N steps")
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows of --seq-len bytes")
    p.add_argument("--capture", default=None, metavar="DIR",
                   help="save each layer's q/k/v of one validation sequence at the end (safetensors)")
    p.add_argument("--capture-mb", type=float, default=256.0, help="size cap of --capture")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.attention == "sdpa" and args.alpha is not None:
        p.error("--alpha applies to --attention adasplash")
    if args.attention == "adasplash":
        args.alpha = args.alpha or "1.5"
        if args.alpha != "learned":
            try:
                value = float(args.alpha)
            except ValueError:
                p.error(f"--alpha {args.alpha}: a number in (1, 2] or 'learned'")
            if not 1.0 < value <= 2.0:
                p.error(f"--alpha {args.alpha}: must be in (1, 2]")
        if not 1.0 < args.alpha_init < 2.0:
            p.error(f"--alpha-init {args.alpha_init}: a learned alpha lives in (1, 2)")
    check_alpha_schedule(p, args)
    for name in ("seq_len", "batch", "steps", "layers", "width", "heads", "log_every", "eval_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.width % args.heads:
        p.error(f"--width {args.width} must be divisible by --heads {args.heads}")
    if args.attention == "adasplash" and not 16 <= args.width // args.heads <= 256:
        p.error(f"head dim {args.width // args.heads} (--width / --heads) must be in 16..256 for AdaSplash")
    if args.score_scale <= 0.0 or not math.isfinite(args.score_scale):
        p.error(f"--score-scale {args.score_scale}: must be a positive number")
    if args.attention == "sdpa" and args.score_scale != 1.0:
        p.error("--score-scale applies to --attention adasplash")
    if not 0.0 < args.val_fraction < 1.0:
        p.error("--val-fraction must be in (0, 1)")
    if args.eval_every < 0 or args.time_budget < 0:
        p.error("--eval-every and --time-budget must be >= 0")


def check_alpha_schedule(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--alpha-start / --alpha-warmup: a warm-up towards a fixed numeric --alpha of adasplash attention."""
    if args.alpha_warmup < 0:
        p.error(f"--alpha-warmup {args.alpha_warmup}: must be >= 0")
    if args.alpha_start is None:
        if args.alpha_warmup:
            p.error("--alpha-warmup needs --alpha-start (the alpha the warm-up starts from)")
        return
    if args.attention != "adasplash":
        p.error("--alpha-start applies to --attention adasplash")
    if args.alpha == "learned":
        p.error("--alpha-start needs a fixed numeric --alpha (a learned alpha is trained, not scheduled)")
    if not 1.0 < args.alpha_start <= 2.0:
        p.error(f"--alpha-start {args.alpha_start}: must be in (1, 2]")
    if args.alpha_warmup < 1:
        p.error("--alpha-start needs --alpha-warmup STEPS >= 1")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (NonFiniteLoss, CorpusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
