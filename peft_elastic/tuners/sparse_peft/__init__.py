"""SparsePEFT (SQFT): elastic LoRA whose update is masked by the base weight's sparsity pattern, as a variant of the
elastic layers (`SparsePEFTVariant`; `QuantAwareVariant` for QA-SparsePEFT on GPTQ bases)."""

from ...quantization.packing import pack_mask, unpack_mask
from ...scratch import clear_workspace, workspace_bytes
from .config import SparsePEFTConfig
from .gptq import QuantAwareVariant, is_quant_aware_layer
from .masked_linear import MaskedLowRankLinear, masked_low_rank_linear
from .model import SparsePEFTModel
from .variant import SparsePEFTVariant, is_sparse_peft_layer, set_sparsity_mask, sparsity_mask

__all__ = [
    "MaskedLowRankLinear",
    "QuantAwareVariant",
    "SparsePEFTConfig",
    "SparsePEFTModel",
    "SparsePEFTVariant",
    "clear_workspace",
    "is_quant_aware_layer",
    "is_sparse_peft_layer",
    "masked_low_rank_linear",
    "pack_mask",
    "set_sparsity_mask",
    "sparsity_mask",
    "unpack_mask",
    "workspace_bytes",
]
