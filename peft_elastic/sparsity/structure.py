"""The inputs that reach a decoder's first block, and a block's output, for calibrating block by block. The blocks
themselves are found by `peft_elastic.blocks.decoder_blocks`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..blocks import PRUNABLE, decoder_blocks

__all__ = ["PRUNABLE", "block_output", "decoder_blocks", "first_block_inputs", "prunable_modules"]


def prunable_modules(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of one block by their name inside it (e.g. `self_attn.q_proj`)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, PRUNABLE)}


class _Stop(Exception):
    pass


def first_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: Iterable[dict[str, torch.Tensor]]
) -> list[tuple[torch.Tensor, dict]]:
    """Run `model` on each batch up to its first block; return what the block receives: (hidden states, keyword
    arguments such as attention mask and position embeddings), one entry per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
        kwargs["use_cache"] = False
        captured.append((hidden, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The hidden states a block returns (blocks return a tensor or a tuple whose first entry it is)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
