"""How much of a QA-SparsePEFT adapter survives the INT grid: the integer codes its merge would change.

A QA-SparsePEFT update moves a weight only once `|ΔW / S| ≥ ½` (half a quantization step of its group): below that
the fake-quantized forward, and the merge, give back the base's code. An adapter trained at an ordinary LoRA learning
rate for a short run stays under that threshold almost everywhere and changes nothing (docs/quantization.md has the
measurements). `codes_changed` counts what the merge of the active adapter would write, without merging.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

#: The learning rate recommended for QA-SparsePEFT (rank-8 to rank-32 adapters on INT4 bases, AdamW): the smallest
#: rate measured to change codes and lower the loss within 30 steps on both SmolLM2-135M and the demo's base
#: (`benchmarks/qa_threshold.py`, docs/quantization.md). Float adapters learn at 3e-4; this one must move weights by
#: half a quantization step before anything changes.
QA_LEARNING_RATE = 2e-3


@dataclasses.dataclass(frozen=True)
class CodeChanges:
    """`changed` of the `total` integer weights of `layers` QA-SparsePEFT layers differ from the base's codes."""

    changed: int
    total: int
    layers: int

    @property
    def fraction(self) -> float:
        return self.changed / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.changed:,} of {self.total:,} codes changed ({self.fraction:.4%}) in {self.layers} layers"


@torch.no_grad()
def codes_changed(model: nn.Module) -> CodeChanges:
    """The integer codes that `merge_and_unload()` would change in `model`'s QA-SparsePEFT layers (active adapter, at
    the active subnetwork), counted layer by layer against the base's codes. Raises ValueError when `model` has no
    QA-SparsePEFT layer (a float SparsePEFT adapter merges without rounding)."""
    from .gptq import is_quant_aware_layer, quant_grid, transposed_mask
    from .quant_aware_linear import merged_codes

    changed = total = layers = 0
    for module in model.modules():
        if not is_quant_aware_layer(module) or module.merged:
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        grid = quant_grid(module)
        weight_a, weight_b = module.active_factors(adapters[0])
        new = merged_codes(grid, weight_a, weight_b, module.scaling[adapters[0]], transposed_mask(module))  # in × out
        old = grid.codes_into(torch.empty(new.shape, dtype=torch.float32, device=new.device))
        changed += int((new != old).sum())
        total += new.numel()
        layers += 1
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no unmerged QA-SparsePEFT layer with an active adapter: codes_changed needs "
            "a SparsePEFTConfig(..., quantization_aware=True) adapter on a GPTQ base."
        )
    return CodeChanges(changed, total, layers)
