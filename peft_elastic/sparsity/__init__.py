"""Sparsification of a base model before fine-tuning: Wanda and magnitude scores, unstructured or N:M."""

from .patterns import Pattern, keep_mask, parse_pattern
from .sparsify import PRUNING_METHODS, SparsityReport, measure_sparsity, save_sparsified, sparsify

__all__ = [
    "PRUNING_METHODS",
    "Pattern",
    "SparsityReport",
    "keep_mask",
    "measure_sparsity",
    "parse_pattern",
    "save_sparsified",
    "sparsify",
]
