"""A Mode B adapter belongs to the base it was trained on (usually importance-ordered): its base fingerprint is saved
with it and checked when it is loaded, exported or merged narrower, so that the original base is refused with an
error that says how to fix it, while the same weights in another dtype pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_lora_b
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.cli import main
from peft_elastic.importance import (
    FINGERPRINT_ROWS,
    apply_importance_order,
    base_fingerprint,
    check_base_fingerprint,
)
from peft_elastic.toy import tiny_llama, train_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIX = (
    "A Mode B adapter slices the base by channel and head position, so it only works on the base it was trained on, "
    "usually one ordered by peft_elastic.reorder_by_importance: pass that ordered base (e.g. the folder it was saved "
    "to), or order this one as it was, peft_elastic.importance.apply_importance_order(base, order), with the "
    "{block: order} reorder_by_importance returned (e.g. json.load of the importance_order.json saved next to the "
    "adapter). To use the adapter on this base anyway, give it a config whose base_fingerprint is None."
)


def original():
    """The base as downloaded: 4 key/value groups of 2 heads (head_dim 8), MLP 128, 2 blocks."""
    return tiny_llama(num_attention_heads=8, num_key_value_heads=4)


def mode_b(**kwargs) -> ElasticLoraConfig:
    options = {"r": 4, "target_modules": TARGETS, "width_choices": [1.0, 0.75, 0.5], "head_choices": [1.0, 0.5]}
    return ElasticLoraConfig(**options | kwargs)


def mismatch(layer: str, row: int, others: str) -> str:
    return (
        "Adapter 'default' does not fit this base model: its base_fingerprint (taken from the base it was trained "
        f"on) differs at '{layer}' (row {row}), {others} of its 10 fingerprinted layers. {FIX}"
    )


@pytest.fixture
def trained(tmp_path, input_ids):
    """The LoNAS recipe: order the base, keep it (and the order) with the super-adapter, train (here: randomize)."""
    base = original()
    order = peft_elastic.reorder_by_importance(base)
    base.save_pretrained(tmp_path / "ordered")
    model = get_peft_model(base, mode_b())
    randomize_lora_b(model)
    peft_elastic.set_subnetwork(model, peft_elastic.heuristic_subnetwork(model))  # narrowed: positions matter
    model.save_pretrained(tmp_path / "super")
    (tmp_path / "super" / "importance_order.json").write_text(json.dumps(order))
    with torch.no_grad():
        return model, model(input_ids).logits


def test_the_adapter_loads_only_on_the_base_it_was_trained_on(tmp_path, input_ids, trained):
    _, logits = trained
    saved = json.loads((tmp_path / "super" / "adapter_config.json").read_text())["base_fingerprint"]
    producers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj")]
    assert len(saved) == 10 and set(producers) < set(saved)  # q, k, v, gate, up of each block
    assert saved["model.layers.0.mlp.gate_proj"].startswith("128x64 0:")

    base = original()
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(base, tmp_path / "super")
    assert str(error.value) == mismatch("model.layers.0.self_attn.q_proj", 18, "and 9 more")
    assert not [m for m in base.modules() if isinstance(m, BaseTunerLayer)]  # refused before the base was touched

    apply_importance_order(base, json.loads((tmp_path / "super" / "importance_order.json").read_text()))
    for ordered in (AutoModelForCausalLM.from_pretrained(tmp_path / "ordered"), base):  # kept, or ordered again
        again = PeftModel.from_pretrained(ordered, tmp_path / "super")
        with torch.no_grad():
            assert torch.equal(again(input_ids).logits, logits)
    for dtype in (torch.bfloat16, torch.float16):  # the same weights in another dtype pass
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "ordered", dtype=dtype), tmp_path / "super"
        )


def test_every_loading_path_checks(tmp_path, trained):
    expected = mismatch("model.layers.0.self_attn.q_proj", 18, "and 9 more")
    model = get_peft_model(original(), ElasticLoraConfig(r=4, target_modules=["q_proj"]))  # a Mode A adapter
    with pytest.raises(ValueError) as error:
        model.load_adapter(tmp_path / "super", adapter_name="mode_b")
    assert str(error.value) == expected.replace("'default'", "'mode_b'")
    assert list(model.peft_config) == ["default"]
    base = original()
    with pytest.raises(ValueError) as error:
        base.load_adapter(str(tmp_path / "super"))  # transformers' PeftAdapterMixin
    assert str(error.value) == expected
    with pytest.raises(ValueError) as error:  # a saved config reused for a new adapter belongs to its base too
        get_peft_model(original(), PeftConfig.from_pretrained(tmp_path / "super"))
    assert str(error.value) == expected


def test_export_and_a_narrowing_merge_check_the_base(tmp_path, trained):
    model, _ = trained
    with torch.no_grad():  # the base changed under the adapter: rows 0 and 1 of one producer swapped
        weight = model.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight
        weight[[0, 1]] = weight[[1, 0]]
    expected = mismatch("model.layers.1.mlp.up_proj", 0, "1")
    with pytest.raises(ValueError) as error:
        peft_elastic.export_compressed_model(model, tmp_path / "small")
    assert str(error.value) == expected
    assert not (tmp_path / "small").exists()
    with pytest.raises(ValueError) as error:
        model.merge_and_unload()  # the heuristic subnetwork narrows the base
    assert str(error.value) == expected


def test_cli_export_refuses_the_original_base(tmp_path, capsys, trained):
    tokenizer = train_tokenizer(["Q:1+2=?A:3"], vocab_size=96)
    for name, base in (
        ("original", original()),
        ("ordered", AutoModelForCausalLM.from_pretrained(tmp_path / "ordered")),
    ):
        base.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    capsys.readouterr()
    args = ["export", str(tmp_path / "super"), str(tmp_path / "small"), "--as", "compressed", "--quiet", "--base"]
    assert main([*args, str(tmp_path / "original")]) == 2
    assert (
        capsys.readouterr().err
        == f"peft-elastic export: error: {mismatch('model.layers.0.self_attn.q_proj', 18, 'and 9 more')}\n"
    )
    assert not (tmp_path / "small").exists()
    assert main([*args, str(tmp_path / "ordered")]) == 0
    assert (tmp_path / "small" / "config.json").is_file()


def test_an_adapter_saved_without_a_fingerprint_loads_unchecked(tmp_path, trained):
    config_file = tmp_path / "super" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["base_fingerprint"]  # as an older version wrote it
    config_file.write_text(json.dumps(config))
    base = original()
    again = PeftModel.from_pretrained(base, tmp_path / "super")  # no check: nothing to check against
    # it takes the fingerprint of the base it was loaded on, so exporting it is not refused either
    assert len(again.peft_config["default"].base_fingerprint) == 10
    peft_elastic.export_compressed_model(again, tmp_path / "small")


def test_which_adapters_are_fingerprinted(tmp_path):
    mode_a = get_peft_model(original(), ElasticLoraConfig(r=4, target_modules=TARGETS))
    assert mode_a.peft_config["default"].base_fingerprint is None
    mode_a.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_fingerprint"] is None
    PeftModel.from_pretrained(tiny_llama(seed=3, num_attention_heads=8, num_key_value_heads=4), tmp_path / "a")

    dropping = get_peft_model(original(), ElasticLoraConfig(r=4, target_modules=["o_proj"], droppable_layers=[1]))
    assert list(dropping.peft_config["default"].base_fingerprint) == ["model.layers.1.self_attn.o_proj"]
    widths = get_peft_model(original(), mode_b(head_choices=None))
    assert sorted(widths.peft_config["default"].base_fingerprint) == [
        f"model.layers.{i}.mlp.{m}" for i in range(2) for m in ("gate_proj", "up_proj")
    ]


def test_a_fresh_config_reused_on_another_base_is_fingerprinted_again():
    config = mode_b()
    get_peft_model(original(), config)
    other = tiny_llama(seed=5, num_attention_heads=8, num_key_value_heads=4)
    model = get_peft_model(other, config)  # not a loaded adapter: no check, a new fingerprint
    assert config.base_fingerprint == base_fingerprint(
        {name: model.base_model.model.get_submodule(name) for name in config.base_fingerprint}
    )


def test_the_fingerprint_is_cheap_deterministic_and_dtype_robust():
    model = original()
    layers = {name: m for name, m in model.named_modules() if name.endswith(("gate_proj", "q_proj"))}
    fingerprint = base_fingerprint(layers)
    assert fingerprint == base_fingerprint(layers)
    entry = fingerprint["model.layers.0.mlp.gate_proj"].split()
    assert entry[0] == "128x64" and [int(e.split(":")[0]) for e in entry[1:]] == [0, 18, 36, 54, 72, 90, 108, 127]
    assert len(entry) == 1 + FINGERPRINT_ROWS
    for dtype in (torch.bfloat16, torch.float16):
        check_base_fingerprint(original().to(dtype), fingerprint, "default")
        assert base_fingerprint({n: m.to(dtype) for n, m in original().named_modules() if n in layers}).keys() == (
            fingerprint.keys()
        )
    with pytest.raises(ValueError, match=r"differs at 'model.layers.0.mlp.gate_proj' \(row 0\), 1 of its 4"):
        changed = original()
        with torch.no_grad():
            changed.model.layers[0].mlp.gate_proj.weight[0] *= 1.05  # 5 % off: more than a dtype moves it
        check_base_fingerprint(changed, fingerprint, "default")
    gate = {"model.layers.0.mlp.gate_proj": fingerprint["model.layers.0.mlp.gate_proj"]}
    with pytest.raises(ValueError, match=r"differs at 'model.layers.0.mlp.gate_proj' \(shape 96x64, 128x64 saved\)"):
        check_base_fingerprint(tiny_llama(intermediate_size=96), gate, "default")
    with pytest.raises(ValueError, match=r"'model.layers.5.mlp.gate_proj' \(not a module of this model\)"):
        check_base_fingerprint(model, {"model.layers.5.mlp.gate_proj": "128x64 0:1,1"}, "default")
    with pytest.raises(ValueError, match=r"base_fingerprint\['x'\] = 'nonsense' is not a fingerprint"):
        check_base_fingerprint(model, {"x": "nonsense"}, "default")


def test_apply_importance_order_reproduces_the_ordered_base_and_checks_the_order():
    ordered = original()
    order = peft_elastic.reorder_by_importance(ordered)
    again = original()
    assert apply_importance_order(again, json.loads(json.dumps(order))) is None
    expected = ordered.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in again.state_dict().items())
    with pytest.raises(ValueError, match=r"'model.layers.9.mlp' is not a block of this model \(its blocks: "):
        apply_importance_order(original(), {"model.layers.9.mlp": [0]})
    with pytest.raises(ValueError, match=r"order of 'model.layers.0.self_attn' must be a permutation of its 4 "):
        apply_importance_order(original(), {"model.layers.0.self_attn": [0, 1, 2, 2]})
    with pytest.raises(ValueError, match="call it on the model before get_peft_model"):
        apply_importance_order(get_peft_model(original(), mode_b()), order)
