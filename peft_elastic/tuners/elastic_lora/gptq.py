"""Elastic LoRA on GPTQ bases (gptqmodel quantized linear layers): forward and backward; no merge."""

from __future__ import annotations

from peft.tuners.lora.gptq import GPTQLoraLinear

from .layer import ElasticLoraLayer


class GPTQLinear(ElasticLoraLayer, GPTQLoraLinear):
    """Elastic LoRA on a gptqmodel `BaseQuantLinear`. Merging into the integer weights is refused, as for LoRA."""
