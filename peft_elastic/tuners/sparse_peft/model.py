"""`SparsePEFTModel`: the elastic LoRA tuner whose layers compute with the SparsePEFT variant."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...quantization.layers import check_standard_layout, is_gptq_layer
from ...quantization.mask import MASK_FILE, find_mask_file, load_sparsity_mask
from ..elastic_lora.model import ElasticLoraModel
from .config import DENSE, SparsePEFTConfig
from .gptq import set_transposed_mask
from .variant import set_sparsity_mask


class SparsePEFTModel(ElasticLoraModel):
    """The tuner of `SparsePEFTConfig` adapters: the elastic LoRA layers with the SparsePEFT variant (the config's
    `layer_variant`); targeting, subnetworks, merging and saving as for ElasticLoRA. On GPTQ bases the mask comes
    from the checkpoint's `sparsity_mask.safetensors`, passed to each layer, and QA-SparsePEFT merges exactly."""

    def _create_new_module(self, config: SparsePEFTConfig, adapter_name: str, target: nn.Module, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        name = kwargs.get("target_name", "")
        gptq = is_gptq_layer(base_layer)
        if config.quantization_aware and not gptq:
            raise ValueError(
                f"quantization_aware=True trains against a GPTQ base's quantization grid, but module {name!r} is a "
                f"{type(base_layer).__name__}. Quantize the model with peft_elastic.quantize_gptq and load it with "
                "AutoModelForCausalLM.from_pretrained, or set quantization_aware=False."
            )
        if config.quantization_aware:
            check_standard_layout(base_layer, name)
        layer = super()._create_new_module(config, adapter_name, target, **kwargs)
        if gptq:  # GPTQ fills pruned weights: the mask of the float model, stored beside the checkpoint
            mask = self._gptq_masks(config).get(name)
            shape = (base_layer.out_features, base_layer.in_features)
            if mask is None:
                mask = torch.ones(shape, dtype=torch.bool)
            elif tuple(mask.shape) != shape:
                raise ValueError(f"The sparsity mask has shape {tuple(mask.shape)}, but this GPTQ layer is {shape}.")
            set_sparsity_mask(layer, mask.to(base_layer.qweight.device))
            if config.quantization_aware:
                set_transposed_mask(layer)
        return layer

    def _gptq_masks(self, config: SparsePEFTConfig) -> Mapping[str, torch.Tensor]:
        """`{module name: bool (out × in) mask}` for the GPTQ layers (layers without an entry keep every weight): the
        mask file, read one layer per access (`SparsityMaskFile`). Each layer takes its mask and keeps it bit-packed;
        the tuner keeps only the file's names, so no layer's mask is held twice, nor every layer's at once."""
        if config.sparsity_mask == DENSE:
            return {}
        if config.sparsity_mask is not None:
            path = Path(config.sparsity_mask)
        else:
            path, folder = find_mask_file(self.model)
            if path is None:
                raise ValueError(
                    "SparsePEFTConfig on a GPTQ base needs the sparsity mask of the float model (GPTQ fills "
                    "pruned weights, so it cannot be read from the quantized one), and there is no "
                    f"{MASK_FILE} in the folder the model was loaded from ({str(folder)!r}). Quantize with "
                    "peft_elastic.quantize_gptq, which writes it; or pass "
                    f"sparsity_mask='path/to/{MASK_FILE}'; or sparsity_mask={DENSE!r} for a base that is not sparse."
                )
        cached = getattr(self, "_mask_cache", None)
        if cached is None or cached[0] != path or cached[1].changed():  # read again if quantized again
            masks = load_sparsity_mask(path)
            names = {name for name, _ in self.model.named_modules()}
            unknown = sorted(set(masks) - names)
            if unknown:
                raise ValueError(
                    f"The sparsity mask {str(path)!r} names modules this model does not have ({unknown[:3]}): it "
                    "belongs to another model."
                )
            cached = self._mask_cache = (path, masks)
        return cached[1]
