"""What a variant of an elastic LoRA layer may change: PEFT's `LoraVariant` protocol, plus two hooks.

An adapter of an elastic layer is plain (no variant: `B A` at its active rank) or has a variant object in the
layer's `lora_variant[adapter]`, as DoRA is a variant of PEFT's LoRA layers: the layer classes stay one per base
backend (`torch.nn.Linear`/Conv1D, bitsandbytes 8-bit and 4-bit, GPTQ) and a variant (SparsePEFT, QA-SparsePEFT)
changes only what it is about. PEFT's layers already call a variant's `forward`, `merge_safe`, `merge_unsafe` and
`unmerge`; the elastic layers also ask it for

- `delta_weight`: the update a merge adds (`get_delta_weight` passes the plain `s · B[:, :k] A[:k]` through it);
- `whole_forward`: the whole output of the layer, base included, when the variant computes it in one go (a masked
  update folded into the base matmul, a forward on the fake-quantized merged weight); None keeps PEFT's path
  (the base's forward, then the variant's `forward` adds to it);
- `check_merge_quantized`, `merge_quantized`, `unmerge_quantized`: a merge into a GPTQ layer's integer weights,
  which plain LoRA refuses.

A variant holds no state of its own: what it needs lives on the layer (buffers, like DoRA's magnitude vector), so one
instance per adapter is enough and a layer is copied, moved and saved as usual. As in PEFT, the methods are static.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraVariant

#: Why a GPTQ layer refuses to merge an adapter without a variant that writes integer codes (the tuner raises it).
GPTQ_MERGE_REFUSED = (
    "Cannot merge LoRA layers into a gptq quantized model: rounding the adapter's update to the GPTQ grid would lose "
    "most of it. Keep the adapter unmerged, or train SparsePEFTConfig(..., quantization_aware=True) (QA-SparsePEFT), "
    "whose merge into the integer weights is exact."
)


class ElasticVariant(LoraVariant):
    """The base of the variants of elastic LoRA layers: a plain elastic update unless a method is overridden."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        """Set up what the variant needs on `module` when `adapter_name` is added to it (inside `update_layer`)."""

    @staticmethod
    def delta_weight(module, adapter: str, delta: torch.Tensor) -> torch.Tensor:
        """The update a merge of `adapter` adds, given the plain one `delta` (out × in, or in × out for Conv1D)."""
        return delta

    @staticmethod
    def whole_forward(module, adapters: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
        """The layer's output for the active `adapters` (the first of which has this variant), or None to run the
        base and then each adapter's update (PEFT's forward, which checks `adapter_names`). Called only while the
        adapters are enabled and unmerged."""
        return None

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        """`result` (the base's output) plus `active_adapter`'s update of `x` (cast to the adapter's dtype)."""
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        return result + lora_b(lora_a(module.lora_dropout[active_adapter](x))) * module.scaling[active_adapter]

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """A new tensor: `orig_weight` (a copy of the base weight) plus the update."""
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        """Add the update to the base weight `orig_weight` in place."""
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """The base weight without the update (`orig_weight` is the merged one)."""
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def check_merge_quantized(module) -> None:
        """Raise why the adapter cannot be merged into the integer weights of `module`'s GPTQ base, if it cannot."""
        raise ValueError(GPTQ_MERGE_REFUSED)

    @staticmethod
    def merge_quantized(module, adapter_names: list[str]) -> None:
        """Merge `adapter_names` into the integer weights of `module`'s GPTQ base (after `check_merge_quantized`)."""
        raise ValueError(GPTQ_MERGE_REFUSED)

    @staticmethod
    def unmerge_quantized(module) -> None:
        """Undo `merge_quantized`: the base's integer weights as they were."""
        raise ValueError(GPTQ_MERGE_REFUSED)
