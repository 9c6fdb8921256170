"""Super-network training: subnetwork samplers, the `SubnetworkSamplingCallback` for the transformers `Trainer` and
TRL's `SFTTrainer`, trainers that support multi-pass strategies (sandwich), and `QuantizationAwareCallback`
(QA-SparsePEFT's changed INT codes, with a warning when the learning rate is too small for the grid)."""

from .callback import SubnetworkSamplingCallback
from .qa_monitor import QuantizationAwareCallback
from .samplers import (
    SAMPLER_CLASSES,
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
    "SAMPLER_CLASSES",
    "ElasticSFTTrainer",
    "ElasticTrainer",
    "ElasticTrainerMixin",
    "FixedSampler",
    "GridParamsSampler",
    "QuantizationAwareCallback",
    "RandomLinearSampler",
    "RandomSampler",
    "SandwichSampler",
    "SubnetworkSampler",
    "SubnetworkSamplingCallback",
    "make_sampler",
]
