"""SparsePEFT on bitsandbytes 4-bit and 8-bit bases (the mask comes from the dequantized weight)."""

from __future__ import annotations

from peft.import_utils import is_bnb_4bit_available, is_bnb_available

from .layer import SparsePEFTLayer

if is_bnb_available():
    from ..elastic_lora.bnb import Linear8bitLt as ElasticLinear8bitLt

    class Linear8bitLt(SparsePEFTLayer, ElasticLinear8bitLt):
        """SparsePEFT on `bitsandbytes.nn.Linear8bitLt`."""


if is_bnb_4bit_available():
    from ..elastic_lora.bnb import Linear4bit as ElasticLinear4bit

    class Linear4bit(SparsePEFTLayer, ElasticLinear4bit):
        """SparsePEFT on `bitsandbytes.nn.Linear4bit` (NF4 keeps exact zeros)."""
