"""Mode B widths at the layer level: a narrowed MLP equals a dense model whose pruned channels are removed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_lora_b
from peft import get_peft_model
from torch import nn

from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama

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
