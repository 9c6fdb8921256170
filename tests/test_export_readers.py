"""An exported sub-adapter read by consumers that do not read it as PEFT does.

The readers here are written from the formats' rules, not from our code: a *pattern-free* reader (vLLM's rule: it
keeps only `r`, `lora_alpha` and `use_rslora` from `adapter_config.json`, applies one scaling `lora_alpha / r` — or
`/ √r` — to every module and takes each module's rank from its tensors) and a *per-tensor-rank* reader (llama.cpp's
rule: `lora_alpha / rank of the tensor`). Each merges `W += scaling · B @ A` into a fresh base and is compared with the
elastic model with that subnetwork active, everything in float64, so that a wrong scaling (0.2 or more in the logits)
stands far above rounding (1e-12).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_elastic
from peft_elastic import ElasticLoraConfig, NLSConfig, SparsePEFTConfig
from peft_elastic.toy import tiny_llama

PREFIX = "base_model.model."
TOLERANCE = 1e-9  # float64
PICKS = {
    "maximal": peft_elastic.maximal_subnetwork,
    "minimal": peft_elastic.minimal_subnetwork,
    "heuristic": peft_elastic.heuristic_subnetwork,
    "random": lambda model: peft_elastic.sample_subnetwork(model, seed=5),
}


def read_merged(folder, per_tensor_rank: bool = False) -> torch.nn.Module:
    """A fresh tiny Llama with the adapter in `folder` merged the way a pattern-free reader merges it."""
    config = json.loads((folder / "adapter_config.json").read_text())
    r, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    tensors = load_file(folder / "adapter_model.safetensors")
    model = tiny_llama().double()
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                if ".lora_" not in key:  # modules_to_save: the trained copy replaces the module's weights
                    model.get_parameter(key.removeprefix(PREFIX)).copy_(tensors[key])
                continue
            stem = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[f"{PREFIX}{stem}.lora_B.weight"]
            assert a.shape[0] == b.shape[1], key
            rank = a.shape[0] if per_tensor_rank else r
            scaling = alpha / (math.sqrt(rank) if rslora else rank)
            layer = model.get_submodule(stem)
            layer.weight += scaling * (b @ a)
            bias = tensors.get(f"{PREFIX}{stem}.lora_B.bias")
            if bias is not None:  # LoRA's bias adds to the layer's (Llama's projections have none)
                layer.bias = torch.nn.Parameter(scaling * bias + (0 if layer.bias is None else layer.bias))
    return model


def elastic(config_cls=ElasticLoraConfig, **kwargs):
    kwargs = {"r": 16, "lora_alpha": 32, "rank_choices": [16, 12, 8], "target_modules": TARGETS, **kwargs}
    model = get_peft_model(tiny_llama(), config_cls(**kwargs)).double()
    randomize_lora_b(model)
    return model


def stock(folder) -> PeftModel:
    """Stock PEFT's reading of the export."""
    return PeftModel.from_pretrained(tiny_llama().double(), folder)


@pytest.mark.parametrize("pick", list(PICKS))
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pattern_free_reader_gives_the_elastic_outputs(tmp_path, input_ids, pick, use_rslora):
    model = elastic(use_rslora=use_rslora)
    peft_elastic.set_subnetwork(model, PICKS[pick](model))
    expected = model(input_ids).logits
    peft_elastic.export_sub_adapter(model, tmp_path / "sub")
    config = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    scaling = 32 / (math.sqrt(16) if use_rslora else 16)
    assert config["use_rslora"] is False
    assert config["lora_alpha"] / config["r"] == pytest.approx(scaling, rel=1e-12)
    assert config["r"] == max(peft_elastic.module_ranks(model).values())
    for module, rank in config["rank_pattern"].items():  # the patterns say the same as the single scaling
        assert config["alpha_pattern"][module] / rank == pytest.approx(scaling, rel=1e-12)
    assert (read_merged(tmp_path / "sub")(input_ids).logits - expected).abs().max() < TOLERANCE
    assert (stock(tmp_path / "sub")(input_ids).logits - expected).abs().max() < TOLERANCE


def test_the_issue_example_gets_scaling_two_at_the_heuristic(tmp_path):
    base = tiny_llama()
    config = ElasticLoraConfig(r=32, lora_alpha=64, rank_choices=[32, 24, 16], target_modules=TARGETS)
    model = get_peft_model(base, config)
    peft_elastic.export_sub_adapter(model, tmp_path / "sub", peft_elastic.heuristic_subnetwork(model))
    written = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (24, 48)  # 48 / 24 = 64 / 32 = 2.0, an int as it was
    assert isinstance(written["lora_alpha"], int)


@pytest.mark.parametrize("config_cls", [ElasticLoraConfig, NLSConfig, SparsePEFTConfig])
def test_modules_with_their_own_scaling_are_folded_into_lora_b(tmp_path, input_ids, config_cls):
    # down_proj: maximal rank 8 (scaling 32/8 = 4); v_proj: alpha 8 (scaling 8/16 = 0.5); the rest 32/16 = 2.
    lora_bias = config_cls is not SparsePEFTConfig  # SparsePEFT refuses a LoRA bias
    model = elastic(
        config_cls,
        rank_choices_pattern={"down_proj": [8, 4]},
        alpha_pattern={"v_proj": 8},
        lora_bias=lora_bias,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                param.normal_(0, 0.2)
    peft_elastic.set_subnetwork(model, peft_elastic.sample_subnetwork(model, seed=3))
    expected = model(input_ids).logits
    peft_elastic.export_sub_adapter(model, tmp_path / "sub")
    config = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == 2.0
    tensors = load_file(tmp_path / "sub" / "adapter_model.safetensors")
    down = "model.layers.0.mlp.down_proj"
    rank = peft_elastic.module_ranks(model)[down]
    b = model.base_model.model.get_submodule(down).lora_B["default"]
    assert torch.equal(tensors[f"{PREFIX}{down}.lora_B.weight"], b.weight[:, :rank] * 2.0)  # 4 / 2
    if lora_bias:
        assert torch.equal(tensors[f"{PREFIX}{down}.lora_B.bias"], b.bias * 2.0)
    for reader in (read_merged(tmp_path / "sub"), stock(tmp_path / "sub")):
        assert (reader(input_ids).logits - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("pick", ["minimal", "random"])
@pytest.mark.parametrize("uniform_rank", [True, 32])
def test_uniform_rank_export_is_zero_padded_and_equal(tmp_path, input_ids, pick, uniform_rank):
    model = elastic(rank_choices_pattern={"down_proj": [8, 4]}, modules_to_save=["lm_head"])
    head = model.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight.mul_(1.5)
    peft_elastic.set_subnetwork(model, PICKS[pick](model))
    expected = model(input_ids).logits
    peft_elastic.export_sub_adapter(model, tmp_path / "sub", uniform_rank=uniform_rank)
    config = json.loads((tmp_path / "sub" / "adapter_config.json").read_text())
    rank = max(peft_elastic.module_ranks(model).values()) if uniform_rank is True else 32
    assert (config["r"], config["rank_pattern"], config["alpha_pattern"]) == (rank, {}, {})
    tensors = load_file(tmp_path / "sub" / "adapter_model.safetensors")
    for name, k in peft_elastic.module_ranks(model).items():
        a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == rank
        assert not a[k:].any() and not b[:, k:].any()
    readers = [
        read_merged(tmp_path / "sub"),
        read_merged(tmp_path / "sub", per_tensor_rank=True),  # llama.cpp's rule: the same at one rank
        stock(tmp_path / "sub"),
    ]
    for reader in readers:
        assert (reader(input_ids).logits - expected).abs().max() < TOLERANCE


def test_uniform_rank_errors(tmp_path):
    model = elastic()
    for bad in (8, 0, "16", 2.5):
        with pytest.raises(
            ValueError, match=rf"uniform_rank must be True, False or a rank of at least 16 .* got {bad!r}"
        ):
            peft_elastic.export_sub_adapter(model, tmp_path / "sub", uniform_rank=bad)
    assert not (tmp_path / "sub").exists()
