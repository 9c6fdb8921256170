"""Exporting a Mode B subnetwork as a physically smaller model (`export_compressed_model`) and loading it back; the
model itself is built in memory by `peft_elastic.tuners.elastic_lora.narrowed` (`compressed_model`).

The adapters are folded into the base at the subnetwork's ranks, and every adapted linear layer keeps only the rows
and columns of the subnetwork's widths: the first MLP channels and the first attention heads (and their key/value
heads). Decoder blocks the subnetwork drops are left out and the others renumbered. When every layer has the same
width and the same number of heads, the checkpoint is a standard one whose config says so (`intermediate_size`,
`num_attention_heads`, `num_key_value_heads`, `head_dim`, `num_hidden_layers`), and
`AutoModelForCausalLM.from_pretrained` loads it. Otherwise — or when transformers' config validation refuses those
sizes (a hidden size that is not a multiple of the number of heads) — the config records each module's shape
(`peft_elastic_shapes`) and one line loads it: `peft_elastic.load_compressed_model(path)`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from .atomic_folders import export_directory
from .fsdp import full_parameters
from .tuners.elastic_lora.narrowed import (  # noqa: F401 (compressed_model, compressed_state: public here too)
    SHAPES_KEY,
    build_model,
    compressed_model,
    compressed_state,
    tied_keys,
)


def export_compressed_model(
    model: PeftModel,
    save_directory: str | os.PathLike,
    subnetwork: Mapping[str, int] | None = None,
    adapter_name: str | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Fold the adapters into the base at `subnetwork` (default: the active one), keep only its widths and heads,
    and save the smaller model (and `tokenizer`, if given) to `save_directory`, a new or empty folder (a non-empty
    one is refused unless `overwrite`, which replaces it whole). The folder is written under a temporary name,
    reloaded and checked, then renamed into place. Load it with `AutoModelForCausalLM.from_pretrained` when every
    layer has the same sizes, else with `peft_elastic.load_compressed_model`. A model sharded by FSDP: call it on
    every rank; the weights are gathered and rank 0 writes. Returns the directory."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"export_compressed_model needs a PeftModel with an elastic adapter, got {type(model).__name__}."
        )
    with full_parameters(model) as writes:
        if writes:
            _write_compressed(model, save_directory, subnetwork, adapter_name, tokenizer, overwrite)
    return Path(save_directory)


def _write_compressed(model, save_directory, subnetwork, adapter_name, tokenizer, overwrite) -> None:
    with export_directory(save_directory, overwrite) as staging:
        compressed = compressed_model(model, subnetwork, adapter_name)
        compressed.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        reloaded = load_compressed_model(staging)
        for key, value in compressed.state_dict().items():
            if not torch.equal(reloaded.state_dict()[key], value):
                raise RuntimeError(
                    f"The saved compressed model did not read back as written ({key}); nothing was saved."
                )


def load_compressed_model(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a model written by `export_compressed_model` (any sizes). `kwargs` go to `from_pretrained` (uniform
    sizes) or set `dtype`; a model with per-module shapes is built from its config, narrowed, then filled."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise ValueError(
                f"{str(path)!r} is an adapter folder (adapter_config.json), not a model: load it on its base with "
                "peft.PeftModel.from_pretrained(base, path), or write its compressed model with `peft-elastic export "
                "ADAPTER OUTPUT --base MODEL --as compressed` (peft_elastic.export_compressed_model) and load that "
                "folder."
            )
        raise ValueError(
            f"{str(path)!r} holds no config.json, so it is not a model folder: give the folder "
            "export_compressed_model (or save_pretrained) wrote."
        )
    config = AutoConfig.from_pretrained(path)
    if not getattr(config, SHAPES_KEY, None):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    model = build_model(config, dtype=kwargs.get("dtype") or next(iter(state.values())).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not hold the weights its config describes (missing {missing[:3]}).")
    model.eval()
    return model
