"""Finding a decoder's blocks and the inputs that reach the first one, from the model's structure alone.

Works for the usual causal-LM layouts (`model.layers` of Llama/Mistral/Qwen2, `model.decoder.layers` of OPT,
`gpt_neox.layers` of GPT-NeoX, `transformer.h` of GPT-2): the blocks are the `nn.ModuleList` with
`config.num_hidden_layers` entries.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PRUNABLE = (nn.Linear, Conv1D)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """`(name, blocks)`: the `nn.ModuleList` of `model`'s decoder blocks."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [(name, m) for name, m in lists if count is None or len(m) == count]
    from ..quantization.layers import is_gptq_layer

    linear = [(name, m) for name, m in matching if any(isinstance(x, PRUNABLE) for x in m[0].modules())]
    matching = linear or [(name, m) for name, m in matching if any(map(is_gptq_layer, m[0].modules()))]
    if not matching:
        raise ValueError(
            f"Could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"{count if count is not None else 'several'} blocks with linear layers. Pass a causal LM such as "
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, OPTForCausalLM or GPTNeoXForCausalLM."
        )
    return min(matching, key=lambda item: item[0].count("."))


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
