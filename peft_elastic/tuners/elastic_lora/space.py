"""The search space of an elastic adapter: which modules share one rank choice (a *rank group*) and its choices, and
(Mode B) the elastic widths of MLP blocks and attention heads (*width groups*)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ...blocks import decoder_blocks
from .config import ElasticLoraConfig
from .layer import ElasticLoraLayer


@dataclass(frozen=True)
class RankGroup:
    """Modules that always use the same rank, and the ranks they may use (descending)."""

    name: str
    choices: tuple[int, ...]
    modules: tuple[tuple[str, ElasticLoraLayer], ...]  # (module name in the base model, layer)

    def value(self, adapter_name: str) -> int:
        """The active rank (every module of the group has it)."""
        return self.modules[0][1].active_rank(adapter_name)

    def apply(self, adapter_name: str, value: int) -> None:
        for _, layer in self.modules:
            layer.set_active_rank(adapter_name, value)


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


#: Option names of the two kinds of elastic widths: (choices, [producers, consumers]).
_OPTIONS = {"width": ("width_choices", "width_modules"), "heads": ("head_choices", "head_modules")}

#: How far `fraction · size` may be from a whole number and still land on it (float rounding, e.g. 2/3 of 9 heads).
_TOLERANCE = 1e-9


def width_groups(model: nn.Module, config: ElasticLoraConfig, adapter_name: str) -> dict[str, WidthGroup]:
    """The width groups of `adapter_name` in `model`, in module order: one per parent module that holds the MLP
    producers/consumers of `config.width_modules` (if `config.width_choices`) or the attention projections of
    `config.head_modules` (if `config.head_choices`)."""
    specs = _specs(config)
    if not specs:
        return {}

    def adapted(module: nn.Module) -> bool:
        return isinstance(module, ElasticLoraLayer) and adapter_name in module.lora_A

    children = children_by_parent(model, adapted)
    groups = {}
    for parent, members in children.items():
        for kind, choices, producers, consumers in specs:
            wanted = producers + consumers
            present = [suffix for suffix in wanted if suffix in members]
            if not present:
                continue
            missing = [suffix for suffix in wanted if suffix not in members]
            option, modules_option = _OPTIONS[kind]
            if missing:
                raise ValueError(
                    f"{option} makes {parent!r} elastic, which needs {wanted} adapted, but {missing} are not in "
                    f"target_modules; add them (or change {modules_option})."
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
    for kind, _, producers, consumers in specs:
        if not any(name.endswith(f":{kind}") for name in groups):
            option, modules_option = _OPTIONS[kind]
            raise ValueError(
                f"{option} is set but no adapted module is one of {producers + consumers} (target_modules decides): "
                f"nothing would be elastic. Add them to target_modules, or change {modules_option}."
            )
    return groups


def resolve_width_choices(model: nn.Module, config: ElasticLoraConfig) -> dict[str, tuple[int, ...]]:
    """`{group name: choices}` of the MLP widths and attention heads `config` makes elastic in a base `model`, before
    `get_peft_model`: the sizes its fractions give, with the errors `get_peft_model` would raise about choices the
    model cannot take (fractions that do not land on whole channels or heads, head counts that split a key/value
    group, a largest choice that is not the full size). Nothing is wrapped and only shapes are read, so it takes
    milliseconds: call it before expensive work such as `reorder_by_importance`. Every parent module that holds all of
    `width_modules` (or `head_modules`) as torch.nn.Linear layers counts; whether `target_modules` adapts them is
    `get_peft_model`'s to check."""
    specs = _specs(config)
    children = children_by_parent(model, lambda module: type(module) is nn.Linear)
    resolved = {}
    for parent, members in children.items():
        for kind, choices, producers, consumers in specs:
            if not all(suffix in members for suffix in producers + consumers):
                continue
            layers = {suffix: members[suffix] for suffix in producers + consumers}
            if kind == "width":
                sizes = _mlp_sizes(parent, choices, layers, producers, consumers)
            else:
                head_dim = getattr(model.get_submodule(parent), "head_dim", None)
                sizes = _head_sizes(parent, choices, layers, producers, consumers, head_dim)
            resolved[f"{parent}:{kind}"] = sizes
    for kind, _, producers, consumers in specs:
        if not any(name.endswith(f":{kind}") for name in resolved):
            option, modules_option = _OPTIONS[kind]
            raise ValueError(
                f"{option} is set but no module of this {type(model).__name__} holds all of {producers + consumers} "
                f"as torch.nn.Linear layers: nothing would be elastic. Change {modules_option}."
            )
    return resolved


def valid_head_counts(heads: int, kv_heads: int) -> tuple[int, ...]:
    """The numbers of query heads an attention block of `heads` query heads over `kv_heads` key/value heads can keep,
    largest first: whole key/value groups, i.e. multiples of `heads // kv_heads` (9 over 3: (9, 6, 3))."""
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split over {kv_heads} key/value heads.")
    return tuple(range(heads, 0, -(heads // kv_heads)))


def sizes_at_most(fractions, full: int, multiple_of: int = 1) -> list[int]:
    """For each of `fractions` (in (0, 1], 1.0 first, descending), the largest multiple of `multiple_of` at most
    `fraction · full` (at least `multiple_of`; 1.0 keeps `full` whatever it is), duplicates dropped: an explicit
    rounding down for fractions that do not land on sizes a model can take. Heads in groups of 3:
    `sizes_at_most([1.0, 0.75, 0.5], 9, multiple_of=3)` is [9, 6, 3]; an MLP width in multiples of 64 (faster
    kernels): `sizes_at_most([1.0, 0.7], 1536, multiple_of=64)` is [1536, 1024]."""
    fractions = list(fractions)
    if (
        not fractions
        or fractions[0] != 1.0
        or not all(isinstance(f, float) and 0 < f <= 1 for f in fractions)
        or any(a <= b for a, b in zip(fractions, fractions[1:], strict=False))
    ):
        raise ValueError(f"sizes_at_most takes fractions in (0, 1] starting at 1.0, largest first, got {fractions!r}.")
    sizes = [full] + [
        min(full, max(multiple_of, math.floor(f * full / multiple_of + _TOLERANCE) * multiple_of))
        for f in fractions[1:]
    ]
    return sorted(set(sizes), reverse=True)


def _specs(config: ElasticLoraConfig) -> list[tuple[str, list, list[str], list[str]]]:
    """`(kind, choices, producers, consumers)` of each kind of elastic width `config` sets."""
    specs = []
    for kind, (option, modules_option) in _OPTIONS.items():
        choices = getattr(config, option)
        if choices is not None:
            producers, consumers = getattr(config, modules_option)
            specs.append((kind, choices, producers, consumers))
    return specs


def children_by_parent(model: nn.Module, keep) -> dict[str, dict[str, tuple[str, nn.Module]]]:
    """`{parent module name: {leaf name: (module name, module)}}` of the modules of `model` that `keep` accepts: where
    the producers and consumers of an elastic width are found (`width_groups` on an adapted model,
    `resolve_width_choices` and the importance ordering on a base)."""
    children: dict[str, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if keep(module):
            parent, _, leaf = name.rpartition(".")
            children.setdefault(parent, {})[leaf] = (name, module)
    return children


def _whole(x: float) -> int | None:
    """`x` as an int when it is one (up to float rounding), else None."""
    nearest = round(x)
    return nearest if abs(x - nearest) <= _TOLERANCE * max(1.0, abs(x)) else None


def _width_sizes(choices, full: int, parent: str) -> tuple[int, ...]:
    """The channel counts of `width_choices` for an MLP of `full` channels: sizes, or fractions that land on whole
    channels (anything else is refused, with the sizes to give instead)."""
    if isinstance(choices[0], float):
        exact = [c * full for c in choices]
        broken = [(c, x) for c, x in zip(choices, exact, strict=True) if _whole(x) is None]
        if broken:
            given = ", ".join(f"{c} gives {x:.6g}" for c, x in broken)
            number = "a whole number" if len(broken) == 1 else "whole numbers"
            hint = f"width_choices={sizes_at_most(choices, full)}"
            fast = sizes_at_most(choices, full, multiple_of=64)
            if full > 64 and fast != sizes_at_most(choices, full):
                hint += f" (or in multiples of 64, which kernels run faster: {fast})"
            raise ValueError(
                f"width_choices of {parent!r} ({full} channels): {given} channels, not {number}; fractions must land "
                f"on whole sizes. Give sizes instead, e.g. {hint}."
            )
        sizes = [_whole(x) for x in exact]
    else:
        sizes = list(choices)
        if sizes[0] != full:
            raise ValueError(
                f"width_choices of {parent!r}: the largest of {sizes} must be its full size {full} (the maximal "
                "subnetwork is the whole model)."
            )
    return _distinct(sizes, choices, "width_choices", parent)


def _head_counts(choices, heads: int, kv_heads: int, parent: str) -> tuple[int, ...]:
    """The query head counts of `head_choices` for an attention block of `heads` query heads over `kv_heads`
    key/value heads: counts, or fractions that land on them, in whole key/value groups (anything else is refused,
    with the valid counts)."""
    valid = valid_head_counts(heads, kv_heads)
    per_kv = heads // kv_heads
    shown = ", ".join(map(str, valid)) if len(valid) <= 12 else f"{valid[0]}, {valid[1]}, {valid[2]}, ..., {valid[-1]}"
    groups = f" (whole key/value groups of {per_kv} query heads)" if per_kv > 1 else ""
    valid_text = f"valid head counts for {heads} query heads over {kv_heads} key/value heads: {shown}{groups}"
    fractions = isinstance(choices[0], float)
    if not fractions and choices[0] != heads:
        raise ValueError(
            f"head_choices of {parent!r}: the largest of {list(choices)} must be its full size {heads} (the maximal "
            f"subnetwork is the whole model); {valid_text}."
        )
    counts = [c * heads for c in choices] if fractions else list(choices)
    broken = [(c, x) for c, x in zip(choices, counts, strict=True) if _whole(x) is None or _whole(x) % per_kv]
    if broken:
        given = ", ".join(f"{c} gives {x:.6g} heads" if fractions else str(c) for c, x in broken)
        verb = "is not a valid head count" if len(broken) == 1 else "are not valid head counts"
        suggested = sizes_at_most([c / heads for c in counts], heads, multiple_of=per_kv)
        raise ValueError(f"head_choices of {parent!r}: {given} {verb}; {valid_text}, e.g. head_choices={suggested}.")
    return _distinct([_whole(x) for x in counts], choices, "head_choices", parent)


def _distinct(sizes: list[int], choices, option: str, parent: str) -> tuple[int, ...]:
    if len(set(sizes)) != len(sizes):
        raise ValueError(
            f"{option} of {parent!r}: the choices {list(choices)} give duplicate sizes {sizes}; use fewer or coarser "
            "ones."
        )
    return tuple(sizes)


def _mlp_sizes(parent, choices, layers, producers, consumers) -> tuple[int, ...]:
    """The width choices of the MLP `parent` (its producers' and consumers' shapes checked)."""
    full = {layers[p][1].out_features for p in producers}
    if len(full) != 1:
        raise ValueError(f"The producers {producers} of {parent!r} have different output sizes {sorted(full)}.")
    size = full.pop()
    mismatched = [c for c in consumers if layers[c][1].in_features != size]
    if mismatched:
        raise ValueError(f"The consumers {mismatched} of {parent!r} do not take the producers' {size} outputs.")
    return _width_sizes(choices, size, parent)


def _mlp_group(parent, choices, layers, producers, consumers) -> WidthGroup:
    return WidthGroup(
        name=f"{parent}:width",
        kind="width",
        choices=_mlp_sizes(parent, choices, layers, producers, consumers),
        producers=tuple((layers[p][0], layers[p][1], 1) for p in producers),
        consumers=tuple(layers[c] for c in consumers),
    )


def _head_sizes(parent, choices, layers, producers, consumers, head_dim) -> tuple[int, ...]:
    """The head choices of the attention block `parent` (its projections' shapes and `head_dim` checked)."""
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
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{parent!r}: {heads} query heads do not split over {kv_heads} key/value heads.")
    mismatched = [c for c in consumers if layers[c][1].in_features != query.out_features]
    if mismatched:
        raise ValueError(f"The consumers {mismatched} of {parent!r} do not take the {heads} heads' outputs.")
    return _head_counts(choices, heads, kv_heads, parent)


def _head_group(parent, choices, layers, producers, consumers, head_dim) -> WidthGroup:
    sizes = _head_sizes(parent, choices, layers, producers, consumers, head_dim)
    # choices count query heads; key/value keep heads // per_kv of theirs
    (q_name, query), (k_name, key), (v_name, value) = (layers[p] for p in producers)
    return _HeadGroup(
        name=f"{parent}:heads",
        kind="heads",
        choices=sizes,
        producers=((q_name, query, head_dim), (k_name, key, head_dim), (v_name, value, head_dim)),
        consumers=tuple(layers[c] for c in consumers),
        per_kv=query.out_features // key.out_features,
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
class BlockGroup:
    """A decoder block a subnetwork may drop (choices 1: keep, 0: drop). The choice is kept, per adapter, by the
    first adapted layer inside the block (`holder`); a forward hook on the block returns its input when it is
    dropped. The block still runs inside the super-network (so its key/value cache stays in step); the exported model
    does not contain it. It narrows no module (`widths` is empty)."""

    name: str
    choices: tuple[int, ...]
    block_name: str
    holder: ElasticLoraLayer
    kind: str = "block"

    def value(self, adapter_name: str) -> int:
        return 0 if self.holder.lora_A[adapter_name].block_dropped else 1

    def apply(self, adapter_name: str, value: int) -> None:
        self.holder.lora_A[adapter_name].block_dropped = value == 0

    def widths(self, value: int) -> dict[str, tuple[int | None, int | None]]:
        return {}


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
            name=f"{block_name}:block", choices=(1, 0), block_name=block_name, holder=holder
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
