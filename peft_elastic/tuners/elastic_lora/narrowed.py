"""The physically smaller model of a Mode B subnetwork, in memory: what `merge_and_unload()` returns for an adapter
whose subnetwork narrows the base, and what `peft_elastic.export_compressed_model` saves.

The adapters are folded into the base at the subnetwork's ranks, and every adapted linear layer keeps only the rows
and columns of the subnetwork's widths: the first MLP channels and the first attention heads (and their key/value
heads). Decoder blocks the subnetwork drops are left out and the others renumbered. When every layer has the same
width and the same number of heads, the model is a standard one whose config says so (`intermediate_size`,
`num_attention_heads`, `num_key_value_heads`, `head_dim`, `num_hidden_layers`). Otherwise — or when transformers'
config validation refuses those sizes (a hidden size that is not a multiple of the number of heads) — the config
records each module's shape (`peft_elastic_shapes`), from which `build_model` builds it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from peft import PeftModel
from torch import nn

from ...blocks import decoder_blocks
from ...fsdp import require_gathered
from .fingerprint import check_base_fingerprint
from .search_space import SearchSpace
from .space import WidthGroup

#: The config attribute that records per-module shapes `{module name: [out, in]}` of a non-uniform export.
SHAPES_KEY = "peft_elastic_shapes"


def compressed_state(
    model: PeftModel, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> tuple[object, dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """The config, the state dict (base parameter names) and the narrowed module shapes `{name: (out, in)}` of the
    compressed model of `subnetwork` (default: the active one). `model`: a PeftModel or its tuner. The model is not
    changed."""
    if not isinstance(model, PeftModel) and not isinstance(getattr(model, "model", None), nn.Module):
        raise ValueError(
            f"export_compressed_model needs a PeftModel with an elastic adapter, got {type(model).__name__}."
        )
    require_gathered(model, "export_compressed_model")
    space = SearchSpace.of(model, adapter_name)
    adapter_name, groups = space.adapter_name, space.groups
    chosen = space.validated(subnetwork)
    ranks, widths = space.module_ranks(chosen), space.widths(chosen)
    base = model.get_base_model() if isinstance(model, PeftModel) else model.model
    tuner = model.base_model if isinstance(model, PeftModel) else model
    fingerprint = tuner.peft_config[adapter_name].base_fingerprint
    if fingerprint:  # the subnetwork's widths are positions in the base the adapter was trained on
        check_base_fingerprint(base, fingerprint, adapter_name)
    state: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for name, layer in ((n, base.get_submodule(n)) for n in ranks):
            inner = layer.get_base_layer()
            if type(inner) is not nn.Linear:
                raise ValueError(
                    f"export_compressed_model folds adapters into torch.nn.Linear layers; {name!r} is a "
                    f"{type(inner).__name__} (quantized bases are exported with merge_and_unload)."
                )
            k, (out_width, in_width) = ranks[name], widths[name]
            weight = _upcast(inner.weight)
            if adapter_name not in layer.merged_adapters:
                a, b = (
                    _upcast(layer.lora_A[adapter_name].weight[:k]),
                    _upcast(layer.lora_B[adapter_name].weight[:, :k]),
                )
                weight = weight + layer.scaling[adapter_name] * (b @ a)
            state[f"{name}.weight"] = weight[:out_width, :in_width].to(inner.weight.dtype).contiguous()
            if inner.bias is not None:
                bias = _upcast(inner.bias)
                lora_bias = layer.lora_B[adapter_name].bias
                if lora_bias is not None and adapter_name not in layer.merged_adapters:
                    bias = bias + layer.scaling[adapter_name] * _upcast(lora_bias)
                state[f"{name}.bias"] = bias[:out_width].to(inner.bias.dtype).contiguous()
            if (out_width, in_width) != (inner.out_features, inner.in_features):
                shapes[name] = (out_width, in_width)
        adapted = tuple(f"{name}." for name in ranks)
        for key, value in base.state_dict().items():
            if ".lora_" in key or key.startswith(adapted):
                continue
            state[key.replace(".base_layer.", ".")] = value
    config = copy.deepcopy(base.config)
    dropped = space.dropped(chosen)
    if dropped:
        state, shapes = _without_blocks(base, config, dropped, state, shapes)
    uniform = _uniform_sizes(groups, chosen, adapter_name)
    if uniform is not None:
        candidate = copy.deepcopy(config)
        for key, value in uniform.items():
            setattr(candidate, key, value)
        if _valid(candidate) and _fits(candidate, state):
            return candidate, state, shapes
    setattr(config, SHAPES_KEY, {name: list(shape) for name, shape in shapes.items()})
    return config, state, shapes


def _without_blocks(base, config, dropped: list[str], state: dict, shapes: dict) -> tuple[dict, dict]:
    """`state` and `shapes` without the `dropped` decoder blocks, the others renumbered from 0; `config` updated
    (`num_hidden_layers`, and `layer_types` where the config has one)."""
    list_name, blocks = decoder_blocks(base)
    drop = {int(name.rsplit(".", 1)[1]) for name in dropped}
    kept = [i for i in range(len(blocks)) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = f"{list_name}."

    def rename(key: str) -> str | None:
        if not key.startswith(prefix):
            return key
        index, _, rest = key[len(prefix) :].partition(".")
        if int(index) in drop:
            return None
        return f"{prefix}{new_index[int(index)]}.{rest}" if rest else f"{prefix}{new_index[int(index)]}"

    state = {rename(key): value for key, value in state.items() if rename(key) is not None}
    shapes = {rename(key): value for key, value in shapes.items() if rename(key) is not None}
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        config.layer_types = [layer_types[i] for i in kept]
    return state, shapes


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in at least float32 (half precision is upcast for the fold; float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _valid(config) -> bool:
    """Whether transformers accepts `config` (its validators refuse, e.g., a hidden size that is not a multiple of
    the number of heads, even with an explicit `head_dim`)."""
    from huggingface_hub.errors import StrictDataclassError

    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except (StrictDataclassError, ValueError):
        return False
    return True


def _fits(config, state: dict[str, torch.Tensor]) -> bool:
    """Whether a model built from `config` has exactly the shapes of `state` (checked on the meta device)."""
    with torch.device("meta"):
        model = build_model(config, dtype=torch.float32)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    tied = tied_keys(model)
    if set(state) - set(expected) or set(expected) - set(state) - tied:
        return False
    return all(tuple(value.shape) == expected[key] for key, value in state.items())


def _uniform_sizes(groups, chosen, adapter_name) -> dict[str, int] | None:
    """The config sizes that describe every layer when all width groups of a kind agree (None when they do not; the
    caller also checks that the sizes fit every layer, e.g. that no layer was left out of the groups)."""
    sizes: dict[str, set[int]] = {"width": set(), "heads": set()}
    found: dict[str, list[WidthGroup]] = {"width": [], "heads": []}
    for name, group in groups.items():
        if isinstance(group, WidthGroup):
            sizes[group.kind].add(chosen.get(name, group.value(adapter_name)))
            found[group.kind].append(group)
    update: dict[str, int] = {}
    for kind, values in sizes.items():
        if not found[kind]:
            continue
        if len(values) != 1:
            return None
        value = values.pop()
        if kind == "width":
            update["intermediate_size"] = value
        else:
            group = found[kind][0]
            head_dim = group.producers[0][2]
            update |= {
                "num_attention_heads": value,
                "num_key_value_heads": value // group.per_kv,
                "head_dim": head_dim,
            }
    return update


def compressed_model(
    model: PeftModel, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> nn.Module:
    """The physically smaller model of `subnetwork` (default: the active one), in memory: the adapters folded in at
    its ranks, only its widths, heads and blocks kept. A standard transformers model of a standard config when every
    layer has the same sizes, else one whose config records the narrowed shapes (see the module docstring). It has
    the base's generation config and training mode; `model` (a PeftModel or its tuner) is not changed."""
    config, state, _ = compressed_state(model, subnetwork, adapter_name)
    compressed = build_model(config, dtype=next(iter(state.values())).dtype)
    missing, unexpected = compressed.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in tied_keys(compressed)]
    if missing or unexpected:
        raise RuntimeError(
            f"The compressed model does not fit its weights (missing {missing}, unexpected {unexpected})."
        )
    base = model.get_base_model() if isinstance(model, PeftModel) else model.model
    if getattr(base, "generation_config", None) is not None:
        compressed.generation_config = copy.deepcopy(base.generation_config)
    compressed.train(base.training)
    return compressed


def build_model(config, dtype: torch.dtype) -> nn.Module:
    """An (untrained) model of `config`, with the modules of `config.peft_elastic_shapes` narrowed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, (out_features, in_features) in (getattr(config, SHAPES_KEY, None) or {}).items():
        old = model.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        new = nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=old.weight.dtype)
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys of weights tied to another one (transformers restores them by tying)."""
    return set(getattr(model, "_tied_weights_keys", None) or ())
