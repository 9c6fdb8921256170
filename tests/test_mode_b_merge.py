"""`merge_and_unload()` of a Mode B model whose active subnetwork narrows the base returns the physically smaller
model of that subnetwork: equal in logits to the super-network with the subnetwork active, with the cost model's
parameter count, and a standard checkpoint (`AutoModelForCausalLM`) when the widths are uniform."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_lora_b
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.compressed import SHAPES_KEY
from peft_elastic.toy import tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PICKS = {
    "heuristic": peft_elastic.heuristic_subnetwork,
    "minimal": peft_elastic.minimal_subnetwork,
    "maximal": peft_elastic.maximal_subnetwork,
    "random": lambda model: peft_elastic.sample_subnetwork(model, seed=4),
}


def mode_b(**kwargs) -> PeftModel:
    """The issue's setting: intermediate 384, widths [1.0, 0.75, 0.5], ranks [8, 6, 4], random adapters."""
    torch.manual_seed(0)
    options = dict(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=ALL, width_choices=[1.0, 0.75, 0.5])
    model = get_peft_model(
        tiny_llama(intermediate_size=384, num_hidden_layers=3), ElasticLoraConfig(**options | kwargs)
    )
    randomize_lora_b(model, std=0.2)
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("pick", list(PICKS))
def test_merge_and_unload_is_the_active_subnetwork(input_ids, tmp_path, pick):
    model = mode_b()
    subnetwork = PICKS[pick](model)
    peft_elastic.set_subnetwork(model, subnetwork)
    expected = logits(model, input_ids)
    cost = peft_elastic.subnetwork_cost(model)
    narrowing = bool(peft_elastic.subnetwork.removed_from_base(model))
    assert narrowing == (pick != "maximal")
    merged = model.merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    assert parameters(merged) == cost.params
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-5, atol=1e-5)
    widths = {merged.model.layers[i].mlp.up_proj.out_features for i in range(3)}
    assert widths == {subnetwork[f"model.layers.{i}.mlp:width"] for i in range(3)}
    if narrowing:  # the super-network is left as it was
        assert peft_elastic.get_subnetwork(model) == subnetwork
        torch.testing.assert_close(logits(model, input_ids), expected)
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    if len(widths) == 1:  # one width for every layer: a standard checkpoint
        assert config["intermediate_size"] == widths.pop() and SHAPES_KEY not in config
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    else:
        assert SHAPES_KEY in config
        again = peft_elastic.load_compressed_model(tmp_path / "merged")
    torch.testing.assert_close(logits(again, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_heads_and_dropped_blocks(input_ids, tmp_path):
    model = mode_b(width_choices=[1.0, 0.5], head_choices=[4, 2], droppable_layers=[1])
    subnetwork = peft_elastic.heuristic_subnetwork(model)
    subnetwork |= {"model.layers.1:block": 0} | {f"model.layers.{i}.self_attn:heads": 2 for i in range(3)}
    subnetwork |= {f"model.layers.{i}.mlp:width": 192 for i in range(3)}
    peft_elastic.set_subnetwork(model, subnetwork)
    expected = logits(model, input_ids)
    params = peft_elastic.subnetwork_cost(model).params
    merged = model.merge_and_unload()
    assert len(merged.model.layers) == 2 and merged.config.num_hidden_layers == 2
    assert (merged.config.num_attention_heads, merged.config.num_key_value_heads) == (2, 1)
    assert parameters(merged) == params
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(again, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_full_size_merge_and_unload_leaves_no_block_hooks(input_ids):
    model = mode_b(droppable_layers=[1])
    peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))
    base_blocks = list(model.get_base_model().model.layers)
    assert base_blocks[1]._forward_hooks  # the skip hook of the droppable block
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert merged.model.layers[1] is base_blocks[1]  # an in-place merge, as for LoRA
    assert not any(m._forward_hooks for m in merged.modules())
    assert not hasattr(merged.model.layers[1], "_peft_elastic_skip")
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_a_narrowing_adapter_is_merged_alone(input_ids):
    model = mode_b()
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    model.add_adapter("other", ElasticLoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"'default''s subnetwork narrows the base .* merge it alone"):
        model.merge_and_unload(adapter_names=["default", "other"])
    merged = model.merge_and_unload(adapter_names=["default"])
    assert merged.model.layers[0].mlp.up_proj.out_features == 192


def test_a_sub_adapter_cannot_drop_blocks(tmp_path):
    model = mode_b(width_choices=None, droppable_layers=[1])
    dropping = peft_elastic.maximal_subnetwork(model) | {"model.layers.1:block": 0}
    with pytest.raises(ValueError, match=r"drops blocks of it \(1 modules or blocks, e.g. 'model.layers.1'\)"):
        peft_elastic.export_sub_adapter(model, tmp_path / "sub", dropping)
    assert not (tmp_path / "sub").exists()
    peft_elastic.export_sub_adapter(model, tmp_path / "sub", peft_elastic.maximal_subnetwork(model))
