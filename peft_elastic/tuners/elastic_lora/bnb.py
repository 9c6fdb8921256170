"""Elastic LoRA on bitsandbytes 8-bit and 4-bit bases: forward, backward and merge (dequantize, add, requantize)."""

from __future__ import annotations

from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from torch import nn

from .layer import ElasticLoraLayer


def restore_4bit_layout(weight: nn.Parameter) -> None:
    """Put a bitsandbytes 4-bit weight back into the standard layout, in place, if bitsandbytes re-laid it out.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) re-lays out a `Linear4bit` weight for a bfloat16 inference kernel
    at its first forward in eval mode without gradients (`quant_state.packing_format_for_cpu`): the codes are
    reordered and the block scales (`absmax`) transposed and rounded to bfloat16. `dequantize_4bit`, and so every
    merge, reads only the standard layout; the matmul on the other layout passes no gradient to its input; and
    bitsandbytes' own inverse (run when a state dict is taken) restores the codes but not the scales. Here the
    codes come back through that inverse and the scales are un-transposed (they keep the bfloat16 rounding, which
    is what the inference kernel computed with)."""
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    absmax = state.absmax.T.reshape(-1).float()  # (in / blocksize, out) -> the (out * in / blocksize) block order
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = absmax
    weight.quant_state = state


def disable_4bit_cpu_relayout(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer of `model` in the standard layout (see `restore_4bit_layout`): restore
    the ones already re-laid out and switch the re-layout off, so that evaluation passes, merges, gradients and
    saving all see the same weights. bitsandbytes then runs its standard CPU matmul in the compute dtype."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            restore_4bit_layout(module.weight)
            module.support_avx512bf16_for_cpu = False


if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    class Linear8bitLt(ElasticLoraLayer, LoraLinear8bitLt):
        """Elastic LoRA on `bitsandbytes.nn.Linear8bitLt`."""


if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    class Linear4bit(ElasticLoraLayer, LoraLinear4bit):
        """Elastic LoRA on `bitsandbytes.nn.Linear4bit` (NF4/FP4)."""
