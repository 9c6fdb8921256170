"""The ElasticLoRA tuner (Mode A: elastic rank): config, layers and model."""

from .config import ElasticLoraConfig
from .layer import ElasticLoraLayer, LoraA, LoraB
from .model import ElasticLoraModel
from .space import RankGroup, rank_groups

__all__ = ["ElasticLoraConfig", "ElasticLoraLayer", "ElasticLoraModel", "LoraA", "LoraB", "RankGroup", "rank_groups"]
