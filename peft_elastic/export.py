"""Exporting a subnetwork of an elastic super-adapter as a stock PEFT LoRA checkpoint.

Readers of LoRA checkpoints do not all read the same fields of `adapter_config.json`. Stock PEFT gives each module
the scaling `alpha_pattern[m] / rank_pattern[m]` (falling back to `lora_alpha` and `r`); vLLM's loader and other
converters read only `r`, `lora_alpha` and `use_rslora` and apply ONE scaling `lora_alpha / r` to every module,
taking each module's rank from its tensors. The export is written so that both readings give the elastic model's
outputs:

- `use_rslora` is written False and `lora_alpha = s · r`, where `s` is the scaling most modules share (the elastic
  scaling `alpha / r_max`, or `alpha / √r_max` with rsLoRA) and `r` the largest exported rank, so `lora_alpha / r = s`;
- `rank_pattern[m] = k_m` (the module's exported rank) and `alpha_pattern[m] = s · k_m` for every module;
- a module whose scaling `s_m` differs from `s` (per-module `alpha_pattern`, or a `rank_choices_pattern` with another
  maximal rank) has its `lora_B` (and LoRA bias) multiplied by `s_m / s`, so `s · B' A = s_m · B A` in every reader.

With `uniform_rank`, every module is written at one rank `R`: `A` padded with zero rows and `B` with zero columns,
which adds nothing to the output, and no patterns are needed. That also suits readers that divide by each tensor's
own rank (llama.cpp's `alpha / rank`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .atomic_folders import export_directory
from .fsdp import full_parameters, require_gathered
from .tuners.elastic_lora.search_space import SearchSpace

# LoraConfig fields that the export sets itself; every other field is copied from the elastic config.
_DERIVED_FIELDS = {"peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "inference_mode"}
_PEFT_PREFIX = "base_model.model."


def sub_adapter_state(
    model: PeftModel,
    subnetwork: Mapping[str, int] | None = None,
    adapter_name: str | None = None,
    uniform_rank: bool | int = False,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The stock LoRA config and state dict (keys as in `adapter_model.safetensors`) of `subnetwork` (default: the
    active one), written as the module docstring says: each module of rank `k` gets `A[:k]` (k × in) and `B[:, :k]`
    (out × k), and `lora_alpha / r` equals the scaling of every module. `uniform_rank`: False (each module at its own
    rank), True (every module at the largest rank of the subnetwork) or a rank `R` at least that large; the extra
    rows of `A` and columns of `B` are zeros."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"export needs the PeftModel returned by get_peft_model / PeftModel.from_pretrained, got "
            f"{type(model).__name__}."
        )
    require_gathered(model, "sub_adapter_state")
    space = SearchSpace.of(model, adapter_name)
    adapter_name, config = space.adapter_name, space.config
    chosen = space.validated(subnetwork)
    ranks = space.module_ranks(chosen)
    layers = {module_name: layer for group in space.rank_groups.values() for module_name, layer in group.modules}
    removed = space.removed_from_base(chosen)
    if removed:
        raise ValueError(
            f"This subnetwork narrows the base or drops blocks of it ({len(removed)} modules or blocks, e.g. "
            f"{removed[0]!r}), which a LoRA adapter cannot express: export a subnetwork at full widths with every "
            "block kept, or the physically smaller model with peft_elastic.export_compressed_model (or "
            "merge_and_unload())."
        )
    rank = _exported_rank(uniform_rank, max(ranks.values()))
    scalings = {name: float(layers[name].scaling[adapter_name]) for name in ranks}
    shared = Counter(scalings.values()).most_common(1)[0][0]  # ties: the first module's (Counter keeps order)

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {key: value.detach() for key, value in state.items() if not key.endswith("._extra_state")}
    for module_name, k in ranks.items():
        stem = f"{_PEFT_PREFIX}{module_name}"
        a, b = tensors[f"{stem}.lora_A.weight"][:k], tensors[f"{stem}.lora_B.weight"][:, :k]
        fold = scalings[module_name] / shared
        if fold != 1.0:
            b = b * fold
            if f"{stem}.lora_B.bias" in tensors:
                tensors[f"{stem}.lora_B.bias"] = tensors[f"{stem}.lora_B.bias"] * fold
        if uniform_rank:
            a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = a, b
    tensors = {key: value.contiguous().clone() for key, value in tensors.items()}

    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - _DERIVED_FIELDS
    exported = {} if uniform_rank else dict(ranks)
    lora_config = LoraConfig(
        **{name: getattr(config, name) for name in fields},
        r=rank,
        lora_alpha=_number(shared * rank),
        rank_pattern=exported,
        alpha_pattern={name: _number(shared * k) for name, k in exported.items()},
        use_rslora=False,
        inference_mode=True,
    )
    if lora_config.base_model_name_or_path is None:
        lora_config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path") or None
    return lora_config, tensors


def _exported_rank(uniform_rank: bool | int, largest: int) -> int:
    """The config's `r`: the largest rank of the subnetwork, or the `uniform_rank` asked for."""
    if isinstance(uniform_rank, bool):
        return largest
    if not isinstance(uniform_rank, int) or uniform_rank < largest:
        raise ValueError(
            f"uniform_rank must be True, False or a rank of at least {largest} (the largest rank of this "
            f"subnetwork), got {uniform_rank!r}."
        )
    return uniform_rank


def _number(value: float) -> int | float:
    """`value` as an int when it is a whole number (a config's `lora_alpha` is usually one), else as it is."""
    return int(round(value)) if math.isclose(value, round(value), rel_tol=0, abs_tol=1e-9) else value


def export_sub_adapter(
    model: PeftModel,
    save_directory: str | os.PathLike,
    subnetwork: Mapping[str, int] | None = None,
    adapter_name: str | None = None,
    uniform_rank: bool | int = False,
    overwrite: bool = False,
) -> Path:
    """Write `subnetwork` (default: the active one) of an elastic adapter as a stock LoRA checkpoint
    (`adapter_config.json` with `peft_type: "LORA"`, `adapter_model.safetensors`) that `PeftModel.from_pretrained`
    and `AutoPeftModelForCausalLM.from_pretrained` load without peft_elastic, and that readers applying one scaling
    `lora_alpha / r` to every module (vLLM) read right too: the same outputs either way. `uniform_rank` writes every
    module at one rank (see `sub_adapter_state`). `save_directory` must be new or empty (a non-empty one is refused
    unless `overwrite`, which replaces it whole); the folder is written under a temporary name, verified, then
    renamed into place. A model sharded by FSDP: call it on every rank; the weights are gathered and rank 0 writes.
    Returns the directory."""
    with full_parameters(model) as writes:
        if writes:
            _write_sub_adapter(model, save_directory, subnetwork, adapter_name, uniform_rank, overwrite)
    return Path(save_directory)


def _write_sub_adapter(model, save_directory, subnetwork, adapter_name, uniform_rank, overwrite) -> None:
    with export_directory(save_directory, overwrite) as staging:
        lora_config, tensors = sub_adapter_state(model, subnetwork, adapter_name, uniform_rank)
        lora_config.save_pretrained(str(staging), auto_mapping_dict=_auto_mapping(model, lora_config))
        save_file(tensors, str(staging / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        reloaded = load_file(str(staging / SAFETENSORS_WEIGHTS_NAME))
        if {k: v.shape for k, v in reloaded.items()} != {k: v.shape for k, v in tensors.items()}:
            raise RuntimeError(f"The exported weights in {staging} did not read back as written; nothing was saved.")
        again = LoraConfig.from_pretrained(str(staging))
        if (again.r, again.lora_alpha, again.rank_pattern) != (
            lora_config.r,
            lora_config.lora_alpha,
            lora_config.rank_pattern,
        ):
            raise RuntimeError(f"The exported config in {staging} did not read back as written; nothing was saved.")


def _auto_mapping(model: PeftModel, config: LoraConfig) -> dict[str, str] | None:
    """What `PeftModel.save_pretrained` records so that `AutoPeftModel*` finds the base class of an adapter without a
    `task_type` (None when it has one)."""
    if config.task_type is not None:
        return None
    base_class = type(model.base_model.model)
    return {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
