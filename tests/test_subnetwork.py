"""The subnetwork API: search space, get/set, max/min/heuristic, sampling, parameter counts, errors."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TARGETS
from peft import LoraConfig, get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama

QKV0 = "model.layers.0.self_attn.q_proj+k_proj+v_proj"


def elastic(**kwargs):
    kwargs = {"r": 32, "lora_alpha": 64, "rank_choices": [32, 24, 16], "target_modules": TARGETS, **kwargs}
    return get_peft_model(tiny_llama(), ElasticLoraConfig(**kwargs))


def test_search_space_names_and_order():
    space = peft_elastic.search_space(elastic())
    assert space == {
        QKV0: [32, 24, 16],
        "model.layers.0.mlp.up_proj": [32, 24, 16],
        "model.layers.0.mlp.down_proj": [32, 24, 16],
        "model.layers.1.self_attn.q_proj+k_proj+v_proj": [32, 24, 16],
        "model.layers.1.mlp.up_proj": [32, 24, 16],
        "model.layers.1.mlp.down_proj": [32, 24, 16],
    }
    assert list(space) == list(peft_elastic.search_space(elastic()))  # stable across instances


def test_partial_groups_and_one_group_per_module():
    space = peft_elastic.search_space(elastic(target_modules=["q_proj", "v_proj"]))
    assert list(space) == [f"model.layers.{i}.self_attn.q_proj+v_proj" for i in range(2)]
    space = peft_elastic.search_space(elastic(rank_groups=[]))
    assert len(space) == 10 and "model.layers.0.self_attn.k_proj" in space
    space = peft_elastic.search_space(elastic(rank_groups=[["up_proj", "down_proj"]], target_modules=TARGETS))
    assert "model.layers.1.mlp.up_proj+down_proj" in space and "model.layers.1.self_attn.q_proj" in space


def test_per_module_choices():
    model = elastic(rank_choices_pattern={"down_proj": [8, 4]})
    space = peft_elastic.search_space(model)
    assert space["model.layers.0.mlp.down_proj"] == [8, 4] and space[QKV0] == [32, 24, 16]
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert layer.lora_A["default"].weight.shape[0] == 8 and layer.scaling["default"] == 64 / 8


def test_max_min_heuristic():
    model = elastic()
    assert set(peft_elastic.maximal_subnetwork(model).values()) == {32}
    assert set(peft_elastic.minimal_subnetwork(model).values()) == {16}
    assert set(peft_elastic.heuristic_subnetwork(model).values()) == {24}
    assert peft_elastic.get_subnetwork(model) == peft_elastic.maximal_subnetwork(model)  # starts at full rank


@pytest.mark.parametrize(
    ("choices", "midpoint"),
    [([32], 32), ([32, 16], 32), ([32, 24, 16], 24), ([32, 24, 16, 8], 24), ([5, 4, 3, 2, 1], 3)],
)
def test_heuristic_is_index_n_minus_1_over_2(choices, midpoint):
    model = elastic(r=choices[0], rank_choices=choices)
    assert set(peft_elastic.heuristic_subnetwork(model).values()) == {midpoint}


def test_set_and_get_partial_update():
    model = elastic()
    peft_elastic.set_subnetwork(model, {QKV0: 16})
    sub = peft_elastic.get_subnetwork(model)
    assert sub[QKV0] == 16 and sub["model.layers.0.mlp.up_proj"] == 32
    attn = model.base_model.model.model.layers[0].self_attn
    assert [attn.q_proj.active_rank("default"), attn.k_proj.active_rank("default")] == [16, 16]
    assert attn.v_proj.active_rank("default") == 16


def test_set_subnetwork_errors_name_the_problem_and_change_nothing():
    model = elastic()
    before = peft_elastic.get_subnetwork(model)
    with pytest.raises(ValueError, match=r"Unknown group name\(s\) \['model.layers.0.nope'\].*search_space"):
        peft_elastic.set_subnetwork(model, {QKV0: 16, "model.layers.0.nope": 16})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj': 20 \(valid: \[32, 24, 16\]\)"):
        peft_elastic.set_subnetwork(model, {QKV0: 16, "model.layers.0.mlp.up_proj": 20})
    with pytest.raises(ValueError, match=r"Invalid choice"):
        peft_elastic.set_subnetwork(model, {QKV0: "16"})
    with pytest.raises(ValueError, match=r"dict \{group name: choice\}, got list"):
        peft_elastic.set_subnetwork(model, [16, 16])
    assert peft_elastic.get_subnetwork(model) == before


def test_sample_subnetwork_seeds():
    model = elastic()
    space = peft_elastic.search_space(model)
    first = peft_elastic.sample_subnetwork(model, seed=3)
    assert first == peft_elastic.sample_subnetwork(model, seed=3)
    assert all(first[g] in space[g] for g in space)
    draws = [peft_elastic.sample_subnetwork(model, seed=s) for s in range(30)]
    assert len({tuple(d.values()) for d in draws}) > 20  # not constant
    counts = {c: sum(d[QKV0] == c for d in draws) for c in (32, 24, 16)}
    assert all(n > 0 for n in counts.values())
    from_torch = peft_elastic.sample_subnetwork(model, seed=torch.Generator().manual_seed(5))
    assert from_torch == peft_elastic.sample_subnetwork(model, seed=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    sequence = [peft_elastic.sample_subnetwork(model, seed=generator) for _ in range(5)]
    assert sequence[0] == from_torch and len({tuple(d.values()) for d in sequence}) > 1  # the generator advances
    assert peft_elastic.sample_subnetwork(model, seed=random.Random(9)) == peft_elastic.sample_subnetwork(
        model, seed=random.Random(9)
    )
    assert set(peft_elastic.sample_subnetwork(model).values()) <= {32, 24, 16}
    with pytest.raises(ValueError, match=r"seed must be an int, a torch.Generator, a random.Random or None, got 1.5"):
        peft_elastic.sample_subnetwork(model, seed=1.5)


def test_num_adapter_parameters_exact():
    model = elastic()
    # per layer: q (64->64), k (64->32), v (64->32), up (64->128), down (128->64); in+out summed
    per_rank = 2 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 128) + (128 + 64))
    assert peft_elastic.num_adapter_parameters(model) == 32 * per_rank
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert peft_elastic.num_adapter_parameters(model) == trainable
    assert peft_elastic.num_adapter_parameters(model, peft_elastic.minimal_subnetwork(model)) == 16 * per_rank
    mixed = {**peft_elastic.maximal_subnetwork(model), QKV0: 16}
    assert peft_elastic.num_adapter_parameters(model, mixed) == 32 * per_rank - 16 * (64 + 64 + 64 + 32 + 64 + 32)
    assert peft_elastic.get_subnetwork(model) == peft_elastic.maximal_subnetwork(model)  # counting changes nothing


def test_module_ranks():
    model = elastic()
    ranks = peft_elastic.module_ranks(model, {QKV0: 24})
    assert ranks["model.layers.0.self_attn.k_proj"] == 24 and ranks["model.layers.1.self_attn.k_proj"] == 32
    assert len(ranks) == 10


def test_adapter_resolution_errors():
    model = elastic()
    with pytest.raises(ValueError, match=r"Unknown elastic adapter 'nope'; this model has \['default'\]"):
        peft_elastic.search_space(model, adapter_name="nope")
    model.base_model.set_adapter([])
    with pytest.raises(ValueError, match=r"active elastic adapters are \[\]; pass adapter_name="):
        peft_elastic.search_space(model)
    assert peft_elastic.search_space(model, adapter_name="default")
    stock = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"Expected a PeftModel \(or its tuner\) with an elastic adapter"):
        peft_elastic.search_space(stock)
    with pytest.raises(ValueError, match=r"got a LlamaForCausalLM"):
        peft_elastic.search_space(tiny_llama())


def test_tuner_is_accepted_too():
    model = elastic()
    assert peft_elastic.search_space(model.base_model) == peft_elastic.search_space(model)
