"""export_sub_adapter: a stock LoRA checkpoint that PEFT loads without peft_elastic and that gives the same outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import TARGETS, randomize_lora_b
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peft_elastic
import peft_elastic.export
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama

QKV0 = "model.layers.0.self_attn.q_proj+k_proj+v_proj"


def elastic(**kwargs):
    kwargs = {"r": 16, "lora_alpha": 32, "rank_choices": [16, 12, 8], "target_modules": TARGETS, **kwargs}
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(**kwargs))
    randomize_lora_b(model)
    return model


def test_exported_config_keeps_each_modules_scaling(tmp_path):
    model = elastic(rank_choices_pattern={"down_proj": [8, 4]})
    sub = {**peft_elastic.heuristic_subnetwork(model), QKV0: 8}
    peft_elastic.export_sub_adapter(model, tmp_path / "sub", subnetwork=sub)
    config = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8
    assert config["rank_pattern"]["model.layers.1.self_attn.k_proj"] == 12
    assert config["rank_pattern"]["model.layers.0.mlp.down_proj"] == 8  # [8, 4] -> midpoint 8
    assert config["lora_alpha"] / config["r"] == 32 / 16  # the scaling most modules share
    for module, r in config["rank_pattern"].items():  # down_proj's own 32 / 8 is folded into its B
        assert config["alpha_pattern"][module] / r == pytest.approx(32 / 16)
    tensors = load_file(tmp_path / "sub" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (8, 64)
    assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 12)
    assert not [k for k in tensors if "extra_state" in k]
    # exporting another subnetwork does not change the active one
    assert set(peft_elastic.get_subnetwork(model).values()) == {16, 8}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_stock_peft_reload_in_process_gives_the_same_outputs(tmp_path, input_ids, use_rslora):
    model = elastic(use_rslora=use_rslora)
    sub = peft_elastic.sample_subnetwork(model, seed=2)
    peft_elastic.set_subnetwork(model, sub)
    expected = model(input_ids).logits
    peft_elastic.export_sub_adapter(model, tmp_path / "sub")
    stock = PeftModel.from_pretrained(tiny_llama(), tmp_path / "sub")
    assert type(stock.peft_config["default"]) is LoraConfig
    assert (stock(input_ids).logits - expected).abs().max() < 1e-5


def test_stock_peft_reload_in_a_process_without_peft_elastic(tmp_path, input_ids):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # as users load it: the config names the folder
    model = get_peft_model(
        base, ElasticLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, modules_to_save=["lm_head"])
    )
    randomize_lora_b(model)
    peft_elastic.set_subnetwork(model, peft_elastic.sample_subnetwork(model, seed=11))
    head = model.base_model.model.lm_head.modules_to_save["default"]
    head.weight.data.mul_(1.5)  # the trained head must travel with the export
    expected = model(input_ids).logits.detach()
    peft_elastic.export_sub_adapter(model, tmp_path / "sub")
    config = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert config["auto_mapping"] == {"base_model_class": "LlamaForCausalLM", "parent_library": type(base).__module__}
    save_file({"input_ids": input_ids, "expected": expected}, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys
        from peft import AutoPeftModelForCausalLM, PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        io = load_file({str(tmp_path / "io.safetensors")!r})
        for model in (
            PeftModel.from_pretrained(base, {str(tmp_path / "sub")!r}),
            AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "sub")!r}),  # finds the base itself
        ):
            print("MAXDIFF", float((model(io["input_ids"]).logits - io["expected"]).abs().max()))
        assert "peft_elastic" not in sys.modules, "peft_elastic was imported"
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    diffs = [float(part.split()[0]) for part in result.stdout.split("MAXDIFF")[1:]]
    assert len(diffs) == 2 and max(diffs) < 1e-5, diffs


def test_export_is_all_or_nothing(tmp_path, monkeypatch):
    model = elastic()
    target = tmp_path / "sub"
    target.mkdir()
    (target / "adapter_config.json").write_text("old")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_elastic.export, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):  # a failed export replaces nothing, even with overwrite
        peft_elastic.export_sub_adapter(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json"]
    assert (target / "adapter_config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no staging folder left behind


def test_export_errors(tmp_path):
    model = elastic()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"save_directory '.*file' exists and is not a directory"):
        peft_elastic.export_sub_adapter(model, tmp_path / "file")
    with pytest.raises(ValueError, match=r"export needs the PeftModel .* got ElasticLoraModel"):
        peft_elastic.export_sub_adapter(model.base_model, tmp_path / "sub")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj': 10 \(valid: \[16, 12, 8\]\)"):
        peft_elastic.export_sub_adapter(model, tmp_path / "sub", subnetwork={"model.layers.0.mlp.up_proj": 10})
    assert not (tmp_path / "sub").exists()
