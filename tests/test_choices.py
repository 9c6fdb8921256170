"""Mode B width and head choices a model can take: errors that list the valid values, fractions that must land on
whole sizes, subnetwork values that are numbers equal to a valid integer, and examples that pick valid choices (and
check them before the expensive importance ordering). The models are SmolLM2-135M-shaped where it matters: 9 query
heads over 3 key/value heads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.tuners.elastic_lora.space import resolve_width_choices, sizes_at_most, valid_head_counts

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VALID_9_3 = "valid head counts for 9 query heads over 3 key/value heads: 9, 6, 3"


def gqa_llama(**kwargs) -> nn.Module:
    """9 query heads over 3 key/value heads of 16 channels (SmolLM2-135M's grouping), MLP 192."""
    options = dict(hidden_size=9 * 16, intermediate_size=192, num_attention_heads=9, num_key_value_heads=3)
    return tiny_llama(**(options | kwargs))


def wrap(base: nn.Module, **kwargs):
    return get_peft_model(base, ElasticLoraConfig(r=4, target_modules=ALL, **kwargs))


# ------------------------------------------------------------------------------------------------ head choices


def test_valid_head_counts_are_whole_key_value_groups():
    assert valid_head_counts(9, 3) == (9, 6, 3)
    assert valid_head_counts(8, 4) == (8, 6, 4, 2)
    assert valid_head_counts(4, 4) == (4, 3, 2, 1)
    assert valid_head_counts(9, 1) == (9,)  # multi-query attention: all heads or none
    with pytest.raises(ValueError, match=r"9 query heads do not split over 2 key/value heads"):
        valid_head_counts(9, 2)


@pytest.mark.parametrize(
    ("choices", "named"),
    [
        ([1.0, 0.75, 0.5], r"0\.75 gives 6\.75 heads, 0\.5 gives 4\.5 heads are not valid head counts"),
        ([9, 6, 4], r"4 is not a valid head count"),
    ],
)
def test_head_choices_refused_with_the_valid_counts(choices, named):
    with pytest.raises(ValueError, match=rf"head_choices of 'model.layers.0.self_attn': {named}; {VALID_9_3} "):
        wrap(gqa_llama(), head_choices=choices)
    with pytest.raises(ValueError, match=r"e\.g\. head_choices=\[9, 6, 3\]"):
        wrap(gqa_llama(), head_choices=choices)


def test_a_fraction_of_whole_heads_that_splits_a_key_value_group_is_refused():
    # 0.75 of 4 heads is 3 whole heads, but the heads come in pairs (4 over 2 key/value heads)
    with pytest.raises(ValueError, match=r"0\.75 gives 3 heads is not a valid head count; valid head counts for 4 "):
        wrap(tiny_llama(), head_choices=[1.0, 0.75])


def test_the_largest_head_count_must_be_the_full_one_and_says_which_are_valid():
    with pytest.raises(
        ValueError, match=rf"the largest of \[6, 3\] must be its full size 9 .*; {VALID_9_3} \(whole key/value groups"
    ):
        wrap(gqa_llama(), head_choices=[6, 3])


def test_head_choices_that_land_on_whole_groups_are_taken():
    for choices in ([9, 6, 3], [1.0, 2 / 3, 1 / 3]):
        space = peft_elastic.search_space(wrap(gqa_llama(), head_choices=choices))
        assert space["model.layers.1.self_attn:heads"] == [9, 6, 3]


# ------------------------------------------------------------------------------------------------ width fractions


def test_a_width_fraction_that_is_not_a_whole_number_of_channels_is_refused():
    with pytest.raises(
        ValueError,
        match=(
            r"width_choices of 'model.layers.0.mlp' \(192 channels\): 0\.7 gives 134\.4 channels, not a whole number; "
            r"fractions must land on whole sizes\. Give sizes instead, e\.g\. width_choices=\[192, 134\] \(or in "
            r"multiples of 64, which kernels run faster: \[192, 128\]\)\."
        ),
    ):
        wrap(gqa_llama(), width_choices=[1.0, 0.7])


def test_width_fractions_that_land_on_whole_channels_give_those_sizes():
    space = peft_elastic.search_space(wrap(gqa_llama(), width_choices=[1.0, 0.75, 0.5, 0.125]))
    assert space["model.layers.0.mlp:width"] == [192, 144, 96, 24]
    explicit = peft_elastic.search_space(wrap(gqa_llama(), width_choices=[192, 134]))  # sizes: any whole number
    assert explicit["model.layers.0.mlp:width"] == [192, 134]


def test_fractions_that_land_on_the_same_size_are_duplicates():
    with pytest.raises(ValueError, match=r"the choices \[1\.0, 0\.999999999999\] give duplicate sizes \[192, 192\]"):
        wrap(gqa_llama(), width_choices=[1.0, 0.999999999999])  # 191.9999999998: 192 up to float rounding


def test_sizes_at_most_rounds_down_to_multiples():
    assert sizes_at_most([1.0, 0.75, 0.5], 9, multiple_of=3) == [9, 6, 3]
    assert sizes_at_most([1.0, 0.7], 1536) == [1536, 1075]
    assert sizes_at_most([1.0, 0.7], 1536, multiple_of=64) == [1536, 1024]
    assert sizes_at_most([1.0, 0.9, 0.1], 4, multiple_of=2) == [4, 2]  # at least one multiple; duplicates dropped
    assert sizes_at_most([1.0, 0.75], 100, multiple_of=64) == [100, 64]  # the full size stays whatever it is
    with pytest.raises(ValueError, match=r"fractions in \(0, 1\] starting at 1\.0, largest first, got \[0\.5, 1\.0\]"):
        sizes_at_most([0.5, 1.0], 9)


# ------------------------------------------------------------------------------------ checking before get_peft_model


def test_resolve_width_choices_checks_a_base_model_without_wrapping_it():
    base = gqa_llama()
    config = ElasticLoraConfig(r=4, target_modules=ALL, width_choices=[1.0, 0.5], head_choices=[1.0, 2 / 3])
    resolved = resolve_width_choices(base, config)
    assert resolved == {
        f"model.layers.{i}.{group}": choices
        for i in (0, 1)
        for group, choices in (("mlp:width", (192, 96)), ("self_attn:heads", (9, 6)))
    }
    assert not any("lora" in name for name, _ in base.named_modules())  # nothing was wrapped
    space = peft_elastic.search_space(wrap(base, width_choices=[1.0, 0.5], head_choices=[1.0, 2 / 3]))
    assert resolved == {name: tuple(choices) for name, choices in space.items() if ":" in name}
    with pytest.raises(ValueError, match=VALID_9_3):
        resolve_width_choices(gqa_llama(), ElasticLoraConfig(r=4, target_modules=ALL, head_choices=[1.0, 0.5]))


# ------------------------------------------------------------------------------------------- subnetwork values


def test_numbers_equal_to_a_valid_choice_are_accepted():
    model = wrap(gqa_llama(), width_choices=[1.0, 0.5], head_choices=[9, 6, 3])
    heads, width, rank = "model.layers.0.self_attn:heads", "model.layers.1.mlp:width", "model.layers.0.mlp.up_proj"
    for value in (6.0, np.int64(6), np.float32(6.0), torch.tensor(6), torch.tensor(6.0), np.array(6)):
        peft_elastic.set_subnetwork(model, {heads: value, width: 96.0, rank: np.int32(2)})
        chosen = peft_elastic.get_subnetwork(model)
        assert (chosen[heads], chosen[width], chosen[rank]) == (6, 96, 2)
        assert type(chosen[heads]) is int
    widths = peft_elastic.subnetwork.module_widths(model, {width: torch.tensor(96)})
    assert widths["model.layers.1.mlp.down_proj"] == (144, 96)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("6", r"'model.layers.0.self_attn:heads': '6' is a string \(valid: the numbers \[9, 6, 3\]\)"),
        (6.5, r"'model.layers.0.self_attn:heads': 6.5 \(valid: \[9, 6, 3\]\)"),
        (True, r"'model.layers.0.self_attn:heads': True \(valid: \[9, 6, 3\]\)"),
        (torch.tensor([6]), r"'model.layers.0.self_attn:heads': tensor\(\[6\]\) \(valid: \[9, 6, 3\]\)"),
        (4, r"'model.layers.0.self_attn:heads': 4 \(valid: \[9, 6, 3\]\)"),
    ],
)
def test_other_values_are_refused_with_the_valid_choices(value, message):
    model = wrap(gqa_llama(), head_choices=[9, 6, 3])
    with pytest.raises(ValueError, match=message):
        peft_elastic.set_subnetwork(model, {"model.layers.0.self_attn:heads": value})


# ------------------------------------------------------------------------------------------------------ examples


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["lonas_mode_b.py", "search_subnetwork.py"])
def test_the_examples_pick_choices_the_model_can_take(name):
    example = load_example(name)
    smollm2 = gqa_llama(intermediate_size=1536).config  # SmolLM2-135M's MLP and heads
    assert example.mode_b_choices(smollm2) == {"width_choices": [1.0, 0.75, 0.5], "head_choices": [9, 6, 3]}
    odd = gqa_llama(intermediate_size=90, num_attention_heads=8, num_key_value_heads=4, hidden_size=96).config
    assert example.mode_b_choices(odd) == {"width_choices": [90, 67, 45], "head_choices": [1.0, 0.75, 0.5]}


def saved_gqa_model(folder: Path) -> Path:
    tokenizer = train_tokenizer([p for row in arithmetic_problems(512) for p in row.values()], vocab_size=96)
    gqa_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_lonas_example_runs_on_a_model_with_9_heads_over_3(tmp_path):
    example = load_example("lonas_mode_b.py")
    out = tmp_path / "out"
    figures = example.main(
        ["--model", str(saved_gqa_model(tmp_path / "base")), "--steps", "1", "--output-dir", str(out)]
    )
    assert (figures["maximal"]["heads"], figures["heuristic"]["heads"], figures["minimal"]["heads"]) == ([9], [6], [3])
    config = json.loads((out / "super-adapter" / "adapter_config.json").read_text())
    assert config["head_choices"] == [9, 6, 3] and config["width_choices"] == [1.0, 0.75, 0.5]


def test_the_lonas_example_checks_the_choices_before_reordering(monkeypatch):
    """A base whose second MLP is 90 wide (as in a compressed model with per-layer sizes): 0.75 of it is 67.5
    channels. The example must say so before the importance ordering, which takes minutes on a real model."""
    example = load_example("lonas_mode_b.py")
    tokenizer = train_tokenizer([p for row in arithmetic_problems(64) for p in row.values()], vocab_size=96)
    base = gqa_llama(vocab_size=len(tokenizer))
    mlp = base.model.layers[1].mlp
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
        nn.Linear(144, 90, False),
        nn.Linear(144, 90, False),
        nn.Linear(90, 144, False),
    )
    reordered = []
    monkeypatch.setattr(peft_elastic, "load_causal_lm", lambda name: (base, tokenizer))
    monkeypatch.setattr(peft_elastic, "reorder_by_importance", lambda *args, **kwargs: reordered.append(args))
    with pytest.raises(ValueError, match=r"width_choices of 'model.layers.1.mlp' \(90 channels\): 0\.75 gives 67\.5"):
        example.main(["--model", "a base with per-layer sizes", "--steps", "1"])
    assert not reordered
