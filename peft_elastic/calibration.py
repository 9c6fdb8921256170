"""Turning the calibration data users have into batches a causal LM accepts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch


def calibration_batches(
    data,
    tokenizer=None,
    *,
    text_column: str = "text",
    max_length: int = 512,
    num_samples: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """`data` as a list of `{"input_ids": (batch, seq), "attention_mask": ...}` dicts.

    Accepted: an iterable of `input_ids` tensors (1-D or 2-D) or of dicts holding `input_ids` (and optionally
    `attention_mask`); a `datasets.Dataset` with an `input_ids` column; or a `datasets.Dataset` (or list) of texts
    plus `tokenizer` (the `text_column` column, truncated to `max_length` tokens). At most `num_samples` entries are
    used."""
    if data is None:
        raise ValueError(
            "The data is None; give texts (with tokenizer=), input_ids tensors, dicts with input_ids, or a "
            "datasets.Dataset."
        )
    if isinstance(data, (str, bytes, torch.Tensor)) and not (isinstance(data, torch.Tensor) and data.dim() == 2):
        raise ValueError(
            f"calibration_data must be an iterable of input_ids tensors or dicts, or a datasets.Dataset, got "
            f"{type(data).__name__}."
        )
    if isinstance(data, torch.Tensor):  # one (batch, seq) tensor: its rows are the samples
        data = list(data)
    try:
        import datasets

        is_dataset = isinstance(data, datasets.Dataset)
    except ImportError:  # pragma: no cover - datasets is a dependency
        is_dataset = False
    if is_dataset and "input_ids" not in data.column_names:
        if text_column not in data.column_names:
            raise ValueError(
                f"The calibration dataset has no 'input_ids' and no {text_column!r} column (columns: "
                f"{data.column_names}); pass text_column= or tokenized data."
            )
        data = data[text_column]
    if not isinstance(data, Iterable):
        raise ValueError(
            f"calibration_data must be an iterable of input_ids tensors or dicts, or a datasets.Dataset, got "
            f"{type(data).__name__}."
        )
    batches = []
    for index, item in enumerate(_limit(iter(data), num_samples)):
        batches.append(_batch(item, index, tokenizer, max_length))
    if not batches:
        raise ValueError("calibration_data is empty; give at least one sample (Wanda uses 128 sequences).")
    return batches


def _limit(items: Iterator, n: int | None) -> Iterator:
    for index, item in enumerate(items):
        if n is not None and index >= n:
            return
        yield item


def _batch(item, index: int, tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError(
                f"calibration_data[{index}] is text; pass tokenizer= to tokenize it, or give input_ids tensors."
            )
        encoded = tokenizer(item, return_tensors="pt", truncation=True, max_length=max_length)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"calibration_data[{index}] is a dict without 'input_ids' (keys: {sorted(item)}).")
        batch = {"input_ids": _ids(item["input_ids"], index)}
        if item.get("attention_mask") is not None:
            mask = _ids(item["attention_mask"], index)
            if mask.shape != batch["input_ids"].shape:
                raise ValueError(
                    f"calibration_data[{index}]: attention_mask {tuple(mask.shape)} does not match input_ids "
                    f"{tuple(batch['input_ids'].shape)}."
                )
            batch["attention_mask"] = mask
        return batch
    if isinstance(item, (torch.Tensor, list, tuple)):
        return {"input_ids": _ids(item, index)}
    raise ValueError(
        f"calibration_data[{index}] is a {type(item).__name__}; expected an input_ids tensor, a dict with "
        "'input_ids', or a text (with tokenizer=)."
    )


def _ids(value, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.numel() == 0 or tensor.is_floating_point():
        raise ValueError(
            f"calibration_data[{index}]: input_ids must be a non-empty integer tensor of shape (seq,) or "
            f"(batch, seq), got shape {tuple(tensor.shape)} and dtype {tensor.dtype}."
        )
    return tensor.long()
