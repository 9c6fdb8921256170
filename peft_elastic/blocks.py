"""A causal LM's decoder blocks and linear layers, found from the model's structure alone: the one rule that
sparsification, the importance ordering, dropped blocks, compressed exports and FSDP sharding share.

Works for the usual causal-LM layouts (`model.layers` of Llama/Mistral/Qwen2, `model.decoder.layers` of OPT,
`gpt_neox.layers` of GPT-NeoX, `transformer.h` of GPT-2), wrapped by PEFT or not: the blocks are the shallowest
`nn.ModuleList` of `config.num_hidden_layers` entries whose first entry holds linear layers (or GPTQ ones).
"""

from __future__ import annotations

import sys

from torch import nn
from transformers.pytorch_utils import Conv1D

#: The layer types that hold a prunable (and adaptable) weight matrix.
PRUNABLE = (nn.Linear, Conv1D)


def is_gptq_layer(module: nn.Module) -> bool:
    """Whether `module` is a gptqmodel quantized linear layer. A model with GPTQ layers has imported gptqmodel
    already; importing it otherwise would only cost time and change process-wide settings."""
    qlinear = sys.modules.get("gptqmodel.nn_modules.qlinear")
    return qlinear is not None and isinstance(module, qlinear.BaseQuantLinear)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """`(name, blocks)`: the `nn.ModuleList` of `model`'s decoder blocks (see the module's docstring for the rule)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [(name, m) for name, m in lists if count is None or len(m) == count]
    linear = [(name, m) for name, m in matching if any(isinstance(x, PRUNABLE) for x in m[0].modules())]
    matching = linear or [(name, m) for name, m in matching if any(map(is_gptq_layer, m[0].modules()))]
    if not matching:
        raise ValueError(
            f"Could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            f"{count if count is not None else 'several'} blocks (config.num_hidden_layers) with linear layers. "
            "Pass a causal LM such as LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, OPTForCausalLM or "
            "GPTNeoXForCausalLM."
        )
    return min(matching, key=lambda item: item[0].count("."))
