"""SparsePEFT (SQFT): elastic LoRA whose update is masked by the base weight's sparsity pattern."""

from ...quantization.packing import pack_mask, unpack_mask
from .config import SparsePEFTConfig
from .function import MaskedLowRankLinear, masked_low_rank_linear
from .layer import SparsePEFTLayer
from .model import SparsePEFTModel
from .workspace import clear_workspace, workspace_bytes

__all__ = [
    "MaskedLowRankLinear",
    "SparsePEFTConfig",
    "SparsePEFTLayer",
    "SparsePEFTModel",
    "masked_low_rank_linear",
    "pack_mask",
    "clear_workspace",
    "unpack_mask",
    "workspace_bytes",
]
