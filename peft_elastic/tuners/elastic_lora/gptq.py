"""Elastic LoRA on GPTQ bases (gptqmodel quantized linear layers): forward and backward; a merge only through a
variant that writes integer codes (QA-SparsePEFT), as plain LoRA's update would be lost to rounding."""

from __future__ import annotations

import torch
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from .layer import ElasticLoraLayer
from .variant import GPTQ_MERGE_REFUSED


class GPTQLinear(ElasticLoraLayer, GPTQLoraLinear):
    """Elastic LoRA on a gptqmodel `BaseQuantLinear`. Merging into the integer weights is refused, as for LoRA,
    unless every adapter to merge has a variant that merges exactly (`ElasticVariant.merge_quantized`)."""

    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise why `adapter_names` cannot be merged into this layer, if they cannot: each adapter's variant says
        (an adapter without one has the reason of plain LoRA)."""
        for adapter in adapter_names:
            if adapter in self.lora_A:
                variant = self.lora_variant.get(adapter)
                if variant is None:
                    raise ValueError(GPTQ_MERGE_REFUSED)
                variant.check_merge_quantized(self)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self.check_merge(adapter_names)
        self.lora_variant[adapter_names[0]].merge_quantized(self, adapter_names)

    def unmerge(self) -> None:
        if self.merged:
            self.lora_variant[self.merged_adapters[-1]].unmerge_quantized(self)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()  # as LoRA layers do: the base model without the adapter
        if self.merged:
            return self.get_base_layer()(x, *args, **kwargs)  # the codes hold the adapter
        return super().forward(x, *args, **kwargs)
