"""The demo's base model: a small Llama pre-trained here on the task's corpus, built once and cached.

The cache entry is keyed by everything that determines the weights (the pre-training settings and the task's
version), so changing a setting builds a new base instead of reusing a stale one. It is written to a temporary folder
and renamed when complete: an interrupted build leaves nothing behind that a later run could mistake for a base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..atomic_folders import staged_directory
from ..checks import check_int
from ..models import default_cache_dir  # noqa: F401  (the demo cache is the package cache)
from ..toy import tiny_llama, train_tokenizer
from .task import PRETRAINING_STEPS, TASK_VERSION, pretraining_texts


@dataclasses.dataclass(frozen=True)
class BaseSettings:
    """What the pre-trained base is: its shape, its tokenizer and how it is trained (batch of `batch_size`
    documents, AdamW with linear warm-up and cosine decay)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 256
    #: The base learns to copy a story's numbers into its equations late in pre-training, and the cosine decay's end
    #: completes it: at 1200 steps the base answered 80.0 % of the test problems untuned on an AVX2 code path and
    #: 99.8 % on a portable one; at 1800 steps an Intel AVX-512 CPU's portable path was still short of it (57.6 %,
    #: final loss 0.708) while its native one was past (99.8 %, 0.703). 2400 steps end every measured path past it
    #: with a margin (benchmarks/RESULTS.md, "The demo's LoRA across seeds and CPU code paths").
    steps: int = 2400
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    worked_fraction: float = 0.3
    #: Step counts of the worked problems in the corpus (drawn uniformly from this tuple; repeat one to weight it).
    worked_steps: tuple[int, ...] = PRETRAINING_STEPS
    #: Pack each step's documents into rows of at least this many tokens (`packed_batch`; None: pad them to the
    #: longest, `padded_batch`): the same loss and gradient, without computing the padding — 27 % of a padded
    #: batch's tokens. Measured side by side (AVX-512, 2 cores): steps take 0.84x the padded ones' time with rows of
    #: 100 tokens, 0.90x with rows of the longest document's 69, 0.86x with 192.
    pack_width: int | None = 100
    seed: int = 0

    def __post_init__(self) -> None:
        width = self.pack_width
        check_int("pack_width", width, optional=True, valid="a number of tokens >= 1, or None (no packing)")

    def key(self) -> str:
        """A short name for the cache entry of this base."""
        blob = json.dumps({**dataclasses.asdict(self), "task": TASK_VERSION}, sort_keys=True)
        return f"base-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def is_cached(settings: BaseSettings, cache_dir: Path) -> bool:
    """Whether `cache_dir` holds a complete base of these `settings` (its record is written last)."""
    return (Path(cache_dir) / settings.key() / "pretraining.json").is_file()


def pretrained_base(settings: BaseSettings, held_out: set[str], cache_dir: Path, log=print) -> Path:
    """The folder of the pre-trained base (model, tokenizer and `pretraining.json`), built if it is not cached.
    `held_out`: prompts that must not appear in the pre-training corpus (the validation and test problems)."""
    folder = Path(cache_dir) / settings.key()
    if is_cached(settings, cache_dir):
        log(f"Pre-trained base: {folder} (cached)")
        return folder
    log(f"Pre-training the base ({settings.steps} steps); cached in {folder} for later runs ...")
    start = time.perf_counter()
    model, tokenizer, losses = pretrain(settings, held_out)
    with staged_directory(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {
            "settings": dataclasses.asdict(settings),
            "task_version": TASK_VERSION,
            "parameters": sum(p.numel() for p in model.parameters()),
            "first_loss": losses[0],
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (staging / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"  loss {record['first_loss']:.3f} -> {record['final_loss']:.3f} in {record['seconds']:.0f} s")
    return folder


def pretrain(settings: BaseSettings, held_out: set[str]):
    """Train a new tokenizer and a randomly initialised Llama on the pre-training corpus (loss on every token).
    Returns (model, tokenizer, per-step losses)."""
    texts = pretraining_texts(
        settings.steps * settings.batch_size, held_out, settings.seed, settings.worked_fraction, settings.worked_steps
    )
    tokenizer = train_tokenizer(texts[:5000], vocab_size=settings.vocab_size, words=True)
    model = tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        seed=settings.seed,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    warmup, steps = settings.warmup_steps, settings.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))
    )
    model.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for step in range(steps):
            batch = texts[step * settings.batch_size : (step + 1) * settings.batch_size]
            if settings.pack_width is None:
                loss = model(**padded_batch(tokenizer, batch)).loss
            else:
                loss = model(**packed_batch(tokenizer, batch, settings.pack_width)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return model.eval(), tokenizer, losses


def padded_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """The model inputs of `texts` (each followed by EOS) as one row each, padded to the longest; the loss is on every
    token but the padding."""
    encoded = tokenizer([text + tokenizer.eos_token for text in texts], return_tensors="pt", padding=True)
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    return {**encoded, "labels": labels}


class Stopwatch:
    """The seconds between calls of `lap()` (since the stopwatch was made, at the first): each table row's time."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def packed_batch(tokenizer, texts: list[str], width: int | None = None) -> dict[str, torch.Tensor]:
    """The model inputs of `texts` (each followed by EOS) packed into as few rows of `width` tokens (at least the
    longest document's; None: that) as first-fit decreasing finds, with position ids that restart at every document
    and no attention mask.

    transformers reads the restarts as document boundaries and keeps attention inside each document (its "packed
    sequences", `masking_utils.find_packed_sequence_indices`; it needs no cache, hence `use_cache=False`); the first
    token of each document has no label, as nothing before it in its document predicts it. Each document is then
    seen at the same positions with the same context as in `padded_batch`, and the same tokens are predicted: the
    loss and its gradient are the padded batch's, up to float rounding (tests/test_demo.py checks it), without
    computing the padding. The rows' unused tails are a segment of their own (positions from 0, no labels)."""
    if not texts:
        raise ValueError("packed_batch needs at least one text to pack, got none.")
    documents = tokenizer([text + tokenizer.eos_token for text in texts]).input_ids
    width = max(width or 0, *(len(ids) for ids in documents))
    rows: list[list[list[int]]] = []  # the documents of each row
    for ids in sorted(documents, key=len, reverse=True):
        row = next((row for row in rows if sum(map(len, row)) + len(ids) <= width), None)
        if row is None:
            rows.append(row := [])
        row.append(ids)
    input_ids, positions, labels = [], [], []
    for row in rows:
        tail = width - sum(map(len, row))
        segments = [*row, [tokenizer.pad_token_id] * tail] if tail else row
        input_ids.append([token for ids in segments for token in ids])
        positions.append([i for ids in segments for i in range(len(ids))])
        labels.append(
            [-100 if i == 0 or k == len(row) else t for k, ids in enumerate(segments) for i, t in enumerate(ids)]
        )
    return {
        "input_ids": torch.tensor(input_ids),
        "position_ids": torch.tensor(positions),
        "labels": torch.tensor(labels),
        "use_cache": False,
    }


def load_base(folder: Path):
    """(model, tokenizer) of a cached base, in float32 and eval mode."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)
