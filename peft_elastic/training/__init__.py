"""Super-network training: subnetwork samplers, the `SubnetworkSamplingCallback` for the transformers `Trainer` and
TRL's `SFTTrainer`, and trainers that support multi-pass strategies (sandwich)."""

from .callback import SubnetworkSamplingCallback
from .samplers import (
    STRATEGIES,
    FixedSampler,
    GridParamsSampler,
    RandomLinearSampler,
    RandomSampler,
    SandwichSampler,
    SubnetworkSampler,
    make_sampler,
)
from .trainer import ElasticSFTTrainer, ElasticTrainer, ElasticTrainerMixin

__all__ = [
    "STRATEGIES",
    "ElasticSFTTrainer",
    "ElasticTrainer",
    "ElasticTrainerMixin",
    "FixedSampler",
    "GridParamsSampler",
    "RandomLinearSampler",
    "RandomSampler",
    "SandwichSampler",
    "SubnetworkSampler",
    "SubnetworkSamplingCallback",
    "make_sampler",
]
