"""Importance ordering (Mode B): a function-preserving permutation that puts the most important MLP channels and
attention head groups first."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.calibration import calibration_batches
from peft_elastic.importance import _blocks, _consumer_input_norms, _scores, reorder_by_importance
from peft_elastic.toy import tiny_llama
from peft_elastic.tuners.elastic_lora.config import DEFAULT_HEAD_MODULES, DEFAULT_WIDTH_MODULES

CALIBRATION = [torch.randint(3, 96, (12,), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def scores(model, norms=None):
    blocks = _blocks(model, DEFAULT_WIDTH_MODULES, DEFAULT_HEAD_MODULES)
    return {b.parent: _scores(b, None if norms is None else norms[b.parent]) for b in blocks}


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_reordering_keeps_the_function_and_sorts_by_importance(input_ids, method):
    model = tiny_llama(num_attention_heads=8, num_key_value_heads=4, head_dim=8)  # 4 key/value groups of 2 heads
    with torch.no_grad():
        before = model(input_ids).logits
    calibration = CALIBRATION if method == "activation" else None
    orders = reorder_by_importance(model, calibration, method=method)
    assert set(orders) == {f"model.layers.{i}.{part}" for i in range(2) for part in ("mlp", "self_attn")}
    assert sorted(orders["model.layers.0.mlp"]) == list(range(128))
    assert sorted(orders["model.layers.1.self_attn"]) == list(range(4))  # key/value groups
    assert any(order != sorted(order) for order in orders.values())  # it did permute
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, before, rtol=1e-5, atol=1e-5)
    norms = None
    if method == "activation":
        blocks = _blocks(model, DEFAULT_WIDTH_MODULES, DEFAULT_HEAD_MODULES)
        norms = _consumer_input_norms(model, blocks, calibration_batches(CALIBRATION))
    for parent, values in scores(model, norms).items():
        assert bool((values[:-1] >= values[1:] - 1e-5).all()), parent  # most important first, now


def test_the_prefix_keeps_more_of_the_function(input_ids):
    """Half the MLP channels of an importance-ordered model lose less than half of an unordered one."""
    torch.manual_seed(0)

    def loss_at_half(model):
        peft = get_peft_model(
            model,
            ElasticLoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], width_choices=[1.0, 0.25]),
        )
        with torch.no_grad():
            full = peft(input_ids).logits
            peft_elastic.set_subnetwork(peft, peft_elastic.minimal_subnetwork(peft))
            return (peft(input_ids).logits - full).pow(2).mean().item()

    ordered = tiny_llama()
    reorder_by_importance(ordered, CALIBRATION)
    assert loss_at_half(ordered) < loss_at_half(tiny_llama())


def test_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"method must be one of \['magnitude', 'activation'\], got 'l1'"):
        reorder_by_importance(model, method="l1")
    with pytest.raises(ValueError, match="method='activation' needs calibration_data"):
        reorder_by_importance(model, method="activation")
    with pytest.raises(ValueError, match="No MLP .* block of torch.nn.Linear layers was found"):
        reorder_by_importance(model, width_modules=[["a"], ["b"]], head_modules=[["c", "d", "e"], ["f"]])
    peft = get_peft_model(tiny_llama(), ElasticLoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="call it on the model before get_peft_model"):
        reorder_by_importance(peft)
