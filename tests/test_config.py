"""ElasticLoraConfig: defaults, validation errors, registration with PEFT."""

from __future__ import annotations

import importlib

import pytest
from conftest import TARGETS
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_elastic
from peft_elastic import ElasticLoraConfig, ElasticLoraModel
from peft_elastic.toy import tiny_llama


def test_registered_as_a_real_peft_type():
    assert PeftType("ELASTIC_LORA") is PeftType.ELASTIC_LORA
    assert "ELASTIC_LORA" in [t.value for t in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ELASTIC_LORA] is ElasticLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ELASTIC_LORA] is ElasticLoraModel
    assert ElasticLoraConfig(target_modules=TARGETS).peft_type == PeftType.ELASTIC_LORA


def test_registration_is_idempotent():
    before = len(PeftType._member_names_)
    importlib.reload(peft_elastic)
    peft_elastic._registry.register_tuner("elastic_lora", ElasticLoraConfig, ElasticLoraModel)
    assert len(PeftType._member_names_) == before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ELASTIC_LORA].__qualname__ == "ElasticLoraConfig"


def test_registering_another_class_under_the_name_is_refused():
    class Impostor(ElasticLoraConfig):
        pass

    with pytest.raises(RuntimeError, match="already registered"):
        peft_elastic._registry.register_tuner("elastic_lora", Impostor, ElasticLoraModel)


def test_defaults():
    config = ElasticLoraConfig(r=32, target_modules=TARGETS)
    assert config.rank_choices == [32, 24, 16]
    assert ElasticLoraConfig(r=8).rank_choices == [8, 6, 4]
    assert ElasticLoraConfig(r=1).rank_choices == [1]
    assert ElasticLoraConfig(r=2).rank_choices == [2, 1]
    assert config.rank_groups == [["q_proj", "k_proj", "v_proj"]]
    assert config.rank_pattern == {}


def test_config_json_roundtrip(tmp_path):
    config = ElasticLoraConfig(
        r=16, lora_alpha=32, rank_choices=[16, 8], rank_choices_pattern={"down_proj": [8, 4]}, target_modules=TARGETS
    )
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is ElasticLoraConfig
    assert loaded.rank_choices == [16, 8] and loaded.rank_choices_pattern == {"down_proj": [8, 4]}
    assert loaded.rank_pattern == {"down_proj": 8}
    assert (tmp_path / "adapter_config.json").read_text().count('"peft_type": "ELASTIC_LORA"') == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 8, "rank_choices": []}, r"rank_choices is empty"),
        ({"r": 8, "rank_choices": [4, 8]}, r"descending order.*\[4, 8\].*use \[8, 4\]"),
        ({"r": 8, "rank_choices": [8, 4, 4]}, r"duplicate ranks \[4\]"),
        ({"r": 8, "rank_choices": [8, 0]}, r"positive integers only; invalid entries: \[0\]"),
        ({"r": 8, "rank_choices": [8, -2]}, r"invalid entries: \[-2\]"),
        ({"r": 8, "rank_choices": [8, 4.5]}, r"invalid entries: \[4.5\]"),
        ({"r": 8, "rank_choices": "8,4"}, r"must be a list of positive integers"),
        ({"r": 8, "rank_choices": [16, 8]}, r"largest of rank_choices=\[16, 8\] must equal r=8"),
        ({"r": 16, "rank_choices": [8, 4]}, r"largest of rank_choices=\[8, 4\] must equal r=16"),
        ({"rank_choices_pattern": {"down_proj": [2, 4]}}, r"rank_choices_pattern\['down_proj'\] must be in desc"),
        ({"rank_pattern": {"down_proj": 4}}, r"rank_pattern=\{'down_proj': 4\} is derived from rank_choices_pattern"),
        ({"use_dora": True}, r"does not support the LoRA variant\(s\) \['use_dora'\]"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported.*\[True, False, 'gaussian'\]"),
        ({"rank_groups": [["q_proj"], ["q_proj", "v_proj"]]}, r"'q_proj' appears in rank_groups\[0\] and rank_g"),
        ({"rank_groups": "q_proj"}, r"rank_groups must be a list of non-empty lists"),
        ({"rank_groups": [[]]}, r"rank_groups must be a list of non-empty lists"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, r"target_parameters=.* not supported"),
    ],
)
def test_bad_configs_name_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticLoraConfig(target_modules=TARGETS, **kwargs)


def test_rank_pattern_that_agrees_is_accepted():
    config = ElasticLoraConfig(rank_choices_pattern={"down_proj": [4, 2]}, rank_pattern={"down_proj": 4})
    assert config.rank_choices_for("model.layers.0.mlp.down_proj") == [4, 2]
    assert config.rank_choices_for("model.layers.0.mlp.up_proj") == [8, 6, 4]


def test_target_modules_not_found():
    with pytest.raises(ValueError, match=r"(?s)Target modules \{'nonexistent_proj'\} not found"):
        get_peft_model(tiny_llama(), ElasticLoraConfig(target_modules=["nonexistent_proj"]))


def test_unsupported_module_type_names_the_module():
    with pytest.raises(ValueError, match=r"'model.embed_tokens' of type Embedding cannot take an elastic LoRA"):
        get_peft_model(tiny_llama(), ElasticLoraConfig(target_modules=["embed_tokens"]))


def test_group_members_with_different_choices_are_refused():
    config = ElasticLoraConfig(r=8, target_modules=TARGETS, rank_choices_pattern={"k_proj": [8, 2]})
    with pytest.raises(ValueError, match=r"rank group 'model.layers.0.self_attn.q_proj\+k_proj\+v_proj' have diff"):
        get_peft_model(tiny_llama(), config)


def test_add_weighted_adapter_is_refused_with_the_alternative():
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="export_sub_adapter"):
        model.base_model.add_weighted_adapter(["default"], [1.0], "combined")
