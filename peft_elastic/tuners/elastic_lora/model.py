"""`ElasticLoraModel`: finds the target modules and swaps them for elastic LoRA layers, reusing `LoraModel`."""

from __future__ import annotations

import difflib
import warnings

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...fsdp import refuse_sharded
from ...quantization.layers import is_gptq_layer, pin_standard_layout, save_in_checkpoint_format
from .bnb import disable_4bit_cpu_relayout
from .config import ElasticLoraConfig
from .fingerprint import base_fingerprint, check_base_fingerprint
from .layer import Linear
from .narrowed import compressed_model
from .search_space import SearchSpace, forget_search_spaces
from .space import block_groups, rank_groups, remove_block_hooks, width_groups
from .variant import GPTQ_MERGE_REFUSED


def _slices_base(config) -> bool:
    """Whether `config` is a Mode B elastic adapter (elastic widths, heads or droppable blocks of the base)."""
    return isinstance(config, ElasticLoraConfig) and bool(
        config.width_choices is not None or config.head_choices is not None or config.droppable_layers
    )


def elastic_class(base_layer: nn.Module) -> type | None:
    """The elastic layer class for `base_layer`, or None when it is not supported. Quantized types come first:
    bitsandbytes layers are `nn.Linear` subclasses."""
    if is_bnb_available():
        import bitsandbytes as bnb

        from .bnb import Linear8bitLt

        if isinstance(base_layer, bnb.nn.Linear8bitLt):
            return Linear8bitLt
    if is_bnb_4bit_available():
        import bitsandbytes as bnb

        from .bnb import Linear4bit

        if isinstance(base_layer, bnb.nn.Linear4bit):
            return Linear4bit
    if is_gptq_layer(base_layer):
        from .gptq import GPTQLinear

        return GPTQLinear
    if isinstance(base_layer, (nn.Linear, Conv1D)):
        return Linear
    return None


def _warn_unmatched_targets(model: nn.Module, config: ElasticLoraConfig, prefix: str) -> None:
    """Warn about the entries of a list-form `config.target_modules` that match no module of `model` (as PEFT
    matches them: the full name, or its last dotted components), naming the closest module names. PEFT raises only
    when no entry matches; a typo next to a matching entry would otherwise adapt fewer modules, silently."""
    targets = config.target_modules
    if targets is None or isinstance(targets, str):
        return
    names = [
        name
        for name, _ in model.named_modules()
        if name and not any(part == "base_layer" or part.startswith(prefix) for part in name.split("."))
    ]
    unmatched = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
    if not unmatched:
        return
    details = []
    for entry in unmatched:
        depth = entry.count(".") + 1  # compare with module names of as many dotted components
        suffixes = list(dict.fromkeys(".".join(name.split(".")[-depth:]) for name in names))
        close = difflib.get_close_matches(entry, suffixes, n=3)
        shown = ", ".join(repr(c) for c in close) if close else "none close"
        details.append(f"{entry!r} (closest module names: {shown})")
    matched = sorted(set(targets) - set(unmatched))
    several = len(unmatched) > 1
    entries, match, adapt, those = (
        ("entries", "match", "adapt", "those") if several else ("entry", "matches", "adapts", "that")
    )
    warnings.warn(
        f"{type(config).__name__} target_modules {entries} {unmatched} {match} no module of the model and {adapt} "
        f"nothing: {', '.join(details)}. Only the modules matching {matched} are adapted; fix or remove {those} "
        f"{entries}.",
        RuntimeWarning,
        stacklevel=2,
    )


class ElasticLoraModel(LoraModel):
    """The tuner of `ElasticLoraConfig` adapters. Targeting, merging, unloading, multiple adapters, quantized bases
    and saving work as for LoRA; only the layers are elastic (see `peft_elastic.tuners.elastic_lora.layer`)."""

    @classmethod
    def _create_new_module(cls, config: ElasticLoraConfig, adapter_name: str, target: nn.Module, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = elastic_class(base_layer)
        if layer_cls is None:
            raise ValueError(
                f"Module {kwargs.get('target_name', '')!r} of type {type(base_layer).__name__} cannot take an elastic "
                "LoRA adapter; supported: torch.nn.Linear, transformers Conv1D, bitsandbytes Linear8bitLt/Linear4bit "
                "and gptqmodel quantized linear layers. Remove it from target_modules."
            )
        if issubclass(layer_cls, Linear):
            # Conv1D stores its weight transposed; mirror LoRA's handling of fan_in_fan_out.
            is_conv1d = isinstance(base_layer, Conv1D)
            if config.fan_in_fan_out != is_conv1d:
                warnings.warn(
                    f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(base_layer).__name__}; "
                    f"setting it to {is_conv1d}.",
                    stacklevel=2,
                )
                config.fan_in_fan_out = is_conv1d
            kwargs["is_target_conv_1d_layer"] = is_conv1d
        return layer_cls(target, adapter_name, config=config, **kwargs)

    def _prepare_model(self, peft_config: ElasticLoraConfig, model: nn.Module) -> None:
        super()._prepare_model(peft_config, model)
        # Quantized bases stay in the layouts that pass gradients, merge and save correctly (no-ops without them).
        disable_4bit_cpu_relayout(model)
        for module in model.modules():
            if is_gptq_layer(module):
                pin_standard_layout(module)
        save_in_checkpoint_format(model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """As for LoRA, with a Mode B adapter's base fingerprint (`config.base_fingerprint`): one that came with the
        config (a loaded adapter) is checked against `model` before anything is changed, and a fresh adapter (or one
        saved without it) gets the fingerprint of `model`. Every path that adds an adapter comes here
        (`get_peft_model`, `PeftModel.from_pretrained`/`load_adapter`/`add_adapter`, transformers' `load_adapter`)."""
        config = self.peft_config[adapter_name]
        taken_here = getattr(config, "_fingerprint_taken_here", False)
        if _slices_base(config) and config.base_fingerprint is not None and not taken_here:
            check_base_fingerprint(model, config.base_fingerprint, adapter_name)  # before the base is changed
        forget_search_spaces(self)  # the layers change: every kept SearchSpace is rebuilt on its next use
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        _warn_unmatched_targets(model, config, self.prefix)  # PEFT raised already if no entry matched
        if _slices_base(config) and (config.base_fingerprint is None or taken_here):
            self._take_base_fingerprint(model, config, adapter_name)

    @staticmethod
    def _take_base_fingerprint(model: nn.Module, config: ElasticLoraConfig, adapter_name: str) -> None:
        """Record in `config` the fingerprint of the base weights of the adapter's elastic producers and of the first
        adapted layer of each droppable block. `config` remembers that it was taken here: a fresh config reused for
        another `get_peft_model` is fingerprinted again, not checked."""
        groups = width_groups(model, config, adapter_name).values()
        layers = {name: layer for group in groups for name, layer, _ in group.producers}
        names = {id(module): name for name, module in model.named_modules()}
        for group in block_groups(model, config, adapter_name).values():
            layers.setdefault(names[id(group.holder)], group.holder)
        config.base_fingerprint = base_fingerprint(layers) or None
        config._fingerprint_taken_here = True

    def _post_injection_hook(self, model: nn.Module, config: ElasticLoraConfig, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        rank_groups(model, config, adapter_name)  # fail early on inconsistent groups or width choices
        width_groups(model, config, adapter_name)
        block_groups(model, config, adapter_name)  # also installs the blocks' skip hooks

    def _check_merge_allowed(self) -> None:
        """As for LoRA, except that a GPTQ base may be merged into when every adapter of every adapted GPTQ layer
        merges exactly into its integer weights (QA-SparsePEFT): any other raises its reason here, before anything
        is merged (this check cannot tell which adapters will be merged, so it asks about all). LoraModel's own check
        refuses every GPTQ model, so on one only PEFT's generic checks and its replicated-layers check are run."""
        from .gptq import GPTQLinear

        refuse_sharded(self.model, "Merging the adapter")
        if getattr(self.model, "quantization_method", None) != "gptq":
            return super()._check_merge_allowed()
        layers = [module for module in self.model.modules() if isinstance(module, GPTQLinear)]
        if not layers:
            raise ValueError(GPTQ_MERGE_REFUSED)
        for layer in layers:
            layer.check_merge(list(layer.lora_A))
        BaseTuner._check_merge_allowed(self)
        if self.peft_config.get("layer_replication"):
            raise ValueError("Cannot merge LoRA layers when base model layers are replicated")

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """As for LoRA: the base with the active subnetwork of the adapters merged in. When that subnetwork narrows the
        base or drops blocks of it (Mode B), the physically smaller model it stands for, as
        `peft_elastic.export_compressed_model` writes it (a standard transformers model when every layer has the same
        sizes): a full-size merge would not compute what the subnetwork computes. This model is then left as it
        was."""
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        elastic = [name for name in names if isinstance(self.peft_config.get(name), ElasticLoraConfig)]
        narrowing = [name for name in elastic if SearchSpace.of(self, name).removed_from_base({})]
        if not narrowing:
            return super().merge_and_unload(
                progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
            )
        if len(names) > 1:
            raise ValueError(
                f"Adapter {narrowing[0]!r}'s subnetwork narrows the base (Mode B), so merging it gives a smaller model"
                f" that no other adapter fits; merge it alone (adapter_names=[{narrowing[0]!r}]), not with {names}."
            )
        self._check_merge_allowed()
        model = compressed_model(self, adapter_name=narrowing[0])
        if safe_merge:
            broken = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
            if broken:
                raise ValueError(f"NaNs detected in the merged weights ({broken[0]}); the adapter seems broken.")
        return model

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        remove_block_hooks(model)
        forget_search_spaces(self)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        forget_search_spaces(self)

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError(
            "add_weighted_adapter is not available for elastic adapters, whose rank changes with the subnetwork. "
            "Export fixed-rank adapters with peft_elastic.export_sub_adapter and combine them with stock PEFT LoRA."
        )
