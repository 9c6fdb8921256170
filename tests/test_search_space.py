"""`SearchSpace`: the groups of one elastic adapter found once, checked against the adapter's weights themselves (the
parameter count is the formula `k (in + out)` over the LoRA factors' shapes) and against the subnetwork API."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

import peft_elastic
import peft_elastic.subnetwork
from peft_elastic import ElasticLoraConfig, SearchSpace
from peft_elastic.toy import tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ElasticLoraConfig(
        r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL, width_choices=[1.0, 0.5], droppable_layers=[1]
    )
    return get_peft_model(tiny_llama(num_hidden_layers=3), config)


def test_the_groups_share_one_protocol_and_apply_what_they_report(model):
    space = SearchSpace(model)
    assert space.choices == peft_elastic.search_space(model)
    kinds = {name.rpartition(":")[2] if ":" in name else "rank" for name in space.groups}
    assert kinds == {"rank", "width", "block"}
    assert list(space.rank_groups) == [name for name in space.groups if ":" not in name]
    maximal = {name: choices[0] for name, choices in space.choices.items()}
    minimal = {name: choices[-1] for name, choices in space.choices.items()}
    try:
        for subnetwork in (minimal, maximal):
            for name, group in space.groups.items():
                group.apply(space.adapter_name, subnetwork[name])
                assert group.value(space.adapter_name) == subnetwork[name]
            assert space.current() == subnetwork == peft_elastic.get_subnetwork(model)
    finally:
        space.apply(maximal)


def test_a_space_built_once_sees_every_later_switch(model):
    space = SearchSpace(model)
    minimal = peft_elastic.minimal_subnetwork(model)
    try:
        peft_elastic.set_subnetwork(model, minimal)
        assert space.current() == minimal
    finally:
        peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))


def test_adapter_parameters_and_widths_follow_the_factors_shapes(model):
    space = SearchSpace(model)
    layers = {name: layer for group in space.rank_groups.values() for name, layer in group.modules}
    full = sum(
        layer.lora_A["default"].weight.numel() + layer.lora_B["default"].weight.numel() for layer in layers.values()
    )
    assert space.adapter_parameters({}) == full == peft_elastic.num_adapter_parameters(model)

    minimal = space.validated(peft_elastic.minimal_subnetwork(model))
    widths = space.widths(minimal)
    expected = 0
    for name, layer in layers.items():
        out_features, in_features = layer.out_features, layer.in_features
        half = layer.out_features // 2 if name.endswith(("gate_proj", "up_proj")) else None
        if half is not None:
            out_features = half  # the MLP keeps half its intermediate channels: gate/up rows
        if name.endswith("down_proj"):
            in_features = layer.in_features // 2  # and down's columns
        assert widths[name] == (out_features, in_features), name
        expected += 4 * (out_features + in_features)  # rank 4 everywhere
    assert space.adapter_parameters(minimal) == expected == peft_elastic.num_adapter_parameters(model, minimal)
    assert space.module_ranks(minimal) == dict.fromkeys(layers, 4) == peft_elastic.module_ranks(model, minimal)


def test_what_a_subnetwork_removes_from_the_base(model):
    space = SearchSpace(model)
    minimal = space.validated(peft_elastic.minimal_subnetwork(model))
    modules = [name for group in space.rank_groups.values() for name, _ in group.modules]
    mlp = [name for name in modules if name.endswith(("gate_proj", "up_proj", "down_proj"))]
    assert space.dropped(minimal) == ["model.layers.1"]
    assert space.removed_from_base(minimal) == [*mlp, "model.layers.1"]
    assert space.removed_from_base(space.validated(peft_elastic.maximal_subnetwork(model))) == []
    assert space.removed_from_base(minimal) == peft_elastic.subnetwork.removed_from_base(model.base_model, minimal)


def test_validation_errors_name_the_group_and_the_valid_choices(model):
    space = SearchSpace(model)
    group = next(iter(space.rank_groups))
    with pytest.raises(ValueError, match=r"Unknown group name\(s\) \['nope'\]; valid names come from"):
        space.validated({"nope": 8})
    expected = rf"Invalid choice\(s\) in subnetwork: '{re.escape(group)}': 6 \(valid: \[8, 4\]\)"
    with pytest.raises(ValueError, match=expected):
        space.validated({group: 6})
    assert space.validated({group: 4.0}) == {group: 4} and space.validated(None) == {}


def test_a_model_without_an_elastic_adapter_is_refused():
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Expected a PeftModel \\(or its tuner\\) with an elastic adapter"):
        SearchSpace(plain)
    with pytest.raises(ValueError, match=r"Unknown elastic adapter 'other'"):
        SearchSpace(get_peft_model(tiny_llama(), ElasticLoraConfig(r=4, target_modules=["q_proj"])), "other")


def test_a_model_keeps_its_space_until_its_adapters_change(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), ElasticLoraConfig(r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL)
    )
    kept = SearchSpace.of(model)
    assert SearchSpace.of(model) is kept and SearchSpace.of(model.base_model, "default") is kept
    assert SearchSpace(model) is not kept and SearchSpace(model).choices == kept.choices
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))  # switching keeps the space
    assert SearchSpace.of(model) is kept and kept.current() == peft_elastic.minimal_subnetwork(model)

    model.save_pretrained(tmp_path)
    model.add_adapter("narrow", ElasticLoraConfig(r=4, lora_alpha=8, rank_choices=[4, 2], target_modules=["q_proj"]))
    after_add = SearchSpace.of(model, "default")
    assert after_add is not kept and after_add.choices == kept.choices
    assert SearchSpace.of(model, "narrow").choices == {
        name: [4, 2] for name in SearchSpace(model, "narrow").rank_groups
    }
    assert all(name.endswith("q_proj") for name in SearchSpace.of(model, "narrow").rank_groups)
    model.load_adapter(tmp_path, adapter_name="loaded")
    after_load = SearchSpace.of(model, "default")
    assert after_load is not after_add and SearchSpace.of(model, "loaded").choices == kept.choices
    model.delete_adapter("narrow")
    assert SearchSpace.of(model, "default") is not after_load
    with pytest.raises(
        ValueError, match=re.escape("Unknown elastic adapter 'narrow'; this model has ['default', 'loaded']")
    ):
        SearchSpace.of(model, "narrow")
