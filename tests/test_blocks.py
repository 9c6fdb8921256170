"""Mode B block dropping: a droppable decoder block is skipped by the subnetworks that drop it, exports without it,
and is costed without it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_lora_b
from peft import PeftModel, get_peft_model
from test_widths import ALL, dense_subnetwork
from torch import nn

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama


def three_blocks(**kwargs):
    torch.manual_seed(0)
    options = dict(r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL, droppable_layers=[0, 2])
    model = get_peft_model(tiny_llama(num_hidden_layers=3), ElasticLoraConfig(**(options | kwargs)))
    randomize_lora_b(model, std=0.2)
    return model


def without_blocks(model, subnetwork, dropped: list[int]) -> nn.Module:
    """The oracle: `dense_subnetwork` (merged, sliced plain copy) with the dropped blocks physically removed."""
    dense = dense_subnetwork(model, subnetwork)
    dense.model.layers = nn.ModuleList(block for i, block in enumerate(dense.model.layers) if i not in dropped)
    dense.config.num_hidden_layers = len(dense.model.layers)
    for index, block in enumerate(dense.model.layers):
        block.self_attn.layer_idx = index
    return dense


def test_dropping_blocks_equals_the_model_without_them(input_ids, tmp_path):
    model = three_blocks(width_choices=[1.0, 0.5])
    space = peft_elastic.search_space(model)
    assert space["model.layers.0:block"] == [1, 0] and space["model.layers.2:block"] == [1, 0]
    assert "model.layers.1:block" not in space
    assert peft_elastic.heuristic_subnetwork(model)["model.layers.0:block"] == 1  # two choices: keep
    subnetwork = peft_elastic.maximal_subnetwork(model) | {
        "model.layers.0:block": 0,
        "model.layers.1.mlp:width": 64,
        "model.layers.2.mlp.down_proj": 4,
    }
    peft_elastic.set_subnetwork(model, subnetwork)
    assert peft_elastic.get_subnetwork(model) == subnetwork
    assert peft_elastic.subnetwork.dropped_blocks(model) == ["model.layers.0"]
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
        expected = without_blocks(model, subnetwork, [0])(input_ids, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    # the dropped block's adapters get no gradient
    model.zero_grad()
    model(input_ids).logits.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is None or not g.any() for n, g in grads.items() if ".layers.0." in n)
    assert any(g is not None and g.any() for n, g in grads.items() if ".layers.1." in n)

    # saved with the adapter
    model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path / "adapter")
    assert peft_elastic.get_subnetwork(again) == subnetwork

    # exported without it: two blocks, renumbered; the cost model agrees with the exported model
    peft_elastic.export_compressed_model(model, tmp_path / "small")
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    small = peft_elastic.load_compressed_model(tmp_path / "small")
    assert len(small.model.layers) == 2 and small.model.layers[0].mlp.up_proj.out_features == 64
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert peft_elastic.count_parameters(model) == sum(p.numel() for p in small.parameters())
    assert peft_elastic.count_macs(model, seq_len=10) == peft_elastic.count_macs(small, seq_len=10)

    # with the adapters disabled the model is the full base: no block is dropped
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids).logits
        torch.testing.assert_close(base_logits, tiny_llama(num_hidden_layers=3)(input_ids).logits)


def test_generation_with_a_cache_when_the_first_block_is_dropped(input_ids):
    """The dropped block still runs inside the super-network, so the key/value cache (whose length transformers
    reads from block 0) stays in step: cached and uncached greedy decoding agree."""
    model = three_blocks()
    peft_elastic.set_subnetwork(model, {"model.layers.0:block": 0})
    model.eval()
    with torch.no_grad():
        cached = model.generate(input_ids[:1], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(input_ids[:1], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_block_errors():
    with pytest.raises(ValueError, match=r"lists every one of the 3 decoder blocks"):
        three_blocks(droppable_layers=[0, 1, 2])
    with pytest.raises(ValueError, match=r"droppable_layers \[5\] are outside the model's 3 decoder blocks"):
        three_blocks(droppable_layers=[1, 5])
    with pytest.raises(ValueError, match=r"'model.layers.2' \(droppable_layers\) has no module adapted"):
        three_blocks(droppable_layers=[2], layers_to_transform=[0, 1])
    for bad in ([-1], [1, 1], [], "1"):
        with pytest.raises(ValueError, match="droppable_layers must be"):
            ElasticLoraConfig(r=8, droppable_layers=bad)
