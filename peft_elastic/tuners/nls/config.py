"""`NLSConfig`: Shears' Neural Low-rank adapter Search, as a preset of `ElasticLoraConfig` with its own PEFT type.

Shears fine-tunes rank-elastic adapters on a frozen, typically sparse (Wanda) or quantized base. The adapters, the
subnetwork API, merging and export are those of ElasticLoRA; NLS only changes the defaults and the `peft_type`
written to `adapter_config.json` ("NLS"), which PEFT maps back to this class on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.utils import PeftType

from ..elastic_lora.config import ElasticLoraConfig

#: Shears' target modules (Llama/Mistral/Qwen names): attention q/k/v and the MLP's up and down projections.
SHEARS_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass
class NLSConfig(ElasticLoraConfig):
    """Neural Low-rank adapter Search (Shears): rank-elastic LoRA adapters on a frozen (sparse or quantized) base.

    Defaults follow Shears: `r=32`, `lora_alpha=64`, rank choices `[32, 24, 16]` (`r`, `3r/4`, `r/2`), adapters on
    `q_proj`, `k_proj`, `v_proj`, `up_proj`, `down_proj`, and per layer the rank groups `[q, k, v]`, `[up]`,
    `[down]` (q/k/v of one attention block share a rank; every other module has its own). For architectures with
    other module names, set `target_modules`. Everything else is `ElasticLoraConfig`.
    """

    r: int = field(default=32, metadata={"help": "The maximal (allocated) rank. Shears uses 32."})
    lora_alpha: int = field(
        default=64, metadata={"help": "LoRA alpha; the scaling is lora_alpha / r for every active rank."}
    )
    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(SHEARS_TARGET_MODULES),
        metadata={
            "help": (
                "Modules to adapt (names, suffixes or a regex, as for LoRA). Default: Shears' "
                "['q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj']."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.width_choices is not None or self.head_choices is not None:
            raise ValueError(
                "NLSConfig searches adapter ranks only and leaves the base untouched (Shears); for elastic widths or "
                "heads (LoNAS, Mode B) use ElasticLoraConfig(width_choices=..., head_choices=...)."
            )
        self.peft_type = PeftType.NLS
