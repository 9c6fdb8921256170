"""PEFT tuner types added by peft_elastic, one folder each (config.py, layer.py, model.py). Importing this package
registers them with PEFT, so that PEFT knows the types as soon as their classes exist."""

from .._registry import register_tuner
from .elastic_lora import ElasticLoraConfig, ElasticLoraModel
from .nls import NLSConfig
from .sparse_peft import SparsePEFTConfig, SparsePEFTModel

register_tuner("elastic_lora", ElasticLoraConfig, ElasticLoraModel)
register_tuner("nls", NLSConfig, ElasticLoraModel)  # a preset: the same tuner under its own PEFT type
register_tuner("sparse_peft", SparsePEFTConfig, SparsePEFTModel)
