"""`SparsePEFTModel`: the elastic LoRA tuner with SparsePEFT layers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ...fsdp import refuse_sharded
from ...quantization.layers import check_standard_layout, is_gptq_layer
from ...quantization.mask import MASK_FILE, load_sparsity_mask
from ..elastic_lora import layer as elastic_layer
from ..elastic_lora.model import ElasticLoraModel, elastic_class
from .config import DENSE, SparsePEFTConfig
from .layer import Linear


class SparsePEFTModel(ElasticLoraModel):
    """The tuner of `SparsePEFTConfig` adapters: targeting, subnetworks, merging and saving as for ElasticLoRA; on
    GPTQ bases the mask comes from the checkpoint's `sparsity_mask.safetensors` and QA-SparsePEFT merges exactly."""

    @staticmethod
    def _layer_class(base_layer: nn.Module) -> type | None:
        elastic = elastic_class(base_layer)
        if elastic is None:
            return None
        if elastic is elastic_layer.Linear:
            return Linear
        from ..elastic_lora import bnb as elastic_bnb
        from . import bnb

        if elastic is getattr(elastic_bnb, "Linear4bit", None):
            return bnb.Linear4bit
        if elastic is getattr(elastic_bnb, "Linear8bitLt", None):
            return bnb.Linear8bitLt
        raise ValueError(f"SparsePEFTConfig does not support {type(base_layer).__name__} bases.")

    def _create_new_module(self, config: SparsePEFTConfig, adapter_name: str, target: nn.Module, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        name = kwargs.get("target_name", "")
        if is_gptq_layer(base_layer):
            from .gptq import GPTQLinear, QAGPTQLinear

            if config.quantization_aware:
                check_standard_layout(base_layer, name)
            layer_cls = QAGPTQLinear if config.quantization_aware else GPTQLinear
            mask = self._gptq_masks(config).get(name)
            return layer_cls(target, adapter_name, config=config, sparsity_mask=mask, **kwargs)
        if config.quantization_aware:
            raise ValueError(
                f"quantization_aware=True trains against a GPTQ base's quantization grid, but module {name!r} is a "
                f"{type(base_layer).__name__}. Quantize the model with peft_elastic.quantize_gptq and load it with "
                "AutoModelForCausalLM.from_pretrained, or set quantization_aware=False."
            )
        return super()._create_new_module(config, adapter_name, target, **kwargs)

    def _gptq_masks(self, config: SparsePEFTConfig) -> Mapping[str, torch.Tensor]:
        """`{module name: bool (out × in) mask}` for the GPTQ layers (layers without an entry keep every weight): the
        mask file, read one layer per access (`SparsityMaskFile`). Each layer takes its mask and keeps it bit-packed;
        the tuner keeps only the file's names, so no layer's mask is held twice, nor every layer's at once."""
        if config.sparsity_mask == DENSE:
            return {}
        if config.sparsity_mask is not None:
            path = Path(config.sparsity_mask)
        else:
            from transformers.utils import cached_file

            folder = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", "")
            try:  # a local folder, or a hub model's files (from the cache, or downloaded if online)
                found = cached_file(folder, MASK_FILE, _raise_exceptions_for_missing_entries=False) if folder else None
            except OSError:
                found = None
            path = Path(found) if found else Path(folder) / MASK_FILE
            if not path.is_file():
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

    def _check_merge_allowed(self) -> None:
        """As for LoRA, except that GPTQ bases may be merged into when every adapted GPTQ layer is QA-SparsePEFT
        (whose merge is exact). Any other adapted GPTQ layer raises its reason here, before anything is merged."""
        from .gptq import GPTQLinear, QAGPTQLinear

        refuse_sharded(self.model, "Merging the adapter")
        if getattr(self.model, "quantization_method", None) != "gptq":
            return super()._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, GPTQLinear) and not isinstance(module, QAGPTQLinear):
                module.merge()  # raises: an adapter trained without quantization_aware=True
        BaseTuner._check_merge_allowed(self)
        if self.peft_config.get("layer_replication"):
            raise ValueError("Cannot merge LoRA layers when base model layers are replicated")
