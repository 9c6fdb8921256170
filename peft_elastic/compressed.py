"""Exporting a Mode B subnetwork as a physically smaller model (`export_compressed_model`) and loading it back.

The adapters are folded into the base at the subnetwork's ranks, and every adapted linear layer keeps only the rows
and columns of the subnetwork's widths: the first MLP channels and the first attention heads (and their key/value
heads). Decoder blocks the subnetwork drops are left out and the others renumbered. When every layer has the same
width and the same number of heads, the checkpoint is a standard one whose config says so (`intermediate_size`,
`num_attention_heads`, `num_key_value_heads`, `head_dim`, `num_hidden_layers`), and
`AutoModelForCausalLM.from_pretrained` loads it. Otherwise — or when transformers' config validation refuses those
sizes (a hidden size that is not a multiple of the number of heads) — the config records each module's shape
(`peft_elastic_shapes`) and one line loads it: `peft_elastic.load_compressed_model(path)`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from .blocks import decoder_blocks
from .fsdp import full_parameters, require_gathered
from .io import export_directory
from .tuners.elastic_lora.fingerprint import check_base_fingerprint
from .tuners.elastic_lora.search_space import SearchSpace
from .tuners.elastic_lora.space import BlockGroup, WidthGroup

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
    space = SearchSpace(model, adapter_name)
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
        model = _build(config, dtype=torch.float32)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    tied = _tied_keys(model)
    if set(state) - set(expected) or set(expected) - set(state) - tied:
        return False
    return all(tuple(value.shape) == expected[key] for key, value in state.items())


def _uniform_sizes(groups, chosen, adapter_name) -> dict[str, int] | None:
    """The config sizes that describe every layer when all width groups of a kind agree (None when they do not; the
    caller also checks that the sizes fit every layer, e.g. that no layer was left out of the groups)."""
    sizes: dict[str, set[int]] = {"width": set(), "heads": set()}
    found: dict[str, list[WidthGroup]] = {"width": [], "heads": []}
    for name, group in groups.items():
        if isinstance(group, WidthGroup) and not isinstance(group, BlockGroup):
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
    compressed = _build(config, dtype=next(iter(state.values())).dtype)
    missing, unexpected = compressed.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in _tied_keys(compressed)]
    if missing or unexpected:
        raise RuntimeError(
            f"The compressed model does not fit its weights (missing {missing}, unexpected {unexpected})."
        )
    base = model.get_base_model() if isinstance(model, PeftModel) else model.model
    if getattr(base, "generation_config", None) is not None:
        compressed.generation_config = copy.deepcopy(base.generation_config)
    compressed.train(base.training)
    return compressed


def export_compressed_model(
    model: PeftModel,
    save_directory: str | os.PathLike,
    subnetwork: Mapping[str, int] | None = None,
    adapter_name: str | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Fold the adapters into the base at `subnetwork` (default: the active one), keep only its widths and heads,
    and save the smaller model (and `tokenizer`, if given) to `save_directory`, a new or empty folder (a non-empty
    one is refused unless `overwrite`, which replaces it whole). The folder is written under a temporary name,
    reloaded and checked, then renamed into place. Load it with `AutoModelForCausalLM.from_pretrained` when every
    layer has the same sizes, else with `peft_elastic.load_compressed_model`. A model sharded by FSDP: call it on
    every rank; the weights are gathered and rank 0 writes. Returns the directory."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"export_compressed_model needs a PeftModel with an elastic adapter, got {type(model).__name__}."
        )
    with full_parameters(model) as writes:
        if writes:
            _write_compressed(model, save_directory, subnetwork, adapter_name, tokenizer, overwrite)
    return Path(save_directory)


def _write_compressed(model, save_directory, subnetwork, adapter_name, tokenizer, overwrite) -> None:
    with export_directory(save_directory, overwrite) as staging:
        compressed = compressed_model(model, subnetwork, adapter_name)
        compressed.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        reloaded = load_compressed_model(staging)
        for key, value in compressed.state_dict().items():
            if not torch.equal(reloaded.state_dict()[key], value):
                raise RuntimeError(
                    f"The saved compressed model did not read back as written ({key}); nothing was saved."
                )


def load_compressed_model(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a model written by `export_compressed_model` (any sizes). `kwargs` go to `from_pretrained` (uniform
    sizes) or set `dtype`; a model with per-module shapes is built from its config, narrowed, then filled."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise ValueError(
                f"{str(path)!r} is an adapter folder (adapter_config.json), not a model: load it on its base with "
                "peft.PeftModel.from_pretrained(base, path), or write its compressed model with `peft-elastic export "
                "ADAPTER OUTPUT --base MODEL --as compressed` (peft_elastic.export_compressed_model) and load that "
                "folder."
            )
        raise ValueError(
            f"{str(path)!r} holds no config.json, so it is not a model folder: give the folder "
            "export_compressed_model (or save_pretrained) wrote."
        )
    config = AutoConfig.from_pretrained(path)
    if not getattr(config, SHAPES_KEY, None):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    model = _build(config, dtype=kwargs.get("dtype") or next(iter(state.values())).dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not hold the weights its config describes (missing {missing[:3]}).")
    model.eval()
    return model


def _build(config, dtype: torch.dtype) -> nn.Module:
    """An (untrained) model of `config`, with the modules of `config.peft_elastic_shapes` narrowed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, (out_features, in_features) in (getattr(config, SHAPES_KEY, None) or {}).items():
        old = model.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        new = nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=old.weight.dtype)
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys of weights tied to another one (transformers restores them by tying)."""
    return set(getattr(model, "_tied_weights_keys", None) or ())
