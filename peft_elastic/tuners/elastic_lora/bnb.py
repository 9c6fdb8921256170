"""Elastic LoRA on bitsandbytes 8-bit and 4-bit bases: forward, backward and merge (dequantize, add, requantize)."""

from __future__ import annotations

from peft.import_utils import is_bnb_4bit_available, is_bnb_available

from .layer import ElasticLoraLayer

if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    class Linear8bitLt(ElasticLoraLayer, LoraLinear8bitLt):
        """Elastic LoRA on `bitsandbytes.nn.Linear8bitLt`."""


if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    class Linear4bit(ElasticLoraLayer, LoraLinear4bit):
        """Elastic LoRA on `bitsandbytes.nn.Linear4bit` (NF4/FP4)."""
