"""NLS (Neural Low-rank adapter Search, from Shears): a preset of the ElasticLoRA tuner with its own PEFT type."""

from .config import NLSConfig

__all__ = ["NLSConfig"]
