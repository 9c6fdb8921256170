"""Evaluators: what a search measures for each subnetwork. Any callable `model -> float` works (give it a `direction`
attribute, "minimize" or "maximize", or pass `direction=` to `run_search`). `LossEvaluator` is the causal-LM loss
(or perplexity) on a validation set, in bounded batches; `ExactMatchEvaluator` the accuracy of greedily generated
answers (GSM8K-style "#### 42")."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..calibration import calibration_batches
from ..checks import check_int


class LossEvaluator:
    """The mean causal-LM loss per predicted token (or its perplexity, `perplexity=True`) of `model` on `dataset`:
    texts with `tokenizer` (the `text_column` column, truncated to `max_length`), input_ids tensors, dicts with
    `input_ids` (and `attention_mask`), or a tokenized `datasets.Dataset` — as for `sparsify`. At most `num_samples`
    entries, `batch_size` at a time (padded with the tokenizer's pad token, masked out of the loss). The batches are
    built once; the model is evaluated in eval mode without gradients and put back in the mode it was in. Lower is
    better (search direction "minimize")."""

    direction = "minimize"

    def __init__(
        self,
        dataset,
        tokenizer=None,
        *,
        text_column: str = "text",
        max_length: int = 512,
        num_samples: int | None = 256,
        batch_size: int = 8,
        perplexity: bool = False,
    ) -> None:
        check_int("batch_size", batch_size)
        rows = calibration_batches(
            dataset, tokenizer, text_column=text_column, max_length=max_length, num_samples=num_samples
        )
        self.batches = _rebatch(rows, batch_size, getattr(tokenizer, "pad_token_id", None) or 0)
        self.perplexity = perplexity

    def __call__(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        try:
            with torch.no_grad():
                for batch in self.batches:
                    device = next(model.parameters()).device
                    input_ids = batch["input_ids"].to(device)
                    mask = batch["attention_mask"].to(device)
                    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                    total += float(
                        torch.nn.functional.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]),
                            targets.reshape(-1),
                            ignore_index=-100,
                            reduction="sum",
                        )
                    )
                    tokens += int((targets != -100).sum())
        finally:
            model.train(was_training)
        if tokens == 0:
            raise ValueError("The evaluation data has no token to predict (every sequence is shorter than 2 tokens).")
        loss = total / tokens
        return math.exp(loss) if self.perplexity else loss


def _rebatch(rows: list[dict[str, torch.Tensor]], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The sequences of `rows` regrouped into right-padded batches of `batch_size`."""
    sequences = []
    for row in rows:
        mask = row.get("attention_mask", torch.ones_like(row["input_ids"]))
        for ids, keep in zip(row["input_ids"], mask, strict=True):
            sequences.append(ids[keep.bool()])
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, sequence in enumerate(chunk):
            ids[i, : len(sequence)] = sequence
            mask[i, : len(sequence)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


#: GSM8K's answer line ("#### 42"); `ExactMatchEvaluator` falls back to the last number of the completion.
GSM8K_ANSWER = r"####\s*(-?[\d,]*\.?\d+)"
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_answer(text: str, pattern: str | None = GSM8K_ANSWER) -> str | None:
    """The answer in a generated `text`: the first group of `pattern` if it matches, else the last number in the
    text (commas removed, a trailing ".0" kept as written), else None."""
    if pattern is not None:
        match = re.search(pattern, text)
        if match:
            return match.group(1).replace(",", "")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


class ExactMatchEvaluator:
    """The fraction of `examples` whose greedily generated answer equals the reference: each example is a dict (or a
    `datasets.Dataset` row) with `prompt_column` and `answer_column`; the completion of at most `max_new_tokens`
    tokens goes through `extract_answer` (GSM8K's "#### 42", else the last number), and so does the reference.
    Batches of `batch_size`, left-padded. Higher is better (search direction "maximize")."""

    direction = "maximize"

    def __init__(
        self,
        examples,
        tokenizer,
        *,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        max_new_tokens: int = 32,
        batch_size: int = 16,
        answer_pattern: str | None = GSM8K_ANSWER,
        num_samples: int | None = None,
    ) -> None:
        check_int("max_new_tokens", max_new_tokens)
        check_int("batch_size", batch_size)
        rows = list(examples)[:num_samples] if num_samples is not None else list(examples)
        if not rows:
            raise ValueError("ExactMatchEvaluator needs at least one example.")
        for index, row in enumerate(rows):
            missing = [c for c in (prompt_column, answer_column) if c not in row]
            if missing:
                raise ValueError(
                    f"Example {index} has no {missing} (keys: {sorted(row)}); set prompt_column= / answer_column=."
                )
        self.prompts = [str(row[prompt_column]) for row in rows]
        self.answers = [extract_answer(str(row[answer_column]), answer_pattern) for row in rows]
        self.tokenizer, self.pattern = tokenizer, answer_pattern
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.last_completions: list[str] = []

    def __call__(self, model: nn.Module) -> float:
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training, side = model.training, tokenizer.padding_side
        model.eval()
        tokenizer.padding_side = "left"
        completions = []
        try:
            with torch.no_grad():
                for start in range(0, len(self.prompts), self.batch_size):
                    encoded = tokenizer(
                        self.prompts[start : start + self.batch_size], return_tensors="pt", padding=True
                    )
                    encoded = {k: v.to(next(model.parameters()).device) for k, v in encoded.items()}
                    generated = model.generate(
                        **encoded, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
                    )
                    new = generated[:, encoded["input_ids"].shape[1] :]
                    completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        self.last_completions = completions
        hits = sum(
            extract_answer(text, self.pattern) == answer
            for text, answer in zip(completions, self.answers, strict=True)
        )
        return hits / len(self.prompts)
