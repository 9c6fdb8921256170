"""SparsePEFT on GPTQ bases (gptqmodel layers, loaded by transformers), in the elastic `GPTQLinear` layer.

GPTQ's error feedback fills pruned weights, so the mask cannot be read from the quantized layer: it comes from the
mask that `peft_elastic.quantize_gptq` stored next to the checkpoint (`SparsePEFTModel` reads it and gives it to
the layer, `set_sparsity_mask`).

- `SparsePEFTVariant` (SQFT with an FP adapter on an INT4 base, unmerged): `base(x) + s · x ((B A) ⊙ M)ᵀ`. Merging is
  refused: rounding the update to the GPTQ grid would lose most of it — train with `quantization_aware=True`.
- `QuantAwareVariant` (QA-SparsePEFT): the forward uses the fake-quantized merged weight (`quantized`), and the
  merge writes exactly those codes into `qweight`; `qzeros`, `scales` and `g_idx` are never written.
"""

from __future__ import annotations

import torch
from torch import nn

from ...quantization.layers import check_standard_layout, write_codes
from ...quantization.packing import pack_mask, unpack_mask
from .quant_aware_linear import QuantGrid, grid_of, merged_codes, quant_aware_low_rank_linear
from .variant import SparsePEFTVariant, sparsity_mask


def set_transposed_mask(layer: nn.Module) -> None:
    """Keep `Mᵀ` (in × out), the layer's mask in the GPTQ layout, beside it (bit-packed) for the QA forward."""
    layer.register_buffer("sparse_mask_t", pack_mask(sparsity_mask(layer).T.contiguous()), persistent=False)


def transposed_mask(layer: nn.Module) -> torch.Tensor:
    """`Mᵀ` (in × out, bool), the mask in the GPTQ layout."""
    return unpack_mask(layer.sparse_mask_t, layer.get_base_layer().out_features)


def quant_grid(layer: nn.Module) -> QuantGrid:
    """The grid of `layer`'s GPTQ base, rebuilt when one of its tensors is replaced (a device move) or written in
    place (`load_state_dict`): the key holds each tensor's address and version counter."""
    base = layer.get_base_layer()
    key = tuple((t.data_ptr(), t._version) for t in (base.qweight, base.qzeros, base.scales, base.g_idx))
    cached = layer.__dict__.get("_cached_grid")
    if cached is None or cached[0] != key:
        cached = layer.__dict__["_cached_grid"] = (key, grid_of(base))
    return cached[1]


def is_quant_aware_layer(module: nn.Module) -> bool:
    """Whether `module` is an adapter layer holding a QA-SparsePEFT adapter."""
    return any(isinstance(v, QuantAwareVariant) for v in getattr(module, "lora_variant", {}).values())


def _one_adapter_only(adapters) -> ValueError:
    return ValueError(
        f"A QA-SparsePEFT layer runs one adapter at a time (its weight is requantized with it); active: {adapters}. "
        "Use model.set_adapter(name)."
    )


class QuantAwareVariant(SparsePEFTVariant):
    """QA-SparsePEFT on a standard-layout gptqmodel layer (`TorchLinear`, or `TorchAtenLinear` kept in its
    trainable layout): forward with the fake-quantized merged weight, exact merge into `qweight`."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        check_standard_layout(module.get_base_layer())
        if getattr(module, "sparse_mask", None) is not None and getattr(module, "sparse_mask_t", None) is None:
            set_transposed_mask(module)  # a second adapter: the tuner gave the first one the mask

    @staticmethod
    def whole_forward(module, adapters: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(adapters) > 1 or kwargs.get("adapter_names") is not None:
            raise _one_adapter_only(adapters)
        adapter = adapters[0]
        weight_a, weight_b = module.active_factors(adapter)
        base = module.get_base_layer()
        out = quant_aware_low_rank_linear(
            x, weight_a, weight_b, module.scaling[adapter], quant_grid(module), module.sparse_mask_t, base.bias
        )
        return out.to(x.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        raise _one_adapter_only([a for a in module.active_adapters if a in module.lora_A])  # not the first active

    @staticmethod
    def check_merge_quantized(module) -> None:
        """QA-SparsePEFT merges exactly: nothing to refuse."""

    @staticmethod
    def merge_quantized(module, adapter_names: list[str]) -> None:
        """Write the codes of the QA forward into `qweight` (`qzeros`, `scales`, `g_idx` untouched)."""
        if len(adapter_names) > 1 or module.merged_adapters:
            raise ValueError(
                f"A QA-SparsePEFT layer merges one adapter into its integer weights; asked for {adapter_names} with "
                f"{module.merged_adapters} merged already."
            )
        adapter = adapter_names[0]
        base = module.get_base_layer()
        weight_a, weight_b = module.active_factors(adapter)
        codes = merged_codes(
            quant_grid(module), weight_a.detach(), weight_b.detach(), module.scaling[adapter], transposed_mask(module)
        )
        module._unmerged_qweight = base.qweight.data.clone()
        write_codes(base, codes)
        module.merged_adapters.append(adapter)

    @staticmethod
    def unmerge_quantized(module) -> None:
        module.get_base_layer().qweight.data.copy_(module._unmerged_qweight)
        module._unmerged_qweight = None
        module.merged_adapters.clear()
