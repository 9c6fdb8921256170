"""Evaluators: what a search measures for each subnetwork. Any callable `model -> float` works; `LossEvaluator` is
the causal-LM loss (or perplexity) on a validation set, in bounded batches."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..sparsity.calibration import calibration_batches


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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
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
