"""SparsePEFT layers: elastic LoRA whose update is masked by the base weight's nonzero pattern.

The mask `M = (W ≠ 0)` is read from the base weight when the adapter is created (and so when an adapter is loaded,
since PEFT creates the layer first), bit-packed (1 bit per weight) into a non-persistent buffer, and never saved
with the adapter. On a dense float base the forward folds the update into the base matmul
(`MaskedLowRankLinear`); on quantized bases, with dropout or several active adapters, the base runs its own forward
and the masked update is added.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...quantization.packing import pack_mask, unpack_mask
from ..elastic_lora.layer import ElasticLoraLayer
from ..elastic_lora.layer import Linear as ElasticLinear
from .function import masked_low_rank_linear


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


class SparsePEFTLayer(ElasticLoraLayer):
    """Mixin (first in the bases) for SparsePEFT layers: the mask, the masked delta, forward and exact unmerge."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if getattr(self, "sparse_mask", None) is None:
            with torch.no_grad():
                mask = self.base_mask()
            self.sparse_in_features = mask.shape[1]
            self.register_buffer("sparse_mask", pack_mask(mask), persistent=False)
            if bool(mask.all()):
                warnings.warn(
                    f"The base weight of this {type(self.get_base_layer()).__name__} ({tuple(mask.shape)}) has no "
                    "zeros: the SparsePEFT mask is all ones and the adapter acts as plain LoRA. Sparsify the base "
                    "first (peft_elastic.sparsify).",
                    stacklevel=2,
                )

    def base_mask(self) -> torch.Tensor:
        """The bool (out × in) mask of the base weights to keep: `W ≠ 0` of the (dequantized) base weight."""
        return dense_weight(self.get_base_layer()) != 0

    # --------------------------------------------------------------------------------------------------- math

    def mask(self) -> torch.Tensor:
        """The bool (out × in) mask `W ≠ 0` of the base weight, as it was when the adapter was created."""
        return unpack_mask(self.sparse_mask, self.sparse_in_features)

    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`A[:k]`, `B[:, :k]` for the active rank `k` (the whole factors, without a slice, at full rank)."""
        k = self.active_rank(adapter)
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if k == weight_a.shape[0]:
            return weight_a, weight_b
        return weight_a[:k], weight_b[:, :k]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`s · (B[:, :k] A[:k]) ⊙ M` (transposed for Conv1D): the update that a merge adds."""
        delta = super().get_delta_weight(adapter)
        mask = self.mask()
        if getattr(self, "fan_in_fan_out", False):
            mask = mask.T
        return delta * mask.to(delta.dtype)

    def _masked_update(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        weight_a, weight_b = self._factors(adapter)
        x = self.lora_dropout[adapter](self._cast_input_dtype(x, weight_a.dtype))
        return masked_low_rank_linear(
            x, weight_a, weight_b, self.sparse_mask, self.sparse_in_features, self.scaling[adapter]
        )

    def _foldable(self, adapters: list[str]) -> bool:
        base = self.get_base_layer()
        if len(adapters) != 1 or not isinstance(self.lora_dropout[adapters[0]], nn.Identity):
            return False
        if self.lora_bias.get(adapters[0], False):
            return False
        weight = getattr(base, "weight", None)
        dense = (type(base) is nn.Linear or isinstance(base, Conv1D)) and weight is not None
        return dense and weight.dtype.is_floating_point and not hasattr(weight, "quant_state")

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not adapters or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        base = self.get_base_layer()
        if self._foldable(adapters) and not args and not kwargs:
            weight_a, weight_b = self._factors(adapters[0])
            out = masked_low_rank_linear(
                self._cast_input_dtype(x, weight_a.dtype),
                weight_a,
                weight_b,
                self.sparse_mask,
                self.sparse_in_features,
                self.scaling[adapters[0]],
                weight=dense_weight(base),
                bias=base.bias,
            )
            return out.to(base.weight.dtype)
        result = base(x, *args, **kwargs)
        dtype = result.dtype
        for adapter in adapters:
            result = result + self._masked_update(x, adapter).to(dtype)
            if self.lora_bias.get(adapter, False):
                result = result + self.lora_B[adapter].bias * self.scaling[adapter]
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        for key in VARIANT_KWARG_KEYS:  # LoRA-variant arguments, not for the base layer
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_A:
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            result[rows] += self._masked_update(x[rows], adapter).to(result.dtype)
        return result

    # ------------------------------------------------------------------------------------------ merge / unmerge

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        # Keep the exact base weight so that unmerging restores it bit for bit ((W + Δ) − Δ is not W in floats).
        if not self.merged_adapters and self._exact_unmerge_supported():
            self._unmerged_weight = self.get_base_layer().weight.data.detach().clone()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if not self.merged_adapters:
            self._unmerged_weight = None

    def unmerge(self) -> None:
        super().unmerge()
        saved = getattr(self, "_unmerged_weight", None)
        if saved is not None and not self.merged_adapters:
            self.get_base_layer().weight.data.copy_(saved)
            self._unmerged_weight = None

    def _exact_unmerge_supported(self) -> bool:
        weight = self.get_base_layer().weight
        return weight.dtype.is_floating_point and not hasattr(weight, "quant_state")

    def __repr__(self) -> str:
        return "sparse_peft." + super().__repr__().removeprefix("elastic_")


class Linear(SparsePEFTLayer, ElasticLinear):
    """SparsePEFT on `torch.nn.Linear` and transformers' `Conv1D`."""
