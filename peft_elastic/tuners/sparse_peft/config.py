"""`SparsePEFTConfig` (SQFT): elastic LoRA whose update is masked by the base's sparsity, so merges keep it."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.utils import PeftType

from ..elastic_lora.config import ElasticLoraConfig

#: `sparsity_mask` value for a GPTQ base that is not sparse: every weight may change.
DENSE = "dense"


@dataclass
class SparsePEFTConfig(ElasticLoraConfig):
    """SparsePEFT (SQFT, Muñoz et al. 2024): the adapter update is `s · (B A) ⊙ M` with `M = (W ≠ 0)`, the nonzero
    pattern of the frozen base weight, so `merge_and_unload()` keeps every zero of a sparse base exactly.

    The rank is fixed (`rank_choices` defaults to `[r]`) or elastic (give `rank_choices`, e.g. `[16, 12, 8]`: the
    "SQFT + NLS" pipeline, with the whole subnetwork API and the samplers of `peft_elastic.training`). Everything
    else is `ElasticLoraConfig`. On a float or bitsandbytes base the mask is read from the base when the adapter is
    created or loaded and is not stored in the adapter file; sparsify the base first (`peft_elastic.sparsify`).

    On a GPTQ base (gptqmodel layers, quantized with `peft_elastic.quantize_gptq`) the mask is the one stored next to
    the checkpoint (`sparsity_mask`), and `quantization_aware=True` gives QA-SparsePEFT: training against the frozen
    GPTQ grid and an exact `merge_and_unload()` into the integer weights.
    """

    quantization_aware: bool = field(
        default=False,
        metadata={
            "help": (
                "QA-SparsePEFT, for GPTQ bases: the forward uses the merged weight fake-quantized on the "
                "base's frozen scales and zero-points (straight-through estimator), so that merge_and_unload() "
                "writes exactly that weight into the INT2/4/8 layers. Needs lora_dropout=0."
            )
        },
    )
    sparsity_mask: str | None = field(
        default=None,
        metadata={
            "help": (
                "GPTQ bases only: where the sparsity mask of the float model is, i.e. the sparsity_mask.safetensors "
                "that peft_elastic.quantize_gptq wrote (a file or its folder). Default: the one in the folder the "
                "base model was loaded from. 'dense' for a GPTQ base that is not sparse (every weight may change)."
            )
        },
    )

    def __post_init__(self):
        if self.rank_choices is None:
            self.rank_choices = [self.r]
        super().__post_init__()
        if self.lora_bias:
            raise ValueError(
                "SparsePEFTConfig does not support lora_bias=True: a bias update would not keep the base's sparsity "
                "pattern meaningful for merges; leave lora_bias=False."
            )
        if self.width_choices is not None or self.head_choices is not None:
            raise ValueError(
                "SparsePEFTConfig does not take width_choices/head_choices: its masked update folds into the full "
                "base weight. For elastic widths or heads (LoNAS, Mode B) use ElasticLoraConfig."
            )
        if not isinstance(self.quantization_aware, bool):
            raise ValueError(f"quantization_aware must be True or False, got {self.quantization_aware!r}.")
        if self.quantization_aware and self.lora_dropout:
            raise ValueError(
                f"quantization_aware=True needs lora_dropout=0 (got {self.lora_dropout}): the adapter is folded into "
                "the quantized weight, so its input cannot be dropped out separately from the base's."
            )
        if self.sparsity_mask is not None and not isinstance(self.sparsity_mask, str):
            self.sparsity_mask = str(self.sparsity_mask)  # a Path: stored as text in adapter_config.json
        self.peft_type = PeftType.SPARSE_PEFT

    def layer_variant(self):
        """The variant the elastic layers compute this adapter with: SparsePEFT, or QA-SparsePEFT."""
        if self.quantization_aware:
            from .gptq import QuantAwareVariant

            return QuantAwareVariant()
        from .variant import SparsePEFTVariant

        return SparsePEFTVariant()
