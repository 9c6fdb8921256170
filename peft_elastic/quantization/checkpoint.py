"""Saving a GPTQ model loaded by transformers the way its checkpoint was written.

transformers' `save_pretrained` of a GPTQ model writes the quantization config it was *loaded* with, not the stored
one: a `backend` passed to `from_pretrained` (e.g. "gptq_torch", the trainable float32 kernel) is pinned for every
later loader, fields `GPTQConfig` does not know are dropped (`lm_head`, `method`, `pack_dtype`) or replaced by its
defaults (`damp_percent` 0.1 where gptqmodel stored 0.05), and the non-quantized tensors (embeddings, norms,
`lm_head`) are written in the dtype the model was loaded in (a bfloat16 checkpoint trained in float32 grew from 108 to
162 MB on SmolLM2-135M). `keep_checkpoint_metadata` makes `model.save_pretrained` write the checkpoint's own
`quantization_config` and `dtype` and its tensors in their stored dtypes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
from pathlib import Path

import torch
from torch import nn

from .layers import checkpoint_zero_format

#: safetensors' names of the floating-point dtypes a checkpoint stores.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: The `quantization_config` keys that name the zero-point format (gptqmodel writes both).
FORMAT_KEYS = ("format", "checkpoint_format")


@dataclasses.dataclass(frozen=True)
class StoredCheckpoint:
    """What a GPTQ checkpoint folder stores: its `quantization_config` (as in its config.json), its `dtype` label
    and the dtype of each floating-point tensor (`{state-dict key: dtype}`)."""

    quantization_config: dict
    dtype: str | None
    tensor_dtypes: dict[str, torch.dtype]


def keep_checkpoint_metadata(model: nn.Module) -> None:
    """Make `model.save_pretrained` (a GPTQ model loaded by transformers from a folder, or from the hub cache) write
    what its checkpoint stores: the checkpoint's `quantization_config`, with the zero-point format the model's config
    now declares (`format` / `checkpoint_format`) and no loading option such as `backend` unless the checkpoint had
    it; every floating-point tensor in its stored dtype where that is lossless (the frozen tensors read from it
    always are; a trained `modules_to_save` copy keeps its own dtype); and the checkpoint's `dtype` label when all of
    them are. A model not loaded from a GPTQ checkpoint is left as it is. Idempotent."""
    if "_peft_elastic_stored" in model.__dict__ or not hasattr(model, "save_pretrained"):
        return
    stored = stored_checkpoint(getattr(model, "name_or_path", None) or "")
    if stored is None:
        return
    model._peft_elastic_stored = stored
    model.save_pretrained = types.MethodType(save_pretrained, model)


def stored_checkpoint(name_or_path: str) -> StoredCheckpoint | None:
    """The `StoredCheckpoint` of a local GPTQ checkpoint folder or of a hub model in the local cache; None when
    there is none (no folder, no config.json, or no `quantization_config` in it)."""
    folder = _local_folder(name_or_path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text())
    if not isinstance(config.get("quantization_config"), dict):
        return None
    from safetensors import safe_open

    dtypes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                dtype = SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype())
                if dtype is not None:
                    dtypes[key] = dtype
    return StoredCheckpoint(config["quantization_config"], config.get("dtype", config.get("torch_dtype")), dtypes)


def save_pretrained(self, save_directory, *args, **kwargs):
    """transformers' `save_pretrained`, writing what the model's GPTQ checkpoint stores
    (`keep_checkpoint_metadata`)."""
    stored: StoredCheckpoint = self._peft_elastic_stored
    kept = {"all": True}
    handle = self.register_state_dict_post_hook(_stored_dtypes_hook(stored.tensor_dtypes, kept))
    try:
        type(self).save_pretrained(self, save_directory, *args, **kwargs)
    finally:
        handle.remove()
    path = Path(save_directory) / "config.json"
    if not kwargs.get("is_main_process", True) or not path.is_file():
        return
    config = json.loads(path.read_text())
    config["quantization_config"] = _quantization_config(self, stored.quantization_config)
    if kept["all"] and stored.dtype is not None:
        config["dtype"] = stored.dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _quantization_config(model: nn.Module, stored: dict) -> dict:
    """The checkpoint's quantization config with the zero-point format `model`'s config declares now."""
    config = copy.deepcopy(stored)
    label = "gptq_v2" if checkpoint_zero_format(model) == 2 else "gptq"
    for key in [k for k in FORMAT_KEYS if k in config] or FORMAT_KEYS[:1]:
        config[key] = label
    return config


def _stored_dtypes_hook(dtypes: dict[str, torch.dtype], kept: dict):
    """A state-dict post hook that casts each floating-point tensor to its dtype in `dtypes` where that is lossless
    (tied tensors stay one tensor); `kept["all"]` becomes False if one could not be cast."""

    def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        cast = {}  # data_ptr -> the cast tensor, so that tied weights still share storage
        for key, tensor in state_dict.items():
            dtype = dtypes.get(key.removeprefix(prefix))
            if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            pointer = (tensor.data_ptr(), dtype)
            if pointer not in cast:
                narrowed = tensor.to(dtype)
                cast[pointer] = narrowed if torch.equal(narrowed.to(tensor.dtype), tensor) else None
            if cast[pointer] is None:
                kept["all"] = False
            else:
                state_dict[key] = cast[pointer]

    return hook


def _local_folder(name_or_path: str) -> Path | None:
    """`name_or_path` if it is a folder, else the local cache folder of that hub model (nothing is downloaded)."""
    if not name_or_path:
        return None
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from transformers.utils import cached_file

    try:
        found = cached_file(
            name_or_path, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False
        )
    except (OSError, ValueError):
        return None
    return Path(found).parent if found else None


__all__ = ["StoredCheckpoint", "keep_checkpoint_metadata", "stored_checkpoint"]
