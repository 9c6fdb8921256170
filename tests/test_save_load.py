"""Saving and loading elastic super-adapters: PeftModel.from_pretrained, transformers' load_adapter, safetensors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import TARGETS, randomize_lora_b
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama


def saved_super(tmp_path, input_ids):
    model = get_peft_model(
        tiny_llama(),
        ElasticLoraConfig(
            r=16,
            lora_alpha=32,
            rank_choices=[16, 12, 8],
            rank_choices_pattern={"down_proj": [8, 4]},
            target_modules=TARGETS,
        ),
    )
    randomize_lora_b(model)
    subnetwork = peft_elastic.sample_subnetwork(model, seed=4)
    peft_elastic.set_subnetwork(model, subnetwork)
    model.save_pretrained(tmp_path / "super")
    return model, subnetwork, model(input_ids).logits


def test_roundtrip_restores_weights_search_space_and_active_subnetwork(tmp_path, input_ids):
    model, subnetwork, logits = saved_super(tmp_path, input_ids)
    assert sorted(p.name for p in (tmp_path / "super").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "super" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ELASTIC_LORA" and config["rank_choices"] == [16, 12, 8]

    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "super")
    assert isinstance(again.peft_config["default"], ElasticLoraConfig)
    assert peft_elastic.search_space(again) == peft_elastic.search_space(model)
    assert peft_elastic.get_subnetwork(again) == subnetwork
    assert (again(input_ids).logits - logits).abs().max() == 0
    # all subnetworks are restored, not just the active one
    for sub in (peft_elastic.maximal_subnetwork(model), peft_elastic.minimal_subnetwork(model)):
        peft_elastic.set_subnetwork(model, sub)
        peft_elastic.set_subnetwork(again, sub)
        assert (again(input_ids).logits - model(input_ids).logits).abs().max() == 0


def test_saved_weights_are_full_rank_factors_plus_active_rank(tmp_path, input_ids):
    _, subnetwork, _ = saved_super(tmp_path, input_ids)
    tensors = load_file(tmp_path / "super" / "adapter_model.safetensors")
    assert len(tensors) == 3 * 10
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A"
    assert tensors[f"{key}.weight"].shape == (8, 128)
    assert int(tensors[f"{key}._extra_state"]) == subnetwork["model.layers.0.mlp.down_proj"]


def test_reload_trainable_and_load_adapter_as_second_adapter(tmp_path, input_ids):
    _, subnetwork, logits = saved_super(tmp_path, input_ids)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "super", is_trainable=True)
    assert sum(p.requires_grad for p in again.parameters()) == 20
    again.load_adapter(tmp_path / "super", adapter_name="copy")
    assert peft_elastic.get_subnetwork(again, adapter_name="copy") == subnetwork
    again.set_adapter("copy")
    assert (again(input_ids).logits - logits).abs().max() == 0


def test_transformers_load_adapter(tmp_path, input_ids):
    _, subnetwork, logits = saved_super(tmp_path, input_ids)
    base = tiny_llama()
    base.load_adapter(str(tmp_path / "super"))
    layer = base.model.layers[0].self_attn.q_proj
    assert layer.active_rank("default") == subnetwork["model.layers.0.self_attn.q_proj+k_proj+v_proj"]
    assert (base(input_ids).logits - logits).abs().max() == 0


def test_loading_without_importing_peft_elastic_names_the_type(tmp_path, input_ids):
    saved_super(tmp_path, input_ids)
    tiny_llama().save_pretrained(tmp_path / "base")
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import PeftModel\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})\n"
        f"PeftModel.from_pretrained(base, {str(tmp_path / 'super')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # PEFT's own lookup fails; the type it names is the one the docs' troubleshooting section explains.
    assert "KeyError: 'ELASTIC_LORA'" in result.stderr


def test_state_dict_roundtrip_through_torch_load_is_not_used(tmp_path, input_ids):
    """Only safetensors is written: no pickle file is produced, even with safe_serialization left at its default."""
    model, _, _ = saved_super(tmp_path, input_ids)
    assert not list((tmp_path / "super").glob("*.bin"))
    assert torch.equal(
        load_file(tmp_path / "super" / "adapter_model.safetensors")[
            "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
        ],
        model.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight.detach(),
    )


def test_low_cpu_mem_usage_loading(tmp_path, input_ids):
    _, subnetwork, logits = saved_super(tmp_path, input_ids)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "super", low_cpu_mem_usage=True)
    assert {p.device.type for p in again.parameters()} == {"cpu"}
    assert peft_elastic.get_subnetwork(again) == subnetwork
    assert (again(input_ids).logits - logits).abs().max() == 0
