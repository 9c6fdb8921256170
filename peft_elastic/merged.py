"""Saving the merged model of an adapter (`export_merged_model`): `merge_and_unload()`, written atomically and read
back.

What the merge keeps is the tuner's business: a SparsePEFT adapter keeps every zero of a sparse base, QA-SparsePEFT
writes integer codes into a GPTQ base, a Mode B subnetwork that narrows the base gives the smaller model. The saver
adds what a reader needs beside the weights: the tokenizer, and for a GPTQ base the sparsity mask of the float model
(`sparsity_mask.safetensors`, which GPTQ's filled zeros make necessary for any later SparsePEFT on it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from .atomic_folders import check_export_target, export_directory
from .quantization.mask import MASK_FILE, find_mask_file
from .tuners.sparse_peft.config import DENSE


def export_merged_model(
    model: PeftModel,
    save_directory: str | os.PathLike,
    subnetwork: Mapping[str, int] | None = None,
    adapter_name: str | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Merge the adapter into its base with `model.merge_and_unload()` — at `subnetwork` if given (an elastic
    adapter's; default: the active one) — and save the merged model (and `tokenizer`, if given) to `save_directory`,
    a new or empty folder (a non-empty one is refused unless `overwrite`, which replaces it whole). A GPTQ base's
    sparsity mask file is copied beside it. The folder is written under a temporary name, every saved tensor is
    read back and compared with the merged model's, then it is renamed into place. `model` is merged and unloaded as
    by `merge_and_unload()` (a narrowing Mode B subnetwork leaves it as it was). Returns the directory."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"export_merged_model needs a PeftModel (an adapter on a base), got {type(model).__name__}.")
    check_export_target(save_directory, overwrite)  # before the merge changes the model
    if subnetwork is not None:
        from .subnetwork import set_subnetwork

        set_subnetwork(model, subnetwork, adapter_name)
    mask = _mask_file(model)
    names = [adapter_name] if adapter_name is not None else None
    with export_directory(save_directory, overwrite) as staging:
        merged = model.merge_and_unload(adapter_names=names)
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if mask is not None:
            shutil.copyfile(mask, staging / MASK_FILE)
        verify_saved_model(staging, merged)
    return Path(save_directory)


def _mask_file(model: PeftModel) -> Path | None:
    """The sparsity mask file of a GPTQ base: the one a SparsePEFT config names, else the checkpoint's own."""
    if getattr(model.get_base_model(), "quantization_method", None) != "gptq":
        return None
    for config in model.peft_config.values():
        named = getattr(config, "sparsity_mask", None)
        if named not in (None, DENSE):
            path = Path(named)
            return path / MASK_FILE if path.is_dir() else path
    return find_mask_file(model.get_base_model())[0]


def verify_saved_model(directory: Path, model: nn.Module) -> None:
    """Raise unless the safetensors files in `directory` hold `model`'s state dict: every tensor saved there equals the
    model's (in the saved dtype), and every tensor of the model is saved (tied weights aside). One saved tensor is
    read at a time."""
    from safetensors import safe_open

    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    saved = set()
    for file in sorted(directory.glob("*.safetensors")):
        if file.name == MASK_FILE:
            continue
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                if key not in expected:
                    continue
                value = handle.get_tensor(key)
                if value.shape != expected[key].shape or not torch.equal(value, expected[key].to(value.dtype)):
                    raise RuntimeError(
                        f"The saved {key} in {directory} differs from the merged model's; nothing was saved."
                    )
                saved.add(key)
    missing = sorted(set(expected) - saved - tied)
    if missing:
        raise RuntimeError(f"The merged model's {missing[:3]} were not saved in {directory}; nothing was saved.")
