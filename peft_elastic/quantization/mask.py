"""The sparsity mask of a quantized checkpoint, stored bit-packed next to it (`sparsity_mask.safetensors`).

GPTQ's error feedback fills pruned weights, so the pattern of the sparse float model cannot be read back from the
quantized one: it is recorded before quantizing and kept with the checkpoint. One uint8 tensor (out × ceil(in / 8))
per quantized linear layer, keyed by the layer's module name; the file's metadata holds each layer's `in`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .packing import pack_mask, unpack_mask

MASK_FILE = "sparsity_mask.safetensors"
_FORMAT = "peft_elastic.sparsity_mask.v1"


def save_sparsity_mask(masks: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write `{module name: bool (out × in) mask of the weights kept}` to `path` (a file, or a directory to hold
    `sparsity_mask.safetensors`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    tensors, columns = {}, {}
    for name, mask in masks.items():
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(
                f"mask {name!r} must be a 2-D bool tensor (out × in), got {mask.dtype} {tuple(mask.shape)}"
            )
        tensors[name] = pack_mask(mask.cpu()).contiguous()
        columns[name] = mask.shape[1]
    save_file(tensors, str(path), metadata={"format": _FORMAT, "in_features": json.dumps(columns)})


def load_sparsity_mask(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`{module name: bool (out × in) mask}` from a file written by `save_sparsity_mask` (or its directory)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No sparsity mask at {str(path)!r}: quantize_gptq writes {MASK_FILE} next to the checkpoint of a sparse "
            "model; quantize the sparse float model with peft_elastic.quantize_gptq to get one."
        )
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a peft_elastic sparsity mask (format {metadata.get('format')!r}).")
        columns = json.loads(metadata["in_features"])
        return {name: unpack_mask(handle.get_tensor(name), columns[name]) for name in handle.keys()}
