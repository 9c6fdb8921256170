"""Mode B widths at the layer level: a narrowed MLP equals a dense model whose pruned channels are removed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_lora_b
from datasets import Dataset
from peft import PeftModel, get_peft_model
from torch import nn
from trl import SFTConfig, SFTTrainer

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import SubnetworkSamplingCallback

MLP = ["gate_proj", "up_proj", "down_proj"]


def elastic_mlp(rank_choices=(8, 4)):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(), ElasticLoraConfig(r=8, lora_alpha=16, rank_choices=list(rank_choices), target_modules=MLP)
    )
    randomize_lora_b(model, std=0.2)
    return model


def physically_sliced(model, layer_index: int, width: int, k: int) -> nn.Module:
    """The oracle: a plain copy of the base whose layer-`layer_index` MLP keeps its first `width` intermediate
    channels, with the rank-`k` LoRA updates folded into the sliced dense weights."""
    dense = copy.deepcopy(model.get_base_model())
    mlp = dense.model.layers[layer_index].mlp
    for name, rows in (("gate_proj", True), ("up_proj", True), ("down_proj", False)):
        layer = getattr(mlp, name)
        base, a, b = layer.base_layer.weight, layer.lora_A["default"].weight[:k], layer.lora_B["default"].weight[:, :k]
        merged = base + layer.scaling["default"] * (b @ a)
        sliced = merged[:width] if rows else merged[:, :width]
        plain = nn.Linear(sliced.shape[1], sliced.shape[0], bias=False)
        plain.weight = nn.Parameter(sliced.detach().clone())
        setattr(mlp, name, plain)
    for index, block in enumerate(dense.model.layers):  # the other layers: merged at rank k, full width
        if index == layer_index:
            continue
        for name in MLP:
            layer = getattr(block.mlp, name)
            a, b = layer.lora_A["default"].weight[:k], layer.lora_B["default"].weight[:, :k]
            plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
            plain.weight = nn.Parameter((layer.base_layer.weight + layer.scaling["default"] * (b @ a)).detach())
            setattr(block.mlp, name, plain)
    return dense


@pytest.mark.parametrize("k", [8, 4])
def test_narrowed_mlp_equals_the_dense_model_with_the_channels_removed(input_ids, k):
    model = elastic_mlp()
    for module in model.modules():
        if hasattr(module, "set_active_rank"):
            module.set_active_rank("default", k)
    mlp = model.base_model.model.model.layers[0].mlp
    width = 40  # of 128 intermediate channels
    mlp.gate_proj.set_active_out_features("default", width)
    mlp.up_proj.set_active_out_features("default", width)
    captured = {}

    def record(module, args):
        captured["in"] = args[0].shape[-1]

    mlp.down_proj.register_forward_pre_hook(record)
    with torch.no_grad():
        logits = model(input_ids).logits
        expected = physically_sliced(model, 0, width, k)(input_ids).logits
    assert captured["in"] == width  # down_proj saw the narrowed input
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    # gradients reach only the active slices of the factors
    model.zero_grad()
    model(input_ids).logits.square().mean().backward()
    a_up, b_up = mlp.up_proj.lora_A["default"].weight.grad, mlp.up_proj.lora_B["default"].weight.grad
    a_down = mlp.down_proj.lora_A["default"].weight.grad
    assert b_up[width:].abs().sum() == 0 and b_up[:width, :k].abs().sum() > 0
    assert a_down[:, width:].abs().sum() == 0 and a_down[:k, :width].abs().sum() > 0
    assert a_up[k:].abs().sum() == 0

    # back to full width: the model is the plain elastic one again
    mlp.gate_proj.set_active_out_features("default", None)
    mlp.up_proj.set_active_out_features("default", 128)
    assert mlp.up_proj.lora_A["default"].active_out is None and mlp.up_proj.active_out_features("default") == 128
    with torch.no_grad():
        full = model(input_ids).logits
        torch.testing.assert_close(full, physically_sliced(model, 0, 128, k)(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_serves_every_width(input_ids):
    model = elastic_mlp()
    up = model.base_model.model.model.layers[0].mlp
    up.gate_proj.set_active_out_features("default", 64)
    up.up_proj.set_active_out_features("default", 64)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            base = model(input_ids).logits
        assert not up.up_proj.merged  # disabling unmerged it, as for LoRA
        assert (base - unmerged).abs().max() > 1e-3


def test_width_errors():
    model = elastic_mlp()
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    for bad in (0, 129, 2.5, True):
        with pytest.raises(ValueError, match=r"is outside 1\.\.128 for this layer"):
            layer.set_active_out_features("default", bad)


# ----------------------------------------------------------------------------------- widths in the search space

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mode_b(**kwargs):
    torch.manual_seed(0)
    options = dict(
        r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL, width_choices=[1.0, 0.5], head_choices=[4, 2]
    )
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(**(options | kwargs)))
    randomize_lora_b(model, std=0.2)
    return model


def dense_subnetwork(model, subnetwork) -> nn.Module:
    """The oracle: a plain copy of the base where every adapted module is replaced by an `nn.Linear` holding its
    rank-k merged weight with the subnetwork's pruned rows/columns removed."""
    ranks = peft_elastic.module_ranks(model, subnetwork)
    widths = peft_elastic.subnetwork.module_widths(model, subnetwork)
    dense = copy.deepcopy(model.get_base_model())
    for name, k in ranks.items():
        layer = model.get_base_model().get_submodule(name)
        a, b = layer.lora_A["default"].weight[:k], layer.lora_B["default"].weight[:, :k]
        merged = layer.base_layer.weight + layer.scaling["default"] * (b @ a)
        out_width, in_width = widths[name]
        plain = nn.Linear(in_width, out_width, bias=False)
        plain.weight = nn.Parameter(merged[:out_width, :in_width].detach().clone())
        parent, _, leaf = name.rpartition(".")
        setattr(dense.get_submodule(parent), leaf, plain)
    return dense


def test_search_space_holds_widths_and_heads():
    model = mode_b()
    space = peft_elastic.search_space(model)
    assert space["model.layers.0.mlp:width"] == [128, 64]
    assert space["model.layers.1.self_attn:heads"] == [4, 2]  # 4 query heads over 2 key/value heads: pairs
    assert len(space) == 2 * (3 + 4)  # per layer: q+k+v, o, gate, up, down ranks; width; heads
    assert peft_elastic.get_subnetwork(model) == peft_elastic.maximal_subnetwork(model)
    assert peft_elastic.minimal_subnetwork(model)["model.layers.0.mlp:width"] == 64
    fractions = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8, target_modules=ALL, head_choices=[1.0, 0.5]))
    assert peft_elastic.search_space(fractions)["model.layers.0.self_attn:heads"] == [4, 2]


@pytest.mark.parametrize("which", ["minimal", "mixed"])
def test_width_subnetworks_equal_the_dense_model_with_the_channels_removed(input_ids, which):
    model = mode_b()
    if which == "minimal":
        subnetwork = peft_elastic.minimal_subnetwork(model)
    else:
        subnetwork = peft_elastic.maximal_subnetwork(model) | {
            "model.layers.0.mlp:width": 64,
            "model.layers.1.self_attn:heads": 2,
            "model.layers.1.mlp.down_proj": 4,
        }
    peft_elastic.set_subnetwork(model, subnetwork)
    assert peft_elastic.get_subnetwork(model) == subnetwork
    with torch.no_grad():
        logits = model(input_ids).logits
        expected = dense_subnetwork(model, subnetwork)(input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the adapter parameters it uses, counted on the oracle's shapes
    ranks = peft_elastic.module_ranks(model, subnetwork)
    widths = peft_elastic.subnetwork.module_widths(model, subnetwork)
    assert peft_elastic.num_adapter_parameters(model) == sum(k * sum(widths[n]) for n, k in ranks.items())
    assert peft_elastic.num_adapter_parameters(model) < peft_elastic.num_adapter_parameters(
        model, peft_elastic.maximal_subnetwork(model)
    )


def test_widths_are_saved_with_the_adapter(input_ids, tmp_path):
    model = mode_b()
    subnetwork = peft_elastic.heuristic_subnetwork(model) | {"model.layers.0.mlp:width": 64}
    peft_elastic.set_subnetwork(model, subnetwork)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert peft_elastic.get_subnetwork(again) == subnetwork
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits)


def test_training_with_random_width_subnetworks(tmp_path):
    problems = arithmetic_problems(32)
    tok = train_tokenizer([p["prompt"] + p["completion"] for p in problems], vocab_size=96)
    dataset = Dataset.from_list([{"text": p["prompt"] + p["completion"]} for p in problems])
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        max_length=32,
        logging_steps=3,
        disable_tqdm=True,
    )
    callback = SubnetworkSamplingCallback(strategy="random", seed=0)
    seen = []
    original = callback.on_step_begin

    def record(*a, **k):
        original(*a, **k)
        seen.append(dict(callback.current[0]))

    callback.on_step_begin = record
    config = ElasticLoraConfig(
        r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=ALL, width_choices=[1.0, 0.5], head_choices=[1.0, 0.5]
    )
    trainer = SFTTrainer(
        model=tiny_llama(vocab_size=len(tok)),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=config,
        callbacks=[callback],
    )
    trainer.train()
    widths = {s["model.layers.0.mlp:width"] for s in seen} | {s["model.layers.1.self_attn:heads"] for s in seen}
    assert len(seen) == 6 and {64, 128} & widths and {2, 4} & widths and len(widths) >= 3
    logs = [entry for entry in trainer.state.log_history if "subnetwork_params" in entry]
    expected = [peft_elastic.num_adapter_parameters(trainer.model, s) for s in seen]
    assert [entry["subnetwork_params"] for entry in logs] == [
        pytest.approx(sum(expected[:3]) / 3, abs=0.1),
        pytest.approx(sum(expected[3:]) / 3, abs=0.1),
    ]
    # the model is left at the maximal subnetwork, and full-width export works; a narrowed one is refused
    assert peft_elastic.get_subnetwork(trainer.model) == peft_elastic.maximal_subnetwork(trainer.model)
    peft_elastic.export_sub_adapter(trainer.model, tmp_path / "full")
    with pytest.raises(ValueError, match="narrows the base .* which a LoRA adapter cannot express"):
        peft_elastic.export_sub_adapter(
            trainer.model, tmp_path / "narrow", peft_elastic.minimal_subnetwork(trainer.model)
        )
    assert not (tmp_path / "narrow").exists()
    with pytest.raises(ValueError, match="grid_params.*not available with elastic widths"):
        SubnetworkSamplingCallback(strategy="grid_params").sampler.setup(trainer.model)


def test_width_configuration_errors():
    base = tiny_llama
    cases = [
        (
            dict(target_modules=["gate_proj", "up_proj"], width_choices=[1.0, 0.5]),
            r"needs \['gate_proj', 'up_proj', 'down_proj'\] adapted, but \['down_proj'\] are not in target_modules",
        ),
        (
            dict(target_modules=ALL, head_choices=[4, 3]),
            r"3 is not a valid head count; valid head counts for 4 query heads over 2 key/value heads: 4, 2",
        ),
        (  # the default targets (q/v) hold no MLP layer: the widths would silently not be elastic
            dict(width_choices=[1.0, 0.5]),
            r"width_choices is set but no adapted module is one of \['gate_proj', 'up_proj', 'down_proj'\]",
        ),
        (dict(target_modules=ALL, width_choices=[256, 128]), r"must be its full size 128"),
        (dict(target_modules=ALL, width_choices=[1.0, 0.999]), r"0\.999 gives 127\.872 channels, not a whole number"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            get_peft_model(base(), ElasticLoraConfig(r=8, **kwargs))
    with pytest.raises(ValueError, match="NLSConfig searches adapter ranks only"):
        peft_elastic.NLSConfig(width_choices=[1.0, 0.5])
    with pytest.raises(ValueError, match="SparsePEFTConfig does not take width_choices/head_choices"):
        peft_elastic.SparsePEFTConfig(r=8, head_choices=[1.0, 0.5])
    with pytest.raises(ValueError, match="must start with 1.0"):
        ElasticLoraConfig(r=8, width_choices=[0.75, 0.5])
    with pytest.raises(ValueError, match=r"head_modules must be \[producer suffixes, consumer suffixes\]"):
        ElasticLoraConfig(r=8, head_modules=["q_proj"])
    model = mode_b()
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp:width': 96 \(valid: \[128, 64\]\)"):
        peft_elastic.set_subnetwork(model, {"model.layers.0.mlp:width": 96})
