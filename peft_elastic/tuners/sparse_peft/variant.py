"""SparsePEFT as a variant of the elastic LoRA layers: the update masked by the base weight's nonzero pattern.

The layer classes are the elastic ones (one per base backend); a SparsePEFT adapter has a `SparsePEFTVariant` in
the layer's `lora_variant`, and the layer holds the mask `M = (W ≠ 0)`, given to it by `set_sparsity_mask`:
bit-packed (1 bit per weight) into a non-persistent buffer, shared by the layer's SparsePEFT adapters and never
saved with them. On a float or bitsandbytes base the variant reads the mask from the base weight when the first
adapter is created (and so when an adapter is loaded, since PEFT creates the layer first); on a GPTQ base the tuner
passes the mask stored next to the checkpoint. On a dense float base the forward folds the update into the base
matmul (`MaskedLowRankLinear`); on quantized bases, with dropout or several active adapters, the base runs its own
forward and the masked update is added.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...blocks import is_gptq_layer
from ...quantization.packing import pack_mask, unpack_mask
from ..elastic_lora.variant import ElasticVariant
from .masked_linear import masked_low_rank_linear


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float (out × in) tensor: dequantized for bitsandbytes, transposed for Conv1D."""
    weight = base_layer.weight
    if hasattr(weight, "quant_state"):  # bitsandbytes 4-bit
        import bitsandbytes as bnb

        from ..elastic_lora.bnb import restore_4bit_layout

        restore_4bit_layout(weight)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if weight.dtype == torch.int8:  # bitsandbytes 8-bit: zero codes are zero weights
        return weight.data
    return weight.T if isinstance(base_layer, Conv1D) else weight


def set_sparsity_mask(layer: nn.Module, mask: torch.Tensor) -> None:
    """Give `layer` the bool (out × in) `mask` of the base weights its SparsePEFT adapters may change (bit-packed, not
    saved with the adapter). Warns when the mask keeps every weight: the adapter then acts as plain LoRA."""
    layer.sparse_in_features = mask.shape[1]
    layer.register_buffer("sparse_mask", pack_mask(mask), persistent=False)
    if bool(mask.all()):
        warnings.warn(
            f"The base weight of this {type(layer.get_base_layer()).__name__} ({tuple(mask.shape)}) has no zeros: "
            "the SparsePEFT mask is all ones and the adapter acts as plain LoRA. Sparsify the base first "
            "(peft_elastic.sparsify).",
            stacklevel=3,
        )


def sparsity_mask(layer: nn.Module) -> torch.Tensor:
    """The bool (out × in) mask `W ≠ 0` of `layer`'s base weight, as it was when its SparsePEFT adapter was created."""
    packed = getattr(layer, "sparse_mask", None)
    if packed is None:
        raise ValueError(f"This {type(layer).__name__} has no SparsePEFT mask: it holds no SparsePEFTConfig adapter.")
    return unpack_mask(packed, layer.sparse_in_features)


def is_sparse_peft_layer(module: nn.Module) -> bool:
    """Whether `module` is an adapter layer holding a SparsePEFT (or QA-SparsePEFT) adapter."""
    return any(isinstance(v, SparsePEFTVariant) for v in getattr(module, "lora_variant", {}).values())


def _masked_update(module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """`s · x ((B A) ⊙ M)ᵀ` of `adapter` at its active rank, after its dropout."""
    weight_a, weight_b = module.active_factors(adapter)
    x = module.lora_dropout[adapter](module._cast_input_dtype(x, weight_a.dtype))
    return masked_low_rank_linear(
        x, weight_a, weight_b, module.sparse_mask, module.sparse_in_features, module.scaling[adapter]
    )


def _foldable(module, adapters: list[str]) -> bool:
    """Whether the update of `adapters` folds into the base matmul: one adapter without dropout or bias, on a dense
    float `torch.nn.Linear` or Conv1D."""
    base = module.get_base_layer()
    if len(adapters) != 1 or not isinstance(module.lora_dropout[adapters[0]], nn.Identity):
        return False
    if module.lora_bias.get(adapters[0], False):
        return False
    weight = getattr(base, "weight", None)
    dense = (type(base) is nn.Linear or isinstance(base, Conv1D)) and weight is not None
    return dense and weight.dtype.is_floating_point and not hasattr(weight, "quant_state")


def _exact_unmerge_supported(module) -> bool:
    weight = module.get_base_layer().weight
    return weight.dtype.is_floating_point and not hasattr(weight, "quant_state")


class SparsePEFTVariant(ElasticVariant):
    """SparsePEFT (SQFT): `ΔW = s · (B A) ⊙ M`, in the forward, the merge and the exact unmerge."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        """Read the mask from the base weight, for the layer's first SparsePEFT adapter (a GPTQ base's comes from
        the tuner, `set_sparsity_mask`: GPTQ fills pruned weights)."""
        if getattr(module, "sparse_mask", None) is None and not is_gptq_layer(module.get_base_layer()):
            with torch.no_grad():
                set_sparsity_mask(module, dense_weight(module.get_base_layer()) != 0)

    @staticmethod
    def delta_weight(module, adapter: str, delta: torch.Tensor) -> torch.Tensor:
        """`s · (B[:, :k] A[:k]) ⊙ M` (transposed for Conv1D): the update that a merge adds."""
        mask = sparsity_mask(module)
        if getattr(module, "fan_in_fan_out", False):
            mask = mask.T
        return delta * mask.to(delta.dtype)

    @staticmethod
    def whole_forward(module, adapters: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
        """`x (W + s · (B A) ⊙ M)ᵀ + b` in one matmul when the update folds (see `_foldable`), else None."""
        if args or kwargs or not _foldable(module, adapters):
            return None
        base = module.get_base_layer()
        weight_a, weight_b = module.active_factors(adapters[0])
        out = masked_low_rank_linear(
            module._cast_input_dtype(x, weight_a.dtype),
            weight_a,
            weight_b,
            module.sparse_mask,
            module.sparse_in_features,
            module.scaling[adapters[0]],
            weight=dense_weight(base),
            bias=base.bias,
        )
        return out.to(base.weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        return result + _masked_update(module, active_adapter, x).to(result.dtype)

    # The first merge into a float base keeps the exact base weight, so that unmerging restores it bit for bit
    # ((W + Δ) − Δ is not W in floats). PEFT appends to `merged_adapters` after a merge and pops before an unmerge.

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        if not module.merged_adapters and _exact_unmerge_supported(module):
            module._unmerged_weight = orig_weight  # PEFT's copy of the base weight; the merged one is a new tensor
        return ElasticVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        if not module.merged_adapters and _exact_unmerge_supported(module):
            module._unmerged_weight = orig_weight.data.detach().clone()
        ElasticVariant.merge_unsafe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        saved = getattr(module, "_unmerged_weight", None)
        if saved is not None and not module.merged_adapters:
            module._unmerged_weight = None
            return saved
        return ElasticVariant.unmerge(module, active_adapter, orig_weight)

    @staticmethod
    def check_merge_quantized(module) -> None:
        raise ValueError(
            "Cannot merge a SparsePEFT adapter trained without quantization_aware=True into GPTQ integer weights: "
            "rounding the update to the quantization grid would lose most of it. Keep the adapter unmerged, or "
            "train with SparsePEFTConfig(..., quantization_aware=True), whose merge is exact."
        )
