"""The subnetwork API: the search space of a model with elastic adapters, and getting, setting and sampling its
subnetworks.

A *subnetwork* is a dict `{group name: choice}` over the groups of one adapter (see `search_space`): a rank for a rank
group, and with Mode B widths an MLP intermediate size (`"<mlp module>:width"`) or a number of attention heads
(`"<attention module>:heads"`). Every function takes a `PeftModel` or its tuner (`model.base_model`) and works on
`adapter_name`, by default the one active elastic adapter. The active subnetwork is module state: set it between
steps, never inside `forward`. Each function asks the model's `SearchSpace` (its groups, `SearchSpace.of`: built on
first use and kept on the tuner until an adapter is added, deleted, loaded or unloaded).
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Mapping

import torch
from torch import nn

from .tuners.elastic_lora.search_space import SearchSpace, Subnetwork

__all__ = [
    "SearchSpace",
    "Subnetwork",
    "dropped_blocks",
    "get_subnetwork",
    "heuristic_subnetwork",
    "maximal_subnetwork",
    "minimal_subnetwork",
    "module_ranks",
    "module_widths",
    "num_adapter_parameters",
    "parameters_per_rank",
    "removed_from_base",
    "sample_subnetwork",
    "search_space",
    "set_subnetwork",
]


def search_space(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[int]]:
    """`{group name: [choices, largest first]}` for every group: rank groups in module order, then width groups."""
    return SearchSpace.of(model, adapter_name).choices


def get_subnetwork(model: nn.Module, adapter_name: str | None = None) -> Subnetwork:
    """The active subnetwork `{group name: choice}`."""
    return SearchSpace.of(model, adapter_name).current()


def set_subnetwork(model: nn.Module, subnetwork: Mapping[str, int], adapter_name: str | None = None) -> None:
    """Activate `subnetwork`. Groups it does not name keep their choice. Nothing changes if any entry is invalid."""
    SearchSpace.of(model, adapter_name).set(subnetwork, training=model.training)


def dropped_blocks(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> list[str]:
    """The names of the decoder blocks `subnetwork` (default: the active one) drops (Mode B, `droppable_layers`)."""
    space = SearchSpace.of(model, adapter_name)
    return space.dropped(space.validated(subnetwork))


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
    space = SearchSpace.of(model, adapter_name)
    return space.module_ranks(space.validated(subnetwork))


def module_widths(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> dict[str, tuple[int, int]]:
    """`{module name: (output width, input width)}` of every adapted module under `subnetwork` (default: the active
    one): the full sizes, narrowed by the width groups (Mode B)."""
    space = SearchSpace.of(model, adapter_name)
    return space.widths(space.validated(subnetwork))


def removed_from_base(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> list[str]:
    """What `subnetwork` (default: the active one) takes out of the base (Mode B): the names of the modules it
    narrows, then of the decoder blocks it drops. Empty when it keeps the base whole, so that a LoRA adapter or an
    in-place merge can express it."""
    space = SearchSpace.of(model, adapter_name)
    return space.removed_from_base(space.validated(subnetwork))


def parameters_per_rank(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """`{rank group name: adapter parameters per unit of rank}`: a group at rank `k` uses `k` times this many
    parameters (`in + out` summed over its modules, at full width), not counting LoRA biases."""
    return SearchSpace.of(model, adapter_name).parameters_per_rank()


def num_adapter_parameters(
    model: nn.Module, subnetwork: Mapping[str, int] | None = None, adapter_name: str | None = None
) -> int:
    """The number of adapter parameters `subnetwork` (default: the active one) uses: `k · (in + out)` per module
    of rank `k` and active widths `in`, `out`, plus the LoRA bias if there is one (`out`). Parameters of
    `modules_to_save` are not counted."""
    space = SearchSpace.of(model, adapter_name)
    return space.adapter_parameters(space.validated(subnetwork))
