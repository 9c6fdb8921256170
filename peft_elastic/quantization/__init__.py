"""GPTQ quantization (through gptqmodel) that keeps a sparse model's zeros, the GPTQ packed layout, and the
sparsity mask stored with a quantized checkpoint."""

from .gptq import QuantizationReport, quantize_gptq
from .mask import MASK_FILE, load_sparsity_mask, save_sparsity_mask
from .packing import GPTQ_BITS, dequantize, pack_cols, pack_rows, unpack_cols, unpack_rows, zero_points

__all__ = [
    "MASK_FILE",
    "GPTQ_BITS",
    "QuantizationReport",
    "dequantize",
    "load_sparsity_mask",
    "pack_cols",
    "pack_rows",
    "quantize_gptq",
    "save_sparsity_mask",
    "unpack_cols",
    "unpack_rows",
    "zero_points",
]
