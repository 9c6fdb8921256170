"""The elastic layer against independent oracles: stock PEFT LoRA with copied weights, and dense recomputation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama
from peft_elastic.tuners.elastic_lora import ElasticLoraLayer, LoraA, LoraB

R, ALPHA, CHOICES = 16, 32, [16, 12, 8]


def elastic_model(base, **kwargs):
    config = ElasticLoraConfig(r=R, lora_alpha=ALPHA, rank_choices=CHOICES, target_modules=TARGETS, **kwargs)
    model = get_peft_model(base, config)
    randomize_lora_b(model)
    return model


def stock_lora_copy(elastic, k: int, base):
    """A stock PEFT LoRA of rank k whose factors are the rank-k prefixes of `elastic`'s and whose scaling is the
    elastic scaling alpha / r (so alpha_k = alpha * k / r)."""
    lora = get_peft_model(base, LoraConfig(r=k, lora_alpha=ALPHA * k / R, target_modules=TARGETS))
    source = dict(elastic.named_parameters())
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_A" in name:
                param.copy_(source[name][:k])
            elif "lora_B" in name:
                param.copy_(source[name][:, :k])
    return lora


@pytest.mark.parametrize("k", CHOICES)
def test_every_rank_matches_stock_lora_of_that_rank(k, input_ids):
    model = elastic_model(tiny_llama())
    peft_elastic.set_subnetwork(model, {g: k for g in peft_elastic.search_space(model)})
    lora = stock_lora_copy(model, k, tiny_llama())
    out, expected = model(input_ids).logits, lora(input_ids).logits
    assert (out - expected).abs().max() < 1e-5
    # and the adapter does something: the base alone differs clearly
    with model.disable_adapter():
        assert (model(input_ids).logits - expected).abs().max() > 1e-2


def test_factor_modules_are_rank_slicing_and_share_parameters():
    model = elastic_model(tiny_llama())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, ElasticLoraLayer)
    assert isinstance(layer.lora_A["default"], LoraA) and isinstance(layer.lora_B["default"], LoraB)
    assert layer.lora_A["default"].weight.shape == (R, 64) and layer.lora_B["default"].weight.shape == (64, R)
    assert layer.scaling["default"] == ALPHA / R
    layer.set_active_rank("default", 8)
    # the trainable parameters are exactly the full factors (no copies were registered)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 10 and all("lora_A.default.weight" in n or "lora_B.default.weight" in n for n in names)


def test_gradients_reach_only_the_active_slice(input_ids):
    model = elastic_model(tiny_llama())
    peft_elastic.set_subnetwork(model, {g: 8 for g in peft_elastic.search_space(model)})
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        if "lora_A" in name:
            assert param.grad[:8].abs().sum() > 0, name
            assert torch.count_nonzero(param.grad[8:]) == 0, name
        elif "lora_B" in name:
            assert param.grad[:, :8].abs().sum() > 0, name
            assert torch.count_nonzero(param.grad[:, 8:]) == 0, name


def test_gradients_equal_stock_lora_gradients_on_the_slice(input_ids):
    k = 12
    model = elastic_model(tiny_llama())
    peft_elastic.set_subnetwork(model, {g: k for g in peft_elastic.search_space(model)})
    lora = stock_lora_copy(model, k, tiny_llama())
    model(input_ids, labels=input_ids).loss.backward()
    lora(input_ids, labels=input_ids).loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if "lora_A" in name:
            torch.testing.assert_close(param.grad[:k], grads[name], rtol=1e-4, atol=1e-6)
        elif "lora_B" in name:
            torch.testing.assert_close(param.grad[:, :k], grads[name], rtol=1e-4, atol=1e-6)


def test_merge_unmerge_and_merge_and_unload_use_the_active_subnetwork(input_ids):
    model = elastic_model(tiny_llama())
    peft_elastic.set_subnetwork(model, peft_elastic.heuristic_subnetwork(model))
    base_weight = model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight.detach().clone()
    expected = model(input_ids).logits
    model.merge_adapter()
    assert (model(input_ids).logits - expected).abs().max() < 1e-5
    with pytest.raises(ValueError, match="unmerge it"):
        peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    model.unmerge_adapter()
    restored = model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    assert (restored - base_weight).abs().max() < 1e-6
    # the merged delta is the rank-12 one, not the rank-16 one
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer.get_delta_weight("default"), (b[:, :12] @ a[:12]) * ALPHA / R)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, ElasticLoraLayer) for m in merged.modules())
    assert (merged(input_ids).logits - expected).abs().max() < 1e-5
    unloaded = model.unload()
    with torch.no_grad():
        assert (unloaded(input_ids).logits - tiny_llama()(input_ids).logits).abs().max() < 1e-6


def test_safe_merge_matches(input_ids):
    model = elastic_model(tiny_llama())
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    expected = model(input_ids).logits
    merged = model.merge_and_unload(safe_merge=True)
    assert (merged(input_ids).logits - expected).abs().max() < 1e-5


def test_disable_adapter_gives_the_base(input_ids):
    base_out = tiny_llama()(input_ids).logits
    model = elastic_model(tiny_llama())
    with model.disable_adapter():
        assert (model(input_ids).logits - base_out).abs().max() == 0
    assert (model(input_ids).logits - base_out).abs().max() > 1e-2


def test_multiple_adapters_keep_their_own_subnetworks(input_ids):
    model = elastic_model(tiny_llama())
    model.add_adapter("other", ElasticLoraConfig(r=8, lora_alpha=8, rank_choices=[8, 4], target_modules=TARGETS))
    randomize_lora_b(model, seed=7)
    assert peft_elastic.search_space(model, "other") == {g: [8, 4] for g in peft_elastic.search_space(model)}
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model, "other"), adapter_name="other")
    assert set(peft_elastic.get_subnetwork(model).values()) == {16}  # the active adapter is untouched
    default_out = model(input_ids).logits
    model.set_adapter("other")
    assert set(peft_elastic.get_subnetwork(model).values()) == {4}
    other_out = model(input_ids).logits
    assert (other_out - default_out).abs().max() > 1e-3
    lora = stock_lora_copy_named(model, "other", k=4, alpha=8, r=8)
    assert (other_out - lora(input_ids).logits).abs().max() < 1e-5
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    assert (model(input_ids).logits - other_out).abs().max() < 1e-6


def stock_lora_copy_named(elastic, adapter: str, k: int, alpha: float, r: int):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=k, lora_alpha=alpha * k / r, target_modules=TARGETS))
    source = {n.replace(f".{adapter}.", ".default."): p for n, p in elastic.named_parameters() if f".{adapter}." in n}
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_A" in name:
                param.copy_(source[name][:k])
            elif "lora_B" in name:
                param.copy_(source[name][:, :k])
    return lora


def test_conv1d_base_gpt2(input_ids):
    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()

    config = ElasticLoraConfig(r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=["c_attn", "c_fc"])
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_peft_model(gpt2(), config)
    randomize_lora_b(model)
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    lora = get_peft_model(
        gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    source = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_A" in name:
                param.copy_(source[name][:4])
            elif "lora_B" in name:
                param.copy_(source[name][:, :4])
    expected = lora(input_ids).logits
    assert (model(input_ids).logits - expected).abs().max() < 1e-5
    assert (model.merge_and_unload()(input_ids).logits - expected).abs().max() < 1e-5


def test_gradient_checkpointing_uses_the_same_subnetwork(input_ids):
    def grads(checkpointing: bool):
        base = tiny_llama()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            base.enable_input_require_grads()
        torch.manual_seed(0)  # the same A initialisation for both models
        model = elastic_model(base)
        model.train()
        peft_elastic.set_subnetwork(model, peft_elastic.heuristic_subnetwork(model))
        model(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-7)
