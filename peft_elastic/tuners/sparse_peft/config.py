"""`SparsePEFTConfig` (SQFT): elastic LoRA whose update is masked by the base's sparsity, so merges keep it."""

from __future__ import annotations

from dataclasses import dataclass

from peft.utils import PeftType

from ..elastic_lora.config import ElasticLoraConfig


@dataclass
class SparsePEFTConfig(ElasticLoraConfig):
    """SparsePEFT (SQFT, Muñoz et al. 2024): the adapter update is `s · (B A) ⊙ M` with `M = (W ≠ 0)`, the nonzero
    pattern of the frozen base weight, so `merge_and_unload()` keeps every zero of a sparse base exactly.

    The rank is fixed (`rank_choices` defaults to `[r]`) or elastic (give `rank_choices`, e.g. `[16, 12, 8]`: the
    "SQFT + NLS" pipeline, with the whole subnetwork API and the samplers of `peft_elastic.training`). Everything
    else is `ElasticLoraConfig`. The mask is read from the base when the adapter is created or loaded and is not
    stored in the adapter file; sparsify the base first (`peft_elastic.sparsify`).
    """

    def __post_init__(self):
        if self.rank_choices is None:
            self.rank_choices = [self.r]
        super().__post_init__()
        if self.lora_bias:
            raise ValueError(
                "SparsePEFTConfig does not support lora_bias=True: a bias update would not keep the base's sparsity "
                "pattern meaningful for merges; leave lora_bias=False."
            )
        self.peft_type = PeftType.SPARSE_PEFT
