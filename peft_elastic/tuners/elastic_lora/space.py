"""The search space of an elastic adapter: which modules share one rank choice (a *rank group*) and its choices."""

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
