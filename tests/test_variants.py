"""SparsePEFT is a variant composed into the elastic layers, not a second tree of layer classes.

One layer class per base backend serves every tuner; an adapter's variant (`lora_variant[adapter]`) changes only the
update, and the mask is given to the layer explicitly (`set_sparsity_mask`). Checked against dense recomputations."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import peft_elastic
from peft_elastic import ElasticLoraConfig, SparsePEFTConfig
from peft_elastic.toy import tiny_llama
from peft_elastic.tuners import sparse_peft
from peft_elastic.tuners.elastic_lora.layer import ElasticLoraLayer
from peft_elastic.tuners.elastic_lora.layer import Linear as ElasticLinear
from peft_elastic.tuners.elastic_lora.variant import ElasticVariant
from peft_elastic.tuners.sparse_peft import SparsePEFTVariant, is_sparse_peft_layer, set_sparsity_mask, sparsity_mask

NAME = "model.layers.0.mlp.up_proj"


def sparse_base():
    model = tiny_llama()
    peft_elastic.sparsify(model, None, "magnitude", 0.5, progress=False)
    return model


def adapted(config_class, **kwargs):
    torch.manual_seed(0)
    config = config_class(r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=TARGETS, **kwargs)
    model = get_peft_model(sparse_base(), config)
    randomize_lora_b(model, std=0.1)
    return model


def layer_of(model):
    return model.get_base_model().get_submodule(NAME)


def test_one_layer_class_per_backend_serves_both_tuners():
    elastic, sparse = adapted(ElasticLoraConfig), adapted(SparsePEFTConfig)
    for model in (elastic, sparse):
        types = {type(m) for m in model.modules() if isinstance(m, ElasticLoraLayer)}
        assert types == {ElasticLinear}
    assert all(not m.lora_variant for m in elastic.modules() if isinstance(m, ElasticLoraLayer))
    sparse_layers = [m for m in sparse.modules() if isinstance(m, ElasticLoraLayer)]
    elastic_layers = [m for m in elastic.modules() if isinstance(m, ElasticLoraLayer)]
    assert len(sparse_layers) == len(elastic_layers) > len(TARGETS)
    assert all(is_sparse_peft_layer(m) for m in sparse_layers)
    assert all(type(m.lora_variant["default"]) is SparsePEFTVariant for m in sparse_layers)
    # the SparsePEFT package defines no adapter layer class of its own
    modules = [getattr(sparse_peft, name) for name in dir(sparse_peft)]
    submodules = [m for m in modules if inspect.ismodule(m) and m.__name__.startswith(sparse_peft.__name__)]
    classes = {c for m in submodules for _, c in inspect.getmembers(m, inspect.isclass) if c.__module__ == m.__name__}
    assert classes and not any(issubclass(c, BaseTunerLayer) for c in classes)


def test_the_mask_given_to_a_layer_is_the_one_its_update_and_merge_use():
    model = adapted(SparsePEFTConfig, lora_dropout=0.1)  # dropout: the update is added to the base's output
    model.eval()  # dropout off, but the layer keeps the unfolded path
    layer = layer_of(model)
    base = layer.get_base_layer()
    custom = torch.rand(base.weight.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    set_sparsity_mask(layer, custom)
    assert torch.equal(sparsity_mask(layer), custom)

    weight_a, weight_b = layer.active_factors("default")
    expected_delta = (weight_b @ weight_a) * layer.scaling["default"] * custom
    assert torch.equal(layer.get_delta_weight("default"), expected_delta)
    x = torch.randn(2, 5, base.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = x @ (base.weight + expected_delta).T
        assert torch.allclose(layer(x), expected, atol=1e-5)
        layer.set_active_rank("default", 4)
        weight_a, weight_b = layer.active_factors("default")
        assert weight_a.shape[0] == weight_b.shape[1] == 4
        assert torch.allclose(layer(x), x @ (base.weight + (weight_b @ weight_a) * 2.0 * custom).T, atol=1e-5)


def test_a_layer_without_a_sparse_peft_adapter_has_no_mask():
    layer = layer_of(adapted(ElasticLoraConfig))
    assert not is_sparse_peft_layer(layer)
    with pytest.raises(ValueError, match="has no SparsePEFT mask: it holds no SparsePEFTConfig adapter"):
        sparsity_mask(layer)


def test_the_base_variant_computes_what_a_plain_elastic_adapter_does():
    plain, with_variant = adapted(ElasticLoraConfig), adapted(ElasticLoraConfig)
    for module in with_variant.modules():
        if isinstance(module, ElasticLoraLayer):
            module.lora_variant["default"] = ElasticVariant()
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
    original = layer_of(plain).get_base_layer().weight.clone()
    plain.eval(), with_variant.eval()
    with torch.no_grad():
        assert torch.allclose(with_variant(x).logits, plain(x).logits, atol=1e-6)  # the variant's forward
        with_variant.merge_adapter()  # the variant's merge_unsafe
        plain.merge_adapter()
        merged = layer_of(with_variant).get_base_layer().weight
        assert torch.allclose(merged, layer_of(plain).get_base_layer().weight, atol=1e-6)
        assert not torch.allclose(merged, original, atol=1e-4)
        assert torch.allclose(with_variant(x).logits, plain(x).logits, atol=1e-5)
        with_variant.unmerge_adapter()  # the variant's unmerge
        plain.unmerge_adapter()
        assert torch.allclose(layer_of(with_variant).get_base_layer().weight, original, atol=1e-6)
        assert torch.allclose(with_variant(x).logits, plain(x).logits, atol=1e-6)
