"""`SparsePEFTModel`: the elastic LoRA tuner with SparsePEFT layers."""

from __future__ import annotations

from torch import nn

from ..elastic_lora import layer as elastic_layer
from ..elastic_lora.model import ElasticLoraModel, _elastic_class
from .layer import Linear


class SparsePEFTModel(ElasticLoraModel):
    """The tuner of `SparsePEFTConfig` adapters: targeting, subnetworks, merging and saving as for ElasticLoRA."""

    @staticmethod
    def _layer_class(base_layer: nn.Module) -> type | None:
        elastic = _elastic_class(base_layer)
        if elastic is None:
            return None
        if elastic is elastic_layer.Linear:
            return Linear
        from ..elastic_lora import bnb as elastic_bnb
        from . import bnb

        if elastic is getattr(elastic_bnb, "Linear4bit", None):
            return bnb.Linear4bit
        if elastic is getattr(elastic_bnb, "Linear8bitLt", None):
            return bnb.Linear8bitLt
        raise ValueError(
            f"SparsePEFTConfig does not support {type(base_layer).__name__} bases yet (SparsePEFT on GPTQ is "
            "QA-SparsePEFT). For an unmerged adapter on a GPTQ base use NLSConfig or ElasticLoraConfig."
        )
