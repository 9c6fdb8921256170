"""The search space of an elastic adapter: which modules share one rank choice (a *rank group*) and its choices, and
(Mode B) the elastic widths of MLP blocks and attention heads (*width groups*)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ElasticLoraConfig
from .layer import ElasticLoraLayer


@dataclass(frozen=True)
class RankGroup:
    """Modules that always use the same rank, and the ranks they may use (descending)."""

    name: str
    choices: tuple[int, ...]
    modules: tuple[tuple[str, ElasticLoraLayer], ...]  # (module name in the base model, layer)


def rank_groups(model: nn.Module, config: ElasticLoraConfig, adapter_name: str) -> dict[str, RankGroup]:
    """The rank groups of `adapter_name` in `model` (the tuner's wrapped model), in module order.

    A group's name is readable and stable: the module name for a group of one module, else the parent module's name
    followed by the member suffixes in `config.rank_groups` order, e.g.
    `model.layers.0.self_attn.q_proj+k_proj+v_proj`.
    """
    suffix_to_group = {suffix: index for index, group in enumerate(config.rank_groups) for suffix in group}
    buckets: dict[tuple[str, int | None], list[tuple[str, str, ElasticLoraLayer]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, ElasticLoraLayer) or adapter_name not in module.lora_A:
            continue
        parent, _, leaf = name.rpartition(".")
        index = suffix_to_group.get(leaf)
        key = (parent, index) if index is not None else (name, None)
        buckets.setdefault(key, []).append((leaf, name, module))

    groups: dict[str, RankGroup] = {}
    for (parent, index), members in buckets.items():
        if index is None:
            group_name = members[0][1]
        else:
            order = config.rank_groups[index]
            members.sort(key=lambda member: order.index(member[0]))
            leaves = "+".join(leaf for leaf, _, _ in members)
            group_name = f"{parent}.{leaves}" if parent else leaves
        choices = {name: tuple(config.rank_choices_for(name)) for _, name, _ in members}
        if len(set(choices.values())) > 1:
            raise ValueError(
                f"The modules of rank group {group_name!r} have different rank choices {choices}; give them the same "
                "rank_choices_pattern entry, or take them out of the same entry of rank_groups."
            )
        groups[group_name] = RankGroup(
            name=group_name,
            choices=next(iter(choices.values())),
            modules=tuple((name, module) for _, name, module in members),
        )
    return groups


# ------------------------------------------------------------------------------------------ widths (Mode B)


@dataclass(frozen=True)
class WidthGroup:
    """An elastic width of one parent module (Mode B): its `choices` (MLP intermediate channels, or query heads),
    the `producers` whose first outputs it keeps — `(module name, layer, outputs per unit of the choice)` — and the
    `consumers`, whose inputs narrow with them (they read the width from their input)."""

    name: str
    kind: str  # "width" | "heads"
    choices: tuple[int, ...]
    producers: tuple[tuple[str, ElasticLoraLayer, int], ...]
    consumers: tuple[tuple[str, ElasticLoraLayer], ...]

    def value(self, adapter_name: str) -> int:
        """The active choice of `adapter_name`."""
        _, layer, unit = self.producers[0]
        return layer.active_out_features(adapter_name) // unit

    def apply(self, adapter_name: str, value: int) -> None:
        """Make `value` the active choice of `adapter_name` (the full size resets the producers to all outputs)."""
        for _, layer, unit in self.producers:
            layer.set_active_out_features(adapter_name, value * unit)

    def widths(self, value: int) -> dict[str, tuple[int | None, int | None]]:
        """`{module name: (output width, input width)}` of its modules at `value` (None: unchanged)."""
        out = {name: (value * unit, None) for name, _, unit in self.producers}
        consumer_in = value * self.producers[0][2]
        return out | {name: (None, consumer_in) for name, _ in self.consumers}


def width_groups(model: nn.Module, config: ElasticLoraConfig, adapter_name: str) -> dict[str, WidthGroup]:
    """The width groups of `adapter_name` in `model`, in module order: one per parent module that holds the MLP
    producers/consumers of `config.width_modules` (if `config.width_choices`) or the attention projections of
    `config.head_modules` (if `config.head_choices`)."""
    specs = []
    if config.width_choices is not None:
        specs.append(("width", config.width_choices, config.width_modules))
    if config.head_choices is not None:
        specs.append(("heads", config.head_choices, config.head_modules))
    if not specs:
        return {}
    children: dict[str, dict[str, tuple[str, ElasticLoraLayer]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, ElasticLoraLayer) and adapter_name in module.lora_A:
            parent, _, leaf = name.rpartition(".")
            children.setdefault(parent, {})[leaf] = (name, module)
    groups = {}
    for parent, members in children.items():
        for kind, choices, (producers, consumers) in specs:
            wanted = producers + consumers
            present = [suffix for suffix in wanted if suffix in members]
            if not present:
                continue
            missing = [suffix for suffix in wanted if suffix not in members]
            if missing:
                raise ValueError(
                    f"{'width_choices' if kind == 'width' else 'head_choices'} makes {parent!r} elastic, which needs "
                    f"{wanted} adapted, but {missing} are not in target_modules; add them (or change "
                    f"{'width_modules' if kind == 'width' else 'head_modules'})."
                )
            layers = {suffix: members[suffix] for suffix in wanted}
            for name, layer in layers.values():
                base = layer.get_base_layer()
                if type(base) is not nn.Linear or not hasattr(layer, "set_active_out_features"):
                    raise ValueError(
                        f"Elastic widths slice torch.nn.Linear layers; {name!r} is a {type(base).__name__}. "
                        "Quantized and Conv1D bases do not take width_choices/head_choices."
                    )
            if kind == "width":
                group = _mlp_group(parent, choices, layers, producers, consumers)
            else:
                owner = model.get_submodule(parent)
                group = _head_group(parent, choices, layers, producers, consumers, getattr(owner, "head_dim", None))
            groups[group.name] = group
    for kind, _, (producers, consumers) in specs:
        if not any(name.endswith(f":{kind}") for name in groups):
            option = "width_choices" if kind == "width" else "head_choices"
            raise ValueError(
                f"{option} is set but no adapted module is one of {producers + consumers} (target_modules decides): "
                f"nothing would be elastic. Add them to target_modules, or change "
                f"{'width_modules' if kind == 'width' else 'head_modules'}."
            )
    return groups


def _resolve(choices, full: int, what: str, multiple_of: int = 1) -> tuple[int, ...]:
    """Absolute sizes of `choices` (sizes, or fractions of `full`), checked against the layer."""
    if isinstance(choices[0], float):
        sizes = [max(multiple_of, round(c * full / multiple_of) * multiple_of) for c in choices]
    else:
        sizes = list(choices)
        if sizes[0] != full:
            raise ValueError(
                f"The largest of {what}'s choices {list(choices)} must be its full size {full} (the maximal "
                "subnetwork is the whole model)."
            )
    bad = [s for s in sizes if s % multiple_of]
    if bad:
        raise ValueError(
            f"{what}: head choices {bad} are not multiples of {multiple_of}, the query heads per key/value head "
            "(grouped-query attention keeps whole groups)."
        )
    if len(set(sizes)) != len(sizes):
        raise ValueError(
            f"{what}: the choices {list(choices)} give duplicate sizes {sizes}; use fewer or coarser ones."
        )
    return tuple(sizes)


def _mlp_group(parent, choices, layers, producers, consumers) -> WidthGroup:
    full = {layers[p][1].out_features for p in producers}
    if len(full) != 1:
        raise ValueError(f"The producers {producers} of {parent!r} have different output sizes {sorted(full)}.")
    size = full.pop()
    mismatched = [c for c in consumers if layers[c][1].in_features != size]
    if mismatched:
        raise ValueError(f"The consumers {mismatched} of {parent!r} do not take the producers' {size} outputs.")
    return WidthGroup(
        name=f"{parent}:width",
        kind="width",
        choices=_resolve(choices, size, f"{parent!r} (width_choices)"),
        producers=tuple((layers[p][0], layers[p][1], 1) for p in producers),
        consumers=tuple(layers[c] for c in consumers),
    )


def _head_group(parent, choices, layers, producers, consumers, head_dim) -> WidthGroup:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(
            f"head_choices needs the head size of {parent!r}, read from its `head_dim` attribute (transformers' "
            f"attention modules have one), got {head_dim!r}."
        )
    query, key, value = (layers[p][1] for p in producers)
    heads, kv_heads = query.out_features // head_dim, key.out_features // head_dim
    if query.out_features % head_dim or key.out_features % head_dim or value.out_features != key.out_features:
        raise ValueError(
            f"{parent!r}: query/key/value sizes {query.out_features}/{key.out_features}/{value.out_features} do not "
            f"split into heads of {head_dim}."
        )
    if heads % kv_heads:
        raise ValueError(f"{parent!r}: {heads} query heads do not split over {kv_heads} key/value heads.")
    per_kv = heads // kv_heads
    sizes = _resolve(choices, heads, f"{parent!r} (head_choices)", multiple_of=per_kv)
    mismatched = [c for c in consumers if layers[c][1].in_features != query.out_features]
    if mismatched:
        raise ValueError(f"The consumers {mismatched} of {parent!r} do not take the {heads} heads' outputs.")
    # choices count query heads; key/value keep heads // per_kv of theirs
    q_name, k_name, v_name = (layers[p][0] for p in producers)
    return _HeadGroup(
        name=f"{parent}:heads",
        kind="heads",
        choices=sizes,
        producers=((q_name, query, head_dim), (k_name, key, head_dim), (v_name, value, head_dim)),
        consumers=tuple(layers[c] for c in consumers),
        per_kv=per_kv,
    )


@dataclass(frozen=True)
class _HeadGroup(WidthGroup):
    """Heads: query heads `h` keep `h · head_dim` outputs of q, and key/value `h / per_kv · head_dim` of theirs."""

    per_kv: int = 1

    def _units(self, value: int) -> list[int]:
        return [value, value // self.per_kv, value // self.per_kv]

    def apply(self, adapter_name: str, value: int) -> None:
        for (_, layer, head_dim), heads in zip(self.producers, self._units(value), strict=True):
            layer.set_active_out_features(adapter_name, heads * head_dim)

    def widths(self, value: int) -> dict[str, tuple[int | None, int | None]]:
        out = {
            name: (heads * dim, None) for (name, _, dim), heads in zip(self.producers, self._units(value), strict=True)
        }
        consumer_in = value * self.producers[0][2]
        return out | {name: (None, consumer_in) for name, _ in self.consumers}


# ---------------------------------------------------------------------------------------------- blocks (Mode B)


@dataclass(frozen=True)
class BlockGroup(WidthGroup):
    """A decoder block a subnetwork may drop (choices 1: keep, 0: drop). The choice is kept, per adapter, by the
    first adapted layer inside the block (`holder`); a forward hook on the block returns its input when it is
    dropped. The block still runs inside the super-network (so its key/value cache stays in step); the exported model
    does not contain it."""

    block_name: str = ""
    holder: ElasticLoraLayer | None = None

    def value(self, adapter_name: str) -> int:
        return 0 if self.holder.lora_A[adapter_name].block_dropped else 1

    def apply(self, adapter_name: str, value: int) -> None:
        self.holder.lora_A[adapter_name].block_dropped = value == 0

    def widths(self, value: int) -> dict[str, tuple[int | None, int | None]]:
        return {}


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and list of `model`'s decoder blocks: its first `nn.ModuleList` of `config.num_hidden_layers`
    modules."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count is not None and len(module) == count:
            return name, module
    raise ValueError(
        f"droppable_layers needs the model's decoder blocks: no torch.nn.ModuleList of config.num_hidden_layers "
        f"({count}) modules was found in this {type(model).__name__}."
    )


def block_groups(model: nn.Module, config: ElasticLoraConfig, adapter_name: str) -> dict[str, BlockGroup]:
    """The droppable blocks of `adapter_name` (`config.droppable_layers`), installing their skip hooks once."""
    if not config.droppable_layers:
        return {}
    list_name, blocks = decoder_blocks(model)
    outside = [i for i in config.droppable_layers if i >= len(blocks)]
    if outside:
        raise ValueError(
            f"droppable_layers {outside} are outside the model's {len(blocks)} decoder blocks (0..{len(blocks) - 1})."
        )
    if len(config.droppable_layers) == len(blocks):
        raise ValueError(
            f"droppable_layers lists every one of the {len(blocks)} decoder blocks: a subnetwork must keep at least "
            "one; leave one out."
        )
    groups = {}
    for index in config.droppable_layers:
        block_name = f"{list_name}.{index}" if list_name else str(index)
        block = blocks[index]
        holders = [
            (name, m)
            for name, m in block.named_modules()
            if isinstance(m, ElasticLoraLayer) and adapter_name in m.lora_A
        ]
        if not holders:
            raise ValueError(
                f"Decoder block {block_name!r} (droppable_layers) has no module adapted by {adapter_name!r}; a "
                "droppable block needs one (it keeps the choice): add one of its modules to target_modules."
            )
        holder_name, holder = holders[0]
        if getattr(block, "_peft_elastic_skip", None) is None:
            block._peft_elastic_skip_hook = block.register_forward_hook(_skip_dropped_block, with_kwargs=True)
        block._peft_elastic_skip = holder_name
        groups[f"{block_name}:block"] = BlockGroup(
            name=f"{block_name}:block",
            kind="block",
            choices=(1, 0),
            producers=(),
            consumers=(),
            block_name=block_name,
            holder=holder,
        )
    return groups


def remove_block_hooks(model: nn.Module) -> None:
    """Take the skip hooks of `block_groups` off every block of `model` (when its adapters are unloaded)."""
    for module in model.modules():
        hook = getattr(module, "_peft_elastic_skip_hook", None)
        if hook is not None:
            hook.remove()
            del module._peft_elastic_skip_hook, module._peft_elastic_skip


def _skip_dropped_block(block: nn.Module, args, kwargs, output):
    """Forward hook of a droppable block: its input instead of its output when an active adapter drops it. A plain
    function that finds its state through the block itself, so copies of the model keep working."""
    holder = block.get_submodule(block._peft_elastic_skip)
    if not isinstance(holder, ElasticLoraLayer) or holder.disable_adapters:
        return None
    if not any(holder.lora_A[a].block_dropped for a in holder.active_adapters if a in holder.lora_A):
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
