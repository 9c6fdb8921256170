"""`peft_elastic.blocks.decoder_blocks`: the one rule that finds a causal LM's decoder blocks, on the usual layouts,
wrapped by PEFT or not, and its error on a model without them."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from peft_elastic.blocks import PRUNABLE, decoder_blocks, is_gptq_layer
from peft_elastic.toy import tiny_llama


def test_llama_blocks_are_model_layers_also_under_peft():
    model = tiny_llama(num_hidden_layers=3)
    name, blocks = decoder_blocks(model)
    assert name == "model.layers" and len(blocks) == 3
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped_name, wrapped = decoder_blocks(peft_model)
    assert wrapped_name == "base_model.model.model.layers" and wrapped is blocks


@pytest.mark.parametrize(
    ("build", "expected", "count"),
    [
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)), "transformer.h", 2),
        (
            lambda: OPTForCausalLM(
                OPTConfig(
                    num_hidden_layers=3,
                    hidden_size=32,
                    ffn_dim=64,
                    num_attention_heads=2,
                    word_embed_proj_dim=32,
                    vocab_size=64,
                )
            ),
            "model.decoder.layers",
            3,
        ),
    ],
    ids=["gpt2-conv1d", "opt"],
)
def test_other_layouts(build, expected, count):
    name, blocks = decoder_blocks(build())
    assert (name, len(blocks)) == (expected, count)
    assert any(isinstance(m, PRUNABLE) for m in blocks[0].modules())


def test_a_module_list_of_the_same_length_without_linear_layers_is_not_taken():
    model = tiny_llama(num_hidden_layers=2)
    # a decoy as long as the block list, shallower, but holding no linear layer
    model.decoy = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])
    assert decoder_blocks(model)[0] == "model.layers"


def test_a_model_without_blocks_gets_a_clear_error():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 4})()
            self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    with pytest.raises(
        ValueError, match=r"Could not find the decoder blocks of NoBlocks: no nn.ModuleList of 4 blocks"
    ):
        decoder_blocks(NoBlocks())


def test_plain_layers_are_not_gptq_layers():
    assert not is_gptq_layer(nn.Linear(2, 2)) and not is_gptq_layer(torch.nn.Embedding(3, 2))
