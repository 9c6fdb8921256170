"""SparsePEFT on GPTQ bases (gptqmodel layers, loaded by transformers).

GPTQ's error feedback fills pruned weights, so the mask cannot be read from the quantized layer: it comes from the
mask that `peft_elastic.quantize_gptq` stored next to the checkpoint (`SparsePEFTModel` finds it and passes it in).

- `GPTQLinear` (SQFT with an FP adapter on an INT4 base, unmerged): `base(x) + s · x ((B A) ⊙ M)ᵀ`. Merging is
  refused: rounding the update to the GPTQ grid would lose most of it — train with `quantization_aware=True`.
- `QAGPTQLinear` (QA-SparsePEFT): the forward uses the fake-quantized merged weight (`quantized`), and the merge
  writes exactly those codes into `qweight`; `qzeros`, `scales` and `g_idx` are never written.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge

from ...quantization.layers import check_standard_layout, write_codes
from ...quantization.packing import pack_mask, unpack_mask
from ..elastic_lora.gptq import GPTQLinear as ElasticGPTQLinear
from .layer import SparsePEFTLayer
from .quantized import QuantGrid, grid_of, merged_codes, quant_aware_low_rank_linear


class GPTQLinear(SparsePEFTLayer, ElasticGPTQLinear):
    """SparsePEFT on a gptqmodel GPTQ layer: the base runs its own forward and the masked update is added.

    `sparsity_mask` is the bool (out × in) mask of the weights the float model kept (None: all kept)."""

    def __init__(self, base_layer, adapter_name: str, config, sparsity_mask: torch.Tensor | None = None, **kwargs):
        object.__setattr__(self, "_given_mask", sparsity_mask)  # read by update_layer, inside super().__init__
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        object.__setattr__(self, "_given_mask", None)

    def base_mask(self) -> torch.Tensor:
        base = self.get_base_layer()
        shape = (base.out_features, base.in_features)
        mask = self._given_mask
        if mask is None:
            return torch.ones(shape, dtype=torch.bool, device=base.qweight.device)
        if tuple(mask.shape) != shape:
            raise ValueError(f"The sparsity mask has shape {tuple(mask.shape)}, but this GPTQ layer is {shape}.")
        return mask.to(base.qweight.device)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "Cannot merge a SparsePEFT adapter trained without quantization_aware=True into GPTQ integer weights: "
            "rounding the update to the quantization grid would lose most of it. Keep the adapter unmerged, or "
            "train with SparsePEFTConfig(..., quantization_aware=True), whose merge is exact."
        )


class QAGPTQLinear(GPTQLinear):
    """QA-SparsePEFT on a standard-layout gptqmodel layer (`TorchLinear`, or `TorchAtenLinear` kept in its
    trainable layout): forward with the fake-quantized merged weight, exact merge into `qweight`."""

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if getattr(self, "sparse_mask_t", None) is None:
            base = self.get_base_layer()
            check_standard_layout(base)
            self.register_buffer("sparse_mask_t", pack_mask(self.mask().T.contiguous()), persistent=False)

    def _grid(self) -> QuantGrid:
        """The base's grid, rebuilt when one of its tensors is replaced (a device move) or written in place
        (`load_state_dict`): the key holds each tensor's address and version counter."""
        base = self.get_base_layer()
        key = tuple((t.data_ptr(), t._version) for t in (base.qweight, base.qzeros, base.scales, base.g_idx))
        cached = self.__dict__.get("_cached_grid")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_cached_grid"] = (key, grid_of(base))
        return cached[1]

    def mask_t(self) -> torch.Tensor:
        """`Mᵀ` (in × out, bool), the mask in the GPTQ layout."""
        return unpack_mask(self.sparse_mask_t, self.get_base_layer().out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters and self.merged:
            self.unmerge()  # as LoRA layers do: the base model without the adapter
        if self.disable_adapters or self.merged or not adapters:
            return base(x, *args, **kwargs)
        if len(adapters) > 1 or kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"A QA-SparsePEFT layer runs one adapter at a time (its weight is requantized with it); active: "
                f"{adapters}. Use model.set_adapter(name)."
            )
        adapter = adapters[0]
        weight_a, weight_b = self._factors(adapter)
        out = quant_aware_low_rank_linear(
            x, weight_a, weight_b, self.scaling[adapter], self._grid(), self.sparse_mask_t, base.bias
        )
        return out.to(x.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the codes of the QA forward into `qweight` (`qzeros`, `scales`, `g_idx` untouched)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged_adapters:
            raise ValueError(
                f"A QA-SparsePEFT layer merges one adapter into its integer weights; asked for {adapter_names} with "
                f"{self.merged_adapters} merged already."
            )
        adapter = adapter_names[0]
        base = self.get_base_layer()
        weight_a, weight_b = self._factors(adapter)
        codes = merged_codes(self._grid(), weight_a.detach(), weight_b.detach(), self.scaling[adapter], self.mask_t())
        self._unmerged_qweight = base.qweight.data.clone()
        write_codes(base, codes)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.get_base_layer().qweight.data.copy_(self._unmerged_qweight)
        self._unmerged_qweight = None
        self.merged_adapters.clear()
