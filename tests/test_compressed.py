"""`export_compressed_model`: a Mode B subnetwork saved as a physically smaller model that loads and computes what
the subnetwork computed inside the super-network."""

from __future__ import annotations

import json

import pytest
import torch
from test_widths import mode_b
from transformers import AutoModelForCausalLM

import peft_elastic
from peft_elastic.compressed import SHAPES_KEY, export_compressed_model, load_compressed_model


def uniform(model, width: int, heads: int) -> dict[str, int]:
    space = peft_elastic.search_space(model)
    chosen = peft_elastic.heuristic_subnetwork(model)
    for name in space:
        if name.endswith(":width"):
            chosen[name] = width
        elif name.endswith(":heads"):
            chosen[name] = heads
    return chosen


@pytest.mark.parametrize("width, heads", [(64, 2), (128, 4), (64, 4)])
def test_uniform_subnetwork_exports_a_standard_checkpoint(input_ids, tmp_path, width, heads):
    model = mode_b()
    subnetwork = uniform(model, width, heads)
    peft_elastic.set_subnetwork(model, subnetwork)
    with torch.no_grad():
        expected = model(input_ids).logits
    export_compressed_model(model, tmp_path / "small")
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        width,
        heads,
        heads // 2,
    )
    assert config["head_dim"] == 16 and SHAPES_KEY not in config
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert small.model.layers[1].mlp.down_proj.weight.shape == (64, width)
    assert small.model.layers[0].self_attn.k_proj.weight.shape == (heads // 2 * 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    base_params = sum(p.numel() for p in peft_elastic.toy.tiny_llama().parameters())
    small_params = sum(p.numel() for p in small.parameters())
    assert (small_params < base_params) == ((width, heads) != (128, 4))
    assert peft_elastic.get_subnetwork(model) == subnetwork  # the super-network is unchanged


def test_mixed_widths_need_the_one_line_loader(input_ids, tmp_path):
    model = mode_b()
    subnetwork = uniform(model, 128, 4) | {"model.layers.0.mlp:width": 64, "model.layers.1.self_attn:heads": 2}
    with torch.no_grad():
        peft_elastic.set_subnetwork(model, subnetwork)
        expected = model(input_ids).logits
        peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))
    export_compressed_model(model, tmp_path / "small", subnetwork)  # a subnetwork other than the active one
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert config[SHAPES_KEY] == {
        "model.layers.0.mlp.gate_proj": [64, 64],
        "model.layers.0.mlp.up_proj": [64, 64],
        "model.layers.0.mlp.down_proj": [64, 64],
        "model.layers.1.self_attn.q_proj": [32, 64],
        "model.layers.1.self_attn.k_proj": [16, 64],
        "model.layers.1.self_attn.v_proj": [16, 64],
        "model.layers.1.self_attn.o_proj": [64, 32],
    }
    small = load_compressed_model(tmp_path / "small")
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_errors(tmp_path):
    model = mode_b()
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp:width': 96 \(valid: \[128, 64\]\)"):
        export_compressed_model(model, tmp_path / "x", {"model.layers.0.mlp:width": 96})
    with pytest.raises(ValueError, match="needs a PeftModel with an elastic adapter"):
        export_compressed_model(model.get_base_model(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_sizes_transformers_refuses_fall_back_to_per_module_shapes(input_ids, tmp_path):
    """6 heads of 8 in a hidden size of 64: uniform, but transformers' config validation wants the hidden size to be
    a multiple of the number of heads, so the export records per-module shapes."""
    from peft import get_peft_model

    from peft_elastic import ElasticLoraConfig
    from peft_elastic.toy import tiny_llama

    base = tiny_llama(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    config = ElasticLoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], head_choices=[8, 6])
    model = get_peft_model(base, config)
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    with torch.no_grad():
        expected = model(input_ids).logits
    export_compressed_model(model, tmp_path / "small")
    saved = json.loads((tmp_path / "small" / "config.json").read_text())
    assert saved["num_attention_heads"] == 8 and saved[SHAPES_KEY]["model.layers.0.self_attn.q_proj"] == [48, 64]
    with torch.no_grad():
        torch.testing.assert_close(load_compressed_model(tmp_path / "small")(input_ids).logits, expected)
