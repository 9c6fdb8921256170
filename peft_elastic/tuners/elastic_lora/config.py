"""`ElasticLoraConfig`: a LoRA configuration whose rank is elastic (Mode A of the elastic LoRA adapter)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from peft import LoraConfig
from peft.utils import PeftType
from peft.utils.other import get_pattern_key

#: Default grouping: modules named in one inner list share one rank choice within each layer (Shears groups q/k/v).
DEFAULT_RANK_GROUPS = (("q_proj", "k_proj", "v_proj"),)

#: Default producers (sliced by output rows) and consumers (sliced by input columns) of an elastic width: the MLP
#: intermediate channels of Llama-style blocks, and their attention heads.
DEFAULT_WIDTH_MODULES = (("gate_proj", "up_proj"), ("down_proj",))
DEFAULT_HEAD_MODULES = (("q_proj", "k_proj", "v_proj"), ("o_proj",))

#: `init_lora_weights` values whose initialisation does not depend on the rank being fixed.
SUPPORTED_INIT = (True, False, "gaussian")


def default_rank_choices(r: int) -> list[int]:
    """The default choices for a maximal rank `r`: `r`, `3r/4`, `r/2` rounded down, without zeros or duplicates."""
    return sorted({c for c in (r, 3 * r // 4, r // 2) if c > 0}, reverse=True)


def validate_rank_choices(choices, what: str) -> list[int]:
    """Check that `choices` is a non-empty, strictly descending list of positive ints; return it as a list."""
    if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
        raise ValueError(f"{what} must be a list of positive integers such as [32, 24, 16], got {choices!r}.")
    choices = list(choices)
    if not choices:
        raise ValueError(f"{what} is empty; give at least one rank, e.g. [32, 24, 16].")
    bad = [c for c in choices if isinstance(c, bool) or not isinstance(c, int) or c <= 0]
    if bad:
        raise ValueError(f"{what} must hold positive integers only; invalid entries: {bad} in {choices}.")
    duplicates = sorted({c for c in choices if choices.count(c) > 1}, reverse=True)
    if duplicates:
        raise ValueError(f"{what} has duplicate ranks {duplicates} in {choices}; list each rank once.")
    if choices != sorted(choices, reverse=True):
        raise ValueError(
            f"{what} must be in descending order (largest rank first): got {choices}, "
            f"use {sorted(choices, reverse=True)}."
        )
    return choices


def validate_width_choices(choices, what: str) -> list[int] | list[float]:
    """Check that `choices` is a non-empty, strictly descending list of positive ints (absolute sizes) or of floats in
    (0, 1] (fractions of the full size) starting at 1.0; return it as a list."""
    sizes = "[32, 24, 16]" if what == "head_choices" else "[11008, 8256, 5504]"
    example = f"{what} must be a descending list of sizes such as {sizes} or of fractions such as [1.0, 0.75, 0.5]"
    if isinstance(choices, (str, bytes)) or not hasattr(choices, "__iter__"):
        raise ValueError(f"{example}, got {choices!r}.")
    choices = list(choices)
    ints = all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in choices)
    fractions = all(isinstance(c, float) and 0 < c <= 1 for c in choices)
    if not choices or not (ints or fractions):
        raise ValueError(f"{example} (all of one kind), got {choices!r}.")
    if any(a <= b for a, b in zip(choices, choices[1:], strict=False)):
        raise ValueError(f"{what} must be strictly descending (largest first), got {choices}.")
    if fractions and choices[0] != 1.0:
        raise ValueError(f"{what} must start with 1.0 (the full width, the maximal subnetwork), got {choices}.")
    return choices


def _validated_width_modules(value, label: str, default) -> list[list[str]]:
    def suffixes(group) -> bool:
        return isinstance(group, (list, tuple)) and group and all(isinstance(n, str) and n for n in group)

    if isinstance(value, (str, bytes)) or len(value) != 2 or not all(suffixes(g) for g in value):
        example = [list(g) for g in default]
        raise ValueError(f"{label} must be [producer suffixes, consumer suffixes], e.g. {example}, got {value!r}.")
    return [list(g) for g in value]


@dataclass
class ElasticLoraConfig(LoraConfig):
    """LoRA with an elastic rank: a weight-sharing super-network of sub-adapters (the "Mode A" elastic adapter).

    A module adapted with maximal rank `r` holds `A` (r × in) and `B` (out × r). A sub-adapter of rank `k` uses the
    prefix slices `A[:k, :]` and `B[:, :k]`, so every sub-adapter shares its weights with the larger ones. Modules are
    organised into *groups* that share one choice (by default q/k/v of one attention block); the choice of every group
    together is a *subnetwork*, see `peft_elastic.search_space` and `peft_elastic.set_subnetwork`.

    The scaling of a module stays `lora_alpha / r` (or `lora_alpha / sqrt(r)` with `use_rslora`) for every active
    rank `k`, as in LoNAS, Shears and SQFT: the sub-adapters are trained with the scaling they will be used with.

    All of `LoraConfig`'s targeting fields (`target_modules`, `exclude_modules`, `layers_to_transform`,
    `layers_pattern`, `modules_to_save`, ...) work as for LoRA. LoRA variants (DoRA, aLoRA, ...) and data-dependent
    initialisations (PiSSA, LoftQ, EVA, ...) are not supported.
    """

    rank_choices: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "The ranks a sub-adapter may use, largest first; the largest must equal `r`, e.g. r=32 with "
                "[32, 24, 16]. Default: r, 3r/4 and r/2 (rounded down)."
            )
        },
    )
    rank_choices_pattern: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Per-module rank choices, overriding `rank_choices`: a mapping from a module name or regex (matched "
                "like LoRA's `rank_pattern`) to a descending list of ranks, e.g. {'down_proj': [16, 8]}. The largest "
                "entry is that module's allocated rank. `rank_pattern` is derived from it and must not be set apart."
            )
        },
    )
    rank_groups: list[list[str]] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules that share one rank choice: each inner list names module-name suffixes (the last name "
                "component, e.g. 'q_proj') that form one group inside every parent module (e.g. one attention "
                "block). Modules in no list form a group of their own. Default: [['q_proj', 'k_proj', 'v_proj']] "
                "(Shears' grouping). Pass [] for one group per module."
            )
        },
    )

    width_choices: list[int] | list[float] | None = field(
        default=None,
        metadata={
            "help": (
                "Mode B (LoNAS): the MLP intermediate widths a subnetwork may use in each decoder layer, largest "
                "first: sizes ([11008, 8256, 5504]; the largest must be the layer's) or fractions ([1.0, 0.75, 0.5]) "
                "that land on whole channels in every layer (0.7 of 1536 is 1075.2: refused, give sizes; "
                "`sizes_at_most` rounds fractions down, e.g. to multiples of 64). "
                "The subnetwork keeps the first channels: the base weights and adapters of the producers "
                "(width_modules[0]) lose output rows, those of the consumers (width_modules[1]) input columns. All of "
                "them must be in target_modules and be torch.nn.Linear. None: the MLP width is fixed."
            )
        },
    )
    width_modules: list[list[str]] = field(
        default_factory=lambda: [list(group) for group in DEFAULT_WIDTH_MODULES],
        metadata={
            "help": (
                "[producers, consumers] of the elastic MLP width: module-name suffixes within one parent module. "
                "Default [['gate_proj', 'up_proj'], ['down_proj']] (Llama, Mistral, Qwen)."
            )
        },
    )
    head_choices: list[int] | list[float] | None = field(
        default=None,
        metadata={
            "help": (
                "Mode B: the numbers of attention (query) heads a subnetwork may use in each attention block, "
                "largest first: counts ([32, 24, 16]; the largest must be the block's) or fractions ([1.0, 0.75]) "
                "that land on such counts. The first heads are kept; with grouped-query attention each count must be "
                "a multiple of the query heads per key/value head (9 query heads over 3 key/value heads: 9, 6 or 3), "
                "and the key/value heads narrow with them. None: fixed."
            )
        },
    )
    head_modules: list[list[str]] = field(
        default_factory=lambda: [list(group) for group in DEFAULT_HEAD_MODULES],
        metadata={
            "help": (
                "[producers, consumers] of the elastic heads: [[query, key, value], [output]] suffixes. Default "
                "[['q_proj', 'k_proj', 'v_proj'], ['o_proj']]."
            )
        },
    )

    droppable_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Mode B (Sukthanker et al.): indices of the decoder blocks a subnetwork may drop; each becomes a "
                "group '<blocks>.<i>:block' with choices [1, 0] (keep, drop). Each needs an adapted module inside "
                "it, and at least one block must stay. None: every block stays."
            )
        },
    )
    base_fingerprint: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": (
                "Set by peft_elastic, not by hand. Mode B only (width_choices, head_choices or droppable_layers): a "
                "fingerprint of the base weights the adapter was created on, taken when get_peft_model injects it: "
                "for each elastic producer layer (and the first adapted layer of each droppable block) "
                "'<out>x<in> row:norm,projection ...' for 8 of its weight rows. A Mode B adapter slices the base by "
                "channel and head position, so it fits only that base (e.g. the one reorder_by_importance ordered): "
                "loading it (PeftModel.from_pretrained, load_adapter), export_compressed_model and a narrowing "
                "merge_and_unload() raise a ValueError on a base whose rows differ (loading the same weights in "
                "another dtype passes). None (an adapter saved by an older version): not checked; it then takes the "
                "fingerprint of the base it is loaded on."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.ELASTIC_LORA
        if self.droppable_layers is not None:
            layers = self.droppable_layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise ValueError(f"droppable_layers must be a list of decoder block indices, got {layers!r}.")
            layers = list(layers)
            bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad or not layers or len(set(layers)) != len(layers):
                raise ValueError(
                    f"droppable_layers must be a non-empty list of distinct block indices >= 0, got {layers!r}."
                )
            self.droppable_layers = sorted(layers)
        if self.width_choices is not None:
            self.width_choices = validate_width_choices(self.width_choices, "width_choices")
        if self.head_choices is not None:
            self.head_choices = validate_width_choices(self.head_choices, "head_choices")
        for label, default in (("width_modules", DEFAULT_WIDTH_MODULES), ("head_modules", DEFAULT_HEAD_MODULES)):
            setattr(self, label, _validated_width_modules(getattr(self, label), label, default))
        if len(self.head_modules[0]) != 3:
            raise ValueError(
                f"head_modules[0] names the query, key and value projections (3 suffixes), got {self.head_modules[0]}."
            )
        self._check_supported()
        if self.rank_choices is None:
            self.rank_choices = default_rank_choices(self.r)
        self.rank_choices = validate_rank_choices(self.rank_choices, "rank_choices")
        if self.rank_choices[0] != self.r:
            raise ValueError(
                f"The largest of rank_choices={self.rank_choices} must equal r={self.r} (the rank that is allocated): "
                f"set r={self.rank_choices[0]} or make {self.r} the first choice."
            )
        self.rank_choices_pattern = {
            key: validate_rank_choices(value, f"rank_choices_pattern[{key!r}]")
            for key, value in dict(self.rank_choices_pattern).items()
        }
        derived = {key: value[0] for key, value in self.rank_choices_pattern.items()}
        if self.rank_pattern and dict(self.rank_pattern) != derived:
            raise ValueError(
                f"rank_pattern={dict(self.rank_pattern)} is derived from rank_choices_pattern in ElasticLoraConfig "
                f"(it would be {derived}); set per-module ranks with rank_choices_pattern instead."
            )
        self.rank_pattern = derived
        if self.rank_groups is None:
            self.rank_groups = [list(group) for group in DEFAULT_RANK_GROUPS]
        self.rank_groups = self._validated_groups(self.rank_groups)

    def _check_supported(self) -> None:
        variants = [
            f.name
            for f in dataclasses.fields(LoraConfig)
            if f.metadata.get("is_lora_variant") and getattr(self, f.name)
        ]
        if self.use_qalora:
            variants.append("use_qalora")
        if variants:
            raise ValueError(
                f"ElasticLoraConfig does not support the LoRA variant(s) {variants}: leave them unset (an elastic "
                "rank slices plain LoRA factors)."
            )
        if self.init_lora_weights not in SUPPORTED_INIT:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by ElasticLoraConfig; use one of "
                f"{list(SUPPORTED_INIT)} (data-dependent initialisations assume a fixed rank)."
            )
        if self.target_parameters:
            raise ValueError(
                f"target_parameters={self.target_parameters} is not supported by ElasticLoraConfig; target modules "
                "with target_modules."
            )

    @staticmethod
    def _validated_groups(groups) -> list[list[str]]:
        if isinstance(groups, (str, bytes)) or not all(
            isinstance(g, (list, tuple)) and g and all(isinstance(n, str) and n for n in g) for g in groups
        ):
            raise ValueError(
                f"rank_groups must be a list of non-empty lists of module-name suffixes, e.g. "
                f"[['q_proj', 'k_proj', 'v_proj']]; got {groups!r}."
            )
        seen: dict[str, int] = {}
        for index, group in enumerate(groups):
            for name in group:
                if name in seen:
                    raise ValueError(
                        f"Module suffix {name!r} appears in rank_groups[{seen[name]}] and rank_groups[{index}] "
                        f"({groups}); each suffix may belong to one group only."
                    )
                seen[name] = index
        return [list(g) for g in groups]

    def rank_choices_for(self, module_name: str) -> list[int]:
        """The descending rank choices of the module called `module_name` (its name inside the base model)."""
        key = get_pattern_key(self.rank_choices_pattern.keys(), module_name)
        return list(self.rank_choices_pattern.get(key, self.rank_choices))

    def layer_variant(self):
        """The variant the layers of this adapter compute with (`peft_elastic.tuners.elastic_lora.variant`), or
        None for the plain elastic update. Configs of other tuners built on the elastic layers return theirs."""
        return None
