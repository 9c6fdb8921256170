"""The subnetwork API: the search space of a model with elastic adapters, and getting, setting and sampling its
subnetworks.

A *subnetwork* is a dict `{group name: choice}` over the groups of one adapter (see `search_space`): a rank for a rank
group, and with Mode B widths an MLP intermediate size (`"<mlp module>:width"`) or a number of attention heads
(`"<attention module>:heads"`). Every
function takes a `PeftModel` or its tuner (`model.base_model`) and works on `adapter_name`, by default the one active
elastic adapter. The active subnetwork is module state: set it between steps, never inside `forward`.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Mapping

import torch
from peft import PeftModel
from torch import nn

from .tuners.elastic_lora.config import ElasticLoraConfig
from .tuners.elastic_lora.space import BlockGroup, RankGroup, WidthGroup, block_groups, rank_groups, width_groups

Subnetwork = dict[str, int]


def _tuner(model: nn.Module) -> nn.Module:
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not hasattr(tuner, "peft_config") or not any(
        isinstance(c, ElasticLoraConfig) for c in getattr(tuner, "peft_config", {}).values()
    ):
        raise ValueError(
            f"Expected a PeftModel (or its tuner) with an elastic adapter, got a {type(model).__name__}; create one "
            "with peft.get_peft_model(base, ElasticLoraConfig(...))."
        )
    return tuner


def _resolve(model: nn.Module, adapter_name: str | None) -> tuple[nn.Module, str, ElasticLoraConfig]:
    tuner = _tuner(model)
    elastic = [name for name, c in tuner.peft_config.items() if isinstance(c, ElasticLoraConfig)]
    if adapter_name is None:
        active = [name for name in tuner.active_adapters if name in elastic]
        if len(active) != 1:
            raise ValueError(
                f"Cannot tell which elastic adapter to use: active elastic adapters are {active}; pass "
                f"adapter_name=, one of {elastic}."
            )
        adapter_name = active[0]
    elif adapter_name not in elastic:
        raise ValueError(f"Unknown elastic adapter {adapter_name!r}; this model has {elastic}.")
    return tuner, adapter_name, tuner.peft_config[adapter_name]


def _groups(model: nn.Module, adapter_name: str | None) -> tuple[str, dict[str, RankGroup | WidthGroup]]:
    """Every group of the search space: the rank groups, then the width groups and droppable blocks (Mode B)."""
    tuner, adapter_name, config = _resolve(model, adapter_name)
    groups = rank_groups(tuner.model, config, adapter_name) | width_groups(tuner.model, config, adapter_name)
    return adapter_name, groups | block_groups(tuner.model, config, adapter_name)


def dropped_blocks(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> list[str]:
    """The names of the decoder blocks `subnetwork` (default: the active one) drops (Mode B, `droppable_layers`)."""
    adapter_name, groups = _groups(model, adapter_name)
    return _dropped(groups, _validated(subnetwork or {}, groups), adapter_name)


def _dropped(groups, chosen: Mapping[str, int], adapter_name: str) -> list[str]:
    return [
        group.block_name
        for name, group in groups.items()
        if isinstance(group, BlockGroup) and chosen.get(name, group.value(adapter_name)) == 0
    ]


def _rank_groups(model: nn.Module, adapter_name: str | None) -> tuple[str, dict[str, RankGroup]]:
    tuner, adapter_name, config = _resolve(model, adapter_name)
    return adapter_name, rank_groups(tuner.model, config, adapter_name)


def search_space(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[int]]:
    """`{group name: [choices, largest first]}` for every group: rank groups in module order, then width groups."""
    _, groups = _groups(model, adapter_name)
    return {name: list(group.choices) for name, group in groups.items()}


def get_subnetwork(model: nn.Module, adapter_name: str | None = None) -> Subnetwork:
    """The active subnetwork `{group name: choice}`."""
    adapter_name, groups = _groups(model, adapter_name)
    return {
        name: group.value(adapter_name)
        if isinstance(group, WidthGroup)
        else group.modules[0][1].active_rank(adapter_name)
        for name, group in groups.items()
    }


def _validated(subnetwork: Mapping[str, int], groups: dict[str, RankGroup]) -> Subnetwork:
    """`subnetwork` with every choice an int, checked against `groups`. A choice may be any number equal to a valid
    int (24, 24.0, numpy's ints and floats, 0-dim tensors); strings and booleans are refused."""
    if not isinstance(subnetwork, Mapping):
        raise ValueError(f"A subnetwork is a dict {{group name: choice}}, got {type(subnetwork).__name__}.")
    unknown = [name for name in subnetwork if name not in groups]
    if unknown:
        known = list(groups)
        shown = ", ".join(repr(n) for n in known[:4]) + (", ..." if len(known) > 4 else "")
        raise ValueError(
            f"Unknown group name(s) {unknown}; valid names come from peft_elastic.search_space(model), e.g. {shown}."
        )
    chosen = {name: _as_int(value) for name, value in subnetwork.items()}
    invalid = {name: subnetwork[name] for name, value in chosen.items() if value not in groups[name].choices}
    if invalid:
        details = "; ".join(
            f"{name!r}: {value!r} is a string (valid: the numbers {list(groups[name].choices)})"
            if isinstance(value, str)
            else f"{name!r}: {value!r} (valid: {list(groups[name].choices)})"
            for name, value in invalid.items()
        )
        raise ValueError(f"Invalid choice(s) in subnetwork: {details}.")
    return chosen


def _as_int(value) -> int | None:
    """`value` as an int when it is a number equal to one (24, 24.0, numpy scalars, 0-dim tensors), else None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if float(value).is_integer() else None


def set_subnetwork(model: nn.Module, subnetwork: Mapping[str, int], adapter_name: str | None = None) -> None:
    """Activate `subnetwork`. Groups it does not name keep their choice. Nothing changes if any entry is invalid."""
    adapter_name, groups = _groups(model, adapter_name)
    chosen = _validated(subnetwork, groups)
    if model.training:
        _refuse_dropping_under_zero3(groups, chosen, adapter_name)
    apply_subnetwork(groups, chosen, adapter_name)


def _refuse_dropping_under_zero3(groups, chosen: Mapping[str, int], adapter_name: str) -> None:
    """DeepSpeed ZeRO-3 (its parameters carry `ds_status`) updates the parameters of a block that no backward pass
    reached: training a subnetwork that drops a block there would move the block's adapters where one process
    leaves them alone (tests/test_deepspeed.py)."""
    for name, value in chosen.items():
        group = groups[name]
        if not isinstance(group, BlockGroup) or value != 0:
            continue
        if hasattr(group.holder.lora_A[adapter_name].weight, "ds_status"):
            raise ValueError(
                f"{name!r}: 0 drops {group.block_name} while training under DeepSpeed ZeRO-3, which still updates the "
                "parameters of a block that no backward pass reached (measured: its adapters moved by up to 2e-3 in "
                "4 SGD steps where one process, DDP and ZeRO-2 leave them unchanged). Train droppable_layers with "
                "FSDP2 (peft_elastic.fsdp.shard_model), DDP or ZeRO-2, or under ZeRO-3 without droppable_layers."
            )


def apply_subnetwork(groups: Mapping[str, RankGroup | WidthGroup], subnetwork: Mapping[str, int], adapter_name: str):
    """Activate an already validated `subnetwork` on the `groups` of `_groups` (the search computes the groups once
    and switches subnetworks with this, without walking the model each time)."""
    for name, choice in subnetwork.items():
        group = groups[name]
        if isinstance(group, WidthGroup):
            group.apply(adapter_name, choice)
            continue
        for _, layer in group.modules:
            layer.set_active_rank(adapter_name, choice)


def maximal_subnetwork(model: nn.Module, adapter_name: str | None = None) -> Subnetwork:
    """Every group at its largest choice (the full super-network)."""
    return {name: choices[0] for name, choices in search_space(model, adapter_name).items()}


def minimal_subnetwork(model: nn.Module, adapter_name: str | None = None) -> Subnetwork:
    """Every group at its smallest choice."""
    return {name: choices[-1] for name, choices in search_space(model, adapter_name).items()}


def heuristic_subnetwork(model: nn.Module, adapter_name: str | None = None) -> Subnetwork:
    """The midpoint of the search space (LoNAS/Shears): for a group with descending choices `c` of length `n`, the
    rank `c[(n - 1) // 2]`, i.e. the middle choice, and the larger of the two middle ones when `n` is even
    ([32, 24, 16] -> 24, [32, 16] -> 32, [32, 24, 16, 8] -> 24)."""
    return {name: choices[(len(choices) - 1) // 2] for name, choices in search_space(model, adapter_name).items()}


def sample_subnetwork(
    model: nn.Module,
    seed: int | torch.Generator | random.Random | None = None,
    adapter_name: str | None = None,
) -> Subnetwork:
    """A subnetwork drawn uniformly per group. `seed` is an int, a `torch.Generator`, a `random.Random`, or None
    (fresh entropy). Draws are made group by group in module order, so a seed always gives the same subnetwork."""
    if isinstance(seed, torch.Generator):

        def draw(n: int) -> int:
            return int(torch.randint(n, (1,), generator=seed))
    elif isinstance(seed, random.Random):
        draw = seed.randrange
    elif seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        draw = random.Random(seed).randrange
    else:
        raise ValueError(f"seed must be an int, a torch.Generator, a random.Random or None, got {seed!r}.")
    return {name: choices[draw(len(choices))] for name, choices in search_space(model, adapter_name).items()}


def module_ranks(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> dict[str, int]:
    """`{module name: rank}` of every adapted module under `subnetwork` (default: the active one; groups it does
    not name keep their active choice)."""
    adapter_name, groups = _groups(model, adapter_name)
    chosen = _validated(subnetwork or {}, groups)
    return {
        module_name: chosen.get(name, layer.active_rank(adapter_name))
        for name, group in groups.items()
        if isinstance(group, RankGroup)
        for module_name, layer in group.modules
    }


def module_widths(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> dict[str, tuple[int, int]]:
    """`{module name: (output width, input width)}` of every adapted module under `subnetwork` (default: the active
    one): the full sizes, narrowed by the width groups (Mode B)."""
    adapter_name, groups = _groups(model, adapter_name)
    return _widths(groups, _validated(subnetwork or {}, groups), adapter_name)


def removed_from_base(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> list[str]:
    """What `subnetwork` (default: the active one) takes out of the base (Mode B): the names of the modules it
    narrows, then of the decoder blocks it drops. Empty when it keeps the base whole, so that a LoRA adapter or an
    in-place merge can express it."""
    adapter_name, groups = _groups(model, adapter_name)
    chosen = _validated(subnetwork or {}, groups)
    layers = {name: layer for g in groups.values() if isinstance(g, RankGroup) for name, layer in g.modules}
    narrowed = [
        name
        for name, widths in _widths(groups, chosen, adapter_name).items()
        if widths != (layers[name].out_features, layers[name].in_features)
    ]
    return narrowed + _dropped(groups, chosen, adapter_name)


def _widths(groups, chosen: Mapping[str, int], adapter_name: str) -> dict[str, tuple[int, int]]:
    widths = {
        module_name: (layer.out_features, layer.in_features)
        for group in groups.values()
        if isinstance(group, RankGroup)
        for module_name, layer in group.modules
    }
    for name, group in groups.items():
        if isinstance(group, WidthGroup):
            value = chosen.get(name, group.value(adapter_name))
            for module_name, (out_width, in_width) in group.widths(value).items():
                full_out, full_in = widths[module_name]
                widths[module_name] = (out_width or full_out, in_width or full_in)
    return widths


def parameters_per_rank(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """`{rank group name: adapter parameters per unit of rank}`: a group at rank `k` uses `k` times this many
    parameters (`in + out` summed over its modules, at full width), not counting LoRA biases."""
    adapter_name, groups = _rank_groups(model, adapter_name)
    return {
        name: sum(
            layer.lora_A[adapter_name].in_features + layer.lora_B[adapter_name].out_features
            for _, layer in group.modules
        )
        for name, group in groups.items()
    }


def num_adapter_parameters(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> int:
    """The number of adapter parameters `subnetwork` (default: the active one) uses: `k · (in + out)` per module
    of rank `k` and active widths `in`, `out`, plus the LoRA bias if there is one (`out`). Parameters of
    `modules_to_save` are not counted."""
    adapter_name, groups = _groups(model, adapter_name)
    return _adapter_parameters(groups, _validated(subnetwork or {}, groups), adapter_name)


def _adapter_parameters(groups, chosen: Mapping[str, int], adapter_name: str) -> int:
    widths = _widths(groups, chosen, adapter_name)
    total = 0
    for name, group in groups.items():
        if not isinstance(group, RankGroup):
            continue
        for module_name, layer in group.modules:
            out_width, in_width = widths[module_name]
            total += chosen.get(name, layer.active_rank(adapter_name)) * (in_width + out_width)
            if layer.lora_B[adapter_name].bias is not None:
                total += out_width
    return total
