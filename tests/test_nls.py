"""NLSConfig: Shears' defaults, its own PEFT type, and the ElasticLoRA machinery underneath (not a copy)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import randomize_lora_b
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_elastic
from peft_elastic import ElasticLoraConfig, ElasticLoraModel, NLSConfig
from peft_elastic.toy import tiny_llama
from peft_elastic.tuners.elastic_lora import ElasticLoraLayer

SHEARS_TARGETS = {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}


def test_registered_as_its_own_peft_type_on_the_elastic_tuner():
    assert PeftType("NLS") is PeftType.NLS
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.NLS] is NLSConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.NLS] is ElasticLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.NLS] == "lora_"
    assert issubclass(NLSConfig, ElasticLoraConfig)
    before = len(PeftType._member_names_)
    importlib.reload(peft_elastic)
    assert len(PeftType._member_names_) == before


def test_shears_defaults():
    config = NLSConfig()
    assert config.peft_type == PeftType.NLS
    assert (config.r, config.lora_alpha, config.rank_choices) == (32, 64, [32, 24, 16])
    assert set(config.target_modules) == SHEARS_TARGETS
    assert config.rank_groups == [["q_proj", "k_proj", "v_proj"]]
    assert NLSConfig(r=8, lora_alpha=16).rank_choices == [8, 6, 4]
    # per layer: [q, k, v], [up], [down]
    model = get_peft_model(tiny_llama(), NLSConfig())
    assert list(peft_elastic.search_space(model)) == [
        f"model.layers.{i}.{name}"
        for i in range(2)
        for name in ("self_attn.q_proj+k_proj+v_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    assert all(choices == [32, 24, 16] for choices in peft_elastic.search_space(model).values())


def test_validation_is_elastic_loras():
    with pytest.raises(ValueError, match=r"The largest of rank_choices=\[16, 8\] must equal r=32"):
        NLSConfig(rank_choices=[16, 8])
    with pytest.raises(ValueError, match="descending order"):
        NLSConfig(r=8, rank_choices=[4, 8])


def test_same_outputs_as_elastic_lora_and_roundtrip(tmp_path):
    input_ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    models = []
    for cls in (NLSConfig, ElasticLoraConfig):
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_llama(), cls(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=sorted(SHEARS_TARGETS))
        )
        randomize_lora_b(model)
        models.append(model)
    nls, elastic = models
    assert all(
        type(m).__module__.startswith("peft_elastic.tuners.elastic_lora")
        for m in nls.modules()
        if isinstance(m, ElasticLoraLayer)
    )
    subnetwork = peft_elastic.sample_subnetwork(nls, seed=4)
    for model in models:
        peft_elastic.set_subnetwork(model, subnetwork)
    with torch.no_grad():
        logits = nls(input_ids).logits
        assert torch.equal(logits, elastic(input_ids).logits)

    nls.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "NLS"
    assert type(PeftConfig.from_pretrained(tmp_path)) is NLSConfig
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert type(again.peft_config["default"]) is NLSConfig
    assert peft_elastic.get_subnetwork(again) == subnetwork
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, logits)
