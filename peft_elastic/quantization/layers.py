"""gptqmodel's GPTQ linear layers as this package uses them: which kernels keep the standard packed layout, their
codes and zero-points, writing codes back, and saving them in the checkpoint's zero-point format.

transformers loads a GPTQ checkpoint into gptqmodel layers. On CPU its default kernel is `TorchAtenLinear`, which
keeps the standard layout (`packing`) while it trains but, at its first forward in eval mode without gradients,
re-lays out `qweight` for an int4 inference kernel (bf16 scales, float zero offsets) — a one-way conversion after
which neither gradients to the input nor a merge are possible. `pin_standard_layout` keeps it in the standard
layout. `TorchLinear` (`backend="gptq_torch"`) always does.

The torch kernels hold the zero-points in format v2 (`z`) in memory (see `zero_format`), while a "gptq" checkpoint
stores v1 (`z − 1`); transformers' `save_pretrained` writes the in-memory tensors under the v1 label, which shifts
every zero-point by one on reload. `save_in_checkpoint_format` makes the layers' state dicts use the checkpoint's
format.
"""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import is_gptq_layer
from .packing import check_bits, pack_cols, pack_rows, unpack_rows, zero_points

#: gptqmodel kernels whose `qweight` / `qzeros` stay in the standard GPTQ layout (others repack them at load).
STANDARD_LAYOUT_KERNELS = ("TorchLinear", "TorchAtenLinear")


def zero_format(layer: nn.Module) -> int:
    """The zero-point format of `layer`'s `qzeros` in memory: 1 (v1, `z − 1`) or 2 (v2, `z`).

    Kernels that compute with v2 (`REQUIRES_FORMAT_V2`: the torch kernels) hold v2 — gptqmodel's loader converts a v1
    checkpoint for them and keeps a v2 one as it is — and their own dequantization reads `qzeros` as v2 whatever
    their `qzero_format()` flag says (it stays 1 after loading a v2 checkpoint). For other layers, the flag."""
    if getattr(type(layer), "REQUIRES_FORMAT_V2", False):
        return 2
    return layer.qzero_format() if hasattr(layer, "qzero_format") else 1


def check_standard_layout(layer: nn.Module, name: str = "") -> None:
    """Raise a clear error unless `layer` holds 2/4/8-bit codes in the standard GPTQ layout (see `packing`)."""
    label = f"{name!r} ({type(layer).__name__})" if name else type(layer).__name__
    check_bits(layer.bits)
    if type(layer).__name__ not in STANDARD_LAYOUT_KERNELS or getattr(layer, "planar", False):
        raise ValueError(
            f"GPTQ layer {label} keeps its weights in a kernel-specific packed layout that this package cannot read "
            f"or merge into; supported kernels: {list(STANDARD_LAYOUT_KERNELS)}. Load the model with "
            "quantization_config=GPTQConfig(bits=..., backend='gptq_torch')."
        )
    if getattr(layer, "linear_mode", None) == "inference":
        raise ValueError(
            f"GPTQ layer {label} was already re-laid out for gptqmodel's int4 inference kernel by a forward in eval "
            "mode without gradients, which cannot be undone exactly. Load the model again and wrap it with "
            "get_peft_model before running it, or load it with GPTQConfig(bits=..., backend='gptq_torch')."
        )


def pin_standard_layout(layer: nn.Module) -> None:
    """Keep a `TorchAtenLinear` in its trainable standard-layout mode (its dequantizing matmul) for good."""
    if type(layer).__name__ == "TorchAtenLinear":
        check_standard_layout(layer)
        layer.linear_mode = "train"


def eager_dequantization(model: nn.Module) -> int:
    """Run every `TorchLinear` GPTQ layer of `model` with its own (eager) `dequantize_weight`; returns how many layers
    it changed.

    gptqmodel wraps each `TorchLinear`'s `dequantize_weight` in `torch.compile` when the layer is loaded (`optimize`,
    an attribute of the instance); inductor then compiles it at its first use in each shape and mode. On small layers
    that costs more than it saves: the demo's first INT4 fine-tuning spent about 130 s of 2 CPU cores compiling, and
    ran no faster afterwards than eager (benchmarks/RESULTS.md, the demo section). Deleting the instance attribute
    restores the class's method; the results are the same."""
    changed = 0
    for module in model.modules():
        if is_gptq_layer(module) and "dequantize_weight" in vars(module):
            del module.dequantize_weight
            changed += 1
    return changed


def codes(layer: nn.Module) -> torch.Tensor:
    """The integer codes `q` (in × out, int32) of a standard-layout GPTQ layer."""
    return unpack_rows(layer.qweight, layer.bits, layer.g_idx.shape[0])


def zeros(layer: nn.Module) -> torch.Tensor:
    """The zero-points `z` (groups × out, int32) that dequantization subtracts."""
    return zero_points(layer.qzeros, layer.bits, layer.scales.shape[1], zero_format(layer))


def write_codes(layer: nn.Module, new_codes: torch.Tensor) -> None:
    """Pack `new_codes` (in × out, values in [0, 2^bits − 1]) into `layer.qweight` in place."""
    packed = pack_rows(new_codes, layer.bits)
    layer.qweight.data.copy_(packed[: layer.qweight.shape[0]].to(layer.qweight.device))


def checkpoint_zero_format(model: nn.Module) -> int:
    """The zero-point format that `model`'s quantization config declares for its checkpoint: 2 for "gptq_v2",
    else 1."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return 1
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    declared = get("checkpoint_format") or get("format")
    return 2 if str(getattr(declared, "value", declared)) == "gptq_v2" else 1


def save_in_checkpoint_format(model: nn.Module) -> None:
    """Make every GPTQ layer of `model` hold its `qzeros` in its state dict in the format the model's config declares,
    both ways: `state_dict()` (and so `save_pretrained`) writes that format, so the checkpoint reloads to the same
    weights, and `load_state_dict` reads it; and make `model.save_pretrained` write the quantization config, dtype
    label and tensor dtypes of the checkpoint it was loaded from (`checkpoint.keep_checkpoint_metadata`).
    Idempotent."""
    from .checkpoint import keep_checkpoint_metadata  # it imports this module

    target = checkpoint_zero_format(model)
    layers = [(name, layer) for name, layer in model.named_modules() if is_gptq_layer(layer)]
    for name, layer in layers:
        if not getattr(layer, "_peft_elastic_format_hooks", False):
            layer.register_state_dict_post_hook(_saving_hook(name, target))
            layer.register_load_state_dict_pre_hook(_loading_hook(target))
            layer._peft_elastic_format_hooks = True
    if layers:
        keep_checkpoint_metadata(model)


def _convert_qzeros(layer: nn.Module, qzeros: torch.Tensor, source: int, target: int, name: str = "") -> torch.Tensor:
    z = zero_points(qzeros, layer.bits, layer.scales.shape[1], source)
    if target == 1 and int(z.min()) < 1:
        raise ValueError(
            f"GPTQ layer {name!r} has a zero-point of 0, which the 'gptq' (v1) checkpoint format cannot store (it "
            "stores z - 1). Set model.config.quantization_config.format = 'gptq_v2' before saving, to write a v2 "
            "checkpoint (transformers loads it through gptqmodel)."
        )
    return pack_cols(z - 1 if target == 1 else z, layer.bits).to(qzeros.device)


def _saving_hook(name: str, target: int):
    def hook(layer: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        key, current = prefix + "qzeros", zero_format(layer)
        if key in state_dict and current != target:
            state_dict[key] = _convert_qzeros(layer, state_dict[key], current, target, name)

    return hook


def _loading_hook(source: int):
    def hook(layer: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        key, current = prefix + "qzeros", zero_format(layer)
        if key in state_dict and current != source:
            state_dict[key] = _convert_qzeros(layer, state_dict[key], source, current)

    return hook
