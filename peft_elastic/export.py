"""Exporting a subnetwork of an elastic super-adapter as a stock PEFT LoRA checkpoint."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .io import staged_directory
from .subnetwork import _rank_groups, module_ranks, module_widths

# LoraConfig fields that the export sets itself; every other field is copied from the elastic config.
_DERIVED_FIELDS = {"peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"}
_PEFT_PREFIX = "base_model.model."


def sub_adapter_state(
    model: PeftModel, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The stock LoRA config and state dict (keys as in `adapter_model.safetensors`) of `subnetwork` (default: the
    active one). Each module of rank `k` gets `A[:k]`, `B[:, :k]`, `rank_pattern = k` and `alpha_pattern = s · k`, so
    that its LoRA scaling `alpha / r` equals the elastic scaling `s`."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"export needs the PeftModel returned by get_peft_model / PeftModel.from_pretrained, got "
            f"{type(model).__name__}."
        )
    adapter_name, groups = _rank_groups(model, adapter_name)
    config = model.peft_config[adapter_name]
    ranks = module_ranks(model, subnetwork, adapter_name)
    layers = {module_name: layer for group in groups.values() for module_name, layer in group.modules}
    narrowed = [
        name
        for name, widths in module_widths(model, subnetwork, adapter_name).items()
        if widths != (layers[name].out_features, layers[name].in_features)
    ]
    if narrowed:
        raise ValueError(
            f"This subnetwork narrows the base ({len(narrowed)} modules, e.g. {narrowed[0]!r}), which a LoRA adapter "
            "cannot express: export a subnetwork at full widths (its elastic widths at their largest choice)."
        )
    scalings = {name: layer.scaling[adapter_name] for g in groups.values() for name, layer in g.modules}

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {key: value for key, value in state.items() if not key.endswith("._extra_state")}
    for module_name, k in ranks.items():
        stem = f"{_PEFT_PREFIX}{module_name}"
        tensors[f"{stem}.lora_A.weight"] = tensors[f"{stem}.lora_A.weight"][:k]
        tensors[f"{stem}.lora_B.weight"] = tensors[f"{stem}.lora_B.weight"][:, :k]
    tensors = {key: value.detach().contiguous().clone() for key, value in tensors.items()}

    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - _DERIVED_FIELDS
    lora_config = LoraConfig(
        **{name: getattr(config, name) for name in fields},
        r=max(ranks.values()),
        lora_alpha=config.lora_alpha,
        rank_pattern=dict(ranks),
        alpha_pattern={name: scalings[name] * k for name, k in ranks.items()},
        use_rslora=False,
    )
    return lora_config, tensors


def export_sub_adapter(
    model: PeftModel,
    save_directory: str | os.PathLike,
    subnetwork: Mapping[str, int] | None = None,
    adapter_name: str | None = None,
) -> Path:
    """Write `subnetwork` (default: the active one) of an elastic adapter as a stock LoRA checkpoint
    (`adapter_config.json` with `peft_type: "LORA"`, `adapter_model.safetensors`) that `PeftModel.from_pretrained`
    loads without peft_elastic and that gives the same outputs. Files are staged, verified, then renamed into place.
    Returns the directory."""
    lora_config, tensors = sub_adapter_state(model, subnetwork, adapter_name)
    with staged_directory(save_directory) as staging:
        lora_config.save_pretrained(str(staging))
        save_file(tensors, str(staging / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        reloaded = load_file(str(staging / SAFETENSORS_WEIGHTS_NAME))
        if {k: v.shape for k, v in reloaded.items()} != {k: v.shape for k, v in tensors.items()}:
            raise RuntimeError(f"The exported weights in {staging} did not read back as written; nothing was saved.")
        if LoraConfig.from_pretrained(str(staging)).rank_pattern != lora_config.rank_pattern:
            raise RuntimeError(f"The exported config in {staging} did not read back as written; nothing was saved.")
    return Path(save_directory)
