"""`SearchSpace`: the groups of one elastic adapter of a model, built once, and everything computed from them — the
choices, the active subnetwork, checking and activating a subnetwork, and what a subnetwork keeps (ranks, widths,
dropped blocks, adapter parameters). The subnetwork API (`peft_elastic.subnetwork`), the cost model, the exports,
the search and the samplers all read a model's space through it.

Every group shares one protocol: `name`, `choices` (descending), `value(adapter)` (its active choice),
`apply(adapter, choice)`; width groups (Mode B) also give `widths(choice)`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

from peft import PeftModel
from torch import nn

from .config import ElasticLoraConfig
from .space import BlockGroup, RankGroup, WidthGroup, block_groups, rank_groups, width_groups

Subnetwork = dict[str, int]


def elastic_tuner(model: nn.Module) -> nn.Module:
    """The tuner (`model.base_model` of a `PeftModel`, or `model` itself) that holds an elastic adapter."""
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not hasattr(tuner, "peft_config") or not any(
        isinstance(c, ElasticLoraConfig) for c in getattr(tuner, "peft_config", {}).values()
    ):
        raise ValueError(
            f"Expected a PeftModel (or its tuner) with an elastic adapter, got a {type(model).__name__}; create one "
            "with peft.get_peft_model(base, ElasticLoraConfig(...))."
        )
    return tuner


def elastic_adapter(tuner: nn.Module, adapter_name: str | None) -> str:
    """`adapter_name`, checked to be an elastic adapter of `tuner`; by default the one active elastic adapter."""
    elastic = [name for name, c in tuner.peft_config.items() if isinstance(c, ElasticLoraConfig)]
    if adapter_name is None:
        active = [name for name in tuner.active_adapters if name in elastic]
        if len(active) != 1:
            raise ValueError(
                f"Cannot tell which elastic adapter to use: active elastic adapters are {active}; pass "
                f"adapter_name=, one of {elastic}."
            )
        return active[0]
    if adapter_name not in elastic:
        raise ValueError(f"Unknown elastic adapter {adapter_name!r}; this model has {elastic}.")
    return adapter_name


#: Where a tuner keeps its spaces (`SearchSpace.of`): `{(adapter name, id of its config): SearchSpace}`.
_CACHE = "_peft_elastic_search_spaces"


def forget_search_spaces(tuner: nn.Module) -> None:
    """Drop the spaces `SearchSpace.of` keeps on `tuner`: its adapters changed (added, deleted, loaded, unloaded)."""
    tuner.__dict__.pop(_CACHE, None)


class SearchSpace:
    """The search space of `adapter_name` (default: the one active elastic adapter) of `model`, a `PeftModel` or
    its tuner. Its methods do not walk the model. `SearchSpace.of(model)` gives the model's own, built on first use
    and kept until an adapter is added, deleted, loaded or unloaded; `SearchSpace(model)` builds a new one."""

    @classmethod
    def of(cls, model: nn.Module, adapter_name: str | None = None) -> SearchSpace:
        """The space of `adapter_name` of `model`, kept on its tuner: built once per adapter, built again after the
        tuner's adapters change (its `inject_adapter`, `delete_adapter` and unloading forget the kept ones)."""
        tuner = elastic_tuner(model)
        name = elastic_adapter(tuner, adapter_name)
        key = (name, id(tuner.peft_config[name]))
        spaces = tuner.__dict__.setdefault(_CACHE, {})
        if key not in spaces:
            spaces[key] = cls(tuner, name)
        return spaces[key]

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        self.tuner = elastic_tuner(model)
        self.adapter_name = elastic_adapter(self.tuner, adapter_name)
        self.config: ElasticLoraConfig = self.tuner.peft_config[self.adapter_name]
        wrapped, config, name = self.tuner.model, self.config, self.adapter_name
        self.rank_groups: dict[str, RankGroup] = rank_groups(wrapped, config, name)
        #: Every group: the rank groups in module order, then the width groups and droppable blocks (Mode B).
        self.groups: dict[str, RankGroup | WidthGroup | BlockGroup] = (
            self.rank_groups | width_groups(wrapped, config, name) | block_groups(wrapped, config, name)
        )

    @property
    def choices(self) -> dict[str, list[int]]:
        """`{group name: [choices, largest first]}`."""
        return {name: list(group.choices) for name, group in self.groups.items()}

    def current(self) -> Subnetwork:
        """The active subnetwork."""
        return {name: group.value(self.adapter_name) for name, group in self.groups.items()}

    def validated(self, subnetwork: Mapping[str, int] | None) -> Subnetwork:
        """`subnetwork` (None: empty) with every choice an int, checked against the groups. A choice may be any number
        equal to a valid int (24, 24.0, numpy's ints and floats, 0-dim tensors); strings and booleans are refused."""
        subnetwork = {} if subnetwork is None else subnetwork
        if not isinstance(subnetwork, Mapping):
            raise ValueError(f"A subnetwork is a dict {{group name: choice}}, got {type(subnetwork).__name__}.")
        unknown = [name for name in subnetwork if name not in self.groups]
        if unknown:
            known = list(self.groups)
            shown = ", ".join(repr(n) for n in known[:4]) + (", ..." if len(known) > 4 else "")
            raise ValueError(
                f"Unknown group name(s) {unknown}; valid names come from peft_elastic.search_space(model), e.g. "
                f"{shown}."
            )
        chosen = {name: as_int(value) for name, value in subnetwork.items()}
        invalid = {name: subnetwork[name] for name, value in chosen.items() if value not in self.groups[name].choices}
        if invalid:
            details = "; ".join(
                f"{name!r}: {value!r} is a string (valid: the numbers {list(self.groups[name].choices)})"
                if isinstance(value, str)
                else f"{name!r}: {value!r} (valid: {list(self.groups[name].choices)})"
                for name, value in invalid.items()
            )
            raise ValueError(f"Invalid choice(s) in subnetwork: {details}.")
        return chosen

    def set(self, subnetwork: Mapping[str, int], training: bool = False) -> None:
        """Check and activate `subnetwork` (groups it does not name keep their choice; nothing changes if an entry is
        invalid). `training`: the model is in training mode (dropping a block is refused under DeepSpeed ZeRO-3)."""
        chosen = self.validated(subnetwork)
        if training:
            self._refuse_dropping_under_zero3(chosen)
        self.apply(chosen)

    def apply(self, subnetwork: Mapping[str, int]) -> None:
        """Activate an already validated `subnetwork` (a search switches subnetworks with this)."""
        for name, choice in subnetwork.items():
            self.groups[name].apply(self.adapter_name, choice)

    def module_ranks(self, chosen: Mapping[str, int]) -> dict[str, int]:
        """`{module name: rank}` of every adapted module under the validated `chosen` (other groups: active)."""
        return {
            module_name: chosen.get(name, layer.active_rank(self.adapter_name))
            for name, group in self.rank_groups.items()
            for module_name, layer in group.modules
        }

    def widths(self, chosen: Mapping[str, int]) -> dict[str, tuple[int, int]]:
        """`{module name: (output width, input width)}` of every adapted module under the validated `chosen` (other
        groups: active): the full sizes, narrowed by the width groups."""
        widths = {
            module_name: (layer.out_features, layer.in_features)
            for group in self.rank_groups.values()
            for module_name, layer in group.modules
        }
        for name, group in self.groups.items():
            if not isinstance(group, RankGroup):
                value = chosen.get(name, group.value(self.adapter_name))
                for module_name, (out_width, in_width) in group.widths(value).items():
                    full_out, full_in = widths[module_name]
                    widths[module_name] = (out_width or full_out, in_width or full_in)
        return widths

    def dropped(self, chosen: Mapping[str, int]) -> list[str]:
        """The names of the decoder blocks the validated `chosen` (other groups: active) drops."""
        return [
            group.block_name
            for name, group in self.groups.items()
            if isinstance(group, BlockGroup) and chosen.get(name, group.value(self.adapter_name)) == 0
        ]

    def removed_from_base(self, chosen: Mapping[str, int]) -> list[str]:
        """What the validated `chosen` takes out of the base: the modules it narrows, then the blocks it drops."""
        layers = {name: layer for group in self.rank_groups.values() for name, layer in group.modules}
        narrowed = [
            name
            for name, widths in self.widths(chosen).items()
            if widths != (layers[name].out_features, layers[name].in_features)
        ]
        return narrowed + self.dropped(chosen)

    def adapter_parameters(self, chosen: Mapping[str, int]) -> int:
        """The adapter parameters the validated `chosen` uses: `k · (in + out)` per module of rank `k` and active
        widths, plus the LoRA bias if there is one (`out`)."""
        widths = self.widths(chosen)
        total = 0
        for name, group in self.rank_groups.items():
            for module_name, layer in group.modules:
                out_width, in_width = widths[module_name]
                total += chosen.get(name, layer.active_rank(self.adapter_name)) * (in_width + out_width)
                if layer.lora_B[self.adapter_name].bias is not None:
                    total += out_width
        return total

    def parameters_per_rank(self) -> dict[str, int]:
        """`{rank group name: adapter parameters per unit of rank}` (`in + out` over its modules, full width)."""
        adapter, per_rank = self.adapter_name, {}
        for name, group in self.rank_groups.items():
            per_rank[name] = sum(
                layer.lora_A[adapter].in_features + layer.lora_B[adapter].out_features for _, layer in group.modules
            )
        return per_rank

    def _refuse_dropping_under_zero3(self, chosen: Mapping[str, int]) -> None:
        """DeepSpeed ZeRO-3 (its parameters carry `ds_status`) updates the parameters of a block that no backward pass
        reached: training a subnetwork that drops a block there would move the block's adapters where one process
        leaves them alone (tests/test_deepspeed.py)."""
        for name, value in chosen.items():
            group = self.groups[name]
            if not isinstance(group, BlockGroup) or value != 0:
                continue
            if hasattr(group.holder.lora_A[self.adapter_name].weight, "ds_status"):
                raise ValueError(
                    f"{name!r}: 0 drops {group.block_name} while training under DeepSpeed ZeRO-3, which still updates "
                    "the parameters of a block that no backward pass reached (measured: its adapters moved by up to "
                    "2e-3 in 4 SGD steps where one process, DDP and ZeRO-2 leave them unchanged). Train "
                    "droppable_layers with FSDP2 (peft_elastic.fsdp.shard_model), DDP or ZeRO-2, or under ZeRO-3 "
                    "without droppable_layers."
                )


def as_int(value) -> int | None:
    """`value` as an int when it is a number equal to one (24, 24.0, numpy scalars, 0-dim tensors), else None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if float(value).is_integer() else None
