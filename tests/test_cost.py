"""The cost model: parameter and MAC counts against the physically sliced dense model, and the latency helper."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_widths import ALL, dense_subnetwork, mode_b
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

import peft_elastic
from peft_elastic.cost import Cost, CostModel, count_macs, count_parameters, measure_latency, subnetwork_cost
from peft_elastic.toy import tiny_llama

SEQ_LEN = 12


def measured_macs(dense: nn.Module, seq_len: int = SEQ_LEN) -> int:
    """MACs of one forward of a plain model over one sequence, measured while it runs: every `nn.Linear` call
    `tokens · in · out` from the tensors it saw, plus the attention matmuls as torch's FlopCounterMode counts them
    (eager attention, so that they are plain batched matmuls)."""
    dense.set_attn_implementation("eager")
    linear = []

    def record(module, args, output):
        x = args[0]  # (..., in) -> (..., out)
        linear.append(x.numel() // x.shape[-1] * x.shape[-1] * output.shape[-1])

    hooks = [m.register_forward_hook(record) for m in dense.modules() if isinstance(m, nn.Linear)]
    tokens = torch.randint(3, dense.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dense(tokens)
    for hook in hooks:
        hook.remove()
    flops = counter.get_flop_counts()["Global"]  # 2 flops per MAC
    assert set(flops) == {torch.ops.aten.mm, torch.ops.aten.bmm}
    assert flops[torch.ops.aten.mm] == 2 * sum(linear)  # the hooks saw every projection
    return sum(linear) + flops[torch.ops.aten.bmm] // 2


def hand_macs(config, seq_len: int) -> int:
    """The MACs of a plain Llama, from its configuration."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention_projections = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim  # q, o; k, v
    per_layer = seq_len * (attention_projections + 3 * h * i) + 2 * seq_len**2 * heads * head_dim
    return config.num_hidden_layers * per_layer + seq_len * h * v


@pytest.mark.parametrize("tied", [False, True])
def test_plain_model_counts(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    untied = sum(p.numel() for p in tiny_llama().parameters())
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) == untied - tied * 96 * 64
    assert count_macs(model, seq_len=SEQ_LEN) == hand_macs(model.config, SEQ_LEN) == measured_macs(model)
    assert count_macs(model, seq_len=1) == hand_macs(model.config, 1)
    assert subnetwork_cost(model, seq_len=SEQ_LEN) == Cost(count_parameters(model), hand_macs(model.config, SEQ_LEN))


def test_adapters_are_not_counted():
    base = tiny_llama()
    expected = Cost(count_parameters(base), count_macs(base))
    lora = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=ALL + ["lm_head"], modules_to_save=["norm"]))
    assert subnetwork_cost(lora) == expected
    elastic = mode_b()
    assert subnetwork_cost(elastic, peft_elastic.maximal_subnetwork(elastic)) == expected
    assert subnetwork_cost(elastic.base_model) == expected  # the tuner works too; the active subnetwork is maximal


def test_gpt2_conv1d_layers_and_fused_attention():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())  # Conv1D weights are (in, out)
    message = r"'transformer.h.0.attn' \(GPT2Attention.*\['q_proj', 'k_proj', 'v_proj'\]"
    with pytest.raises(ValueError, match=message):
        count_macs(model)


@pytest.mark.parametrize("which", ["maximal", "minimal", "mixed"])
def test_costs_equal_the_dense_model_with_the_channels_removed(which):
    model = mode_b()
    subnetwork = {
        "maximal": peft_elastic.maximal_subnetwork(model),
        "minimal": peft_elastic.minimal_subnetwork(model),
        "mixed": peft_elastic.maximal_subnetwork(model)
        | {"model.layers.0.mlp:width": 64, "model.layers.1.self_attn:heads": 2, "model.layers.1.mlp.down_proj": 4},
    }[which]
    dense = dense_subnetwork(model, subnetwork)
    params, macs = sum(p.numel() for p in dense.parameters()), measured_macs(dense)
    assert subnetwork_cost(model, subnetwork, seq_len=SEQ_LEN) == Cost(params, macs)
    # without a subnetwork: the active one
    maximal = subnetwork_cost(model, peft_elastic.maximal_subnetwork(model), SEQ_LEN)
    assert subnetwork_cost(model, seq_len=SEQ_LEN) == maximal
    peft_elastic.set_subnetwork(model, subnetwork)
    assert subnetwork_cost(model, seq_len=SEQ_LEN) == Cost(params, macs)
    assert count_parameters(model, {"model.layers.0.mlp:width": 128}) == count_parameters(
        model, subnetwork | {"model.layers.0.mlp:width": 128}
    )  # groups not named keep their active choice


def test_one_cost_model_prices_many_subnetworks():
    """A search prices every trial with one CostModel: its counts equal the dense models', and its default (the
    active subnetwork) follows the switches."""
    model = mode_b()
    costs = CostModel(model)
    space, rng = peft_elastic.search_space(model), random.Random(0)
    for _ in range(3):
        subnetwork = {name: rng.choice(choices) for name, choices in space.items()}
        dense = dense_subnetwork(model, subnetwork)
        assert costs.params(subnetwork) == sum(p.numel() for p in dense.parameters())
        assert costs.macs(subnetwork, SEQ_LEN) == measured_macs(dense)
        peft_elastic.set_subnetwork(model, subnetwork)
        assert (costs.params(), costs.macs(seq_len=SEQ_LEN)) == (
            costs.params(subnetwork),
            costs.macs(subnetwork, SEQ_LEN),
        )
        ranks, widths = peft_elastic.module_ranks(model), peft_elastic.module_widths(model)
        assert costs.adapter_params() == sum(rank * sum(widths[name]) for name, rank in ranks.items())


def test_costs_are_ordered():
    model = mode_b(width_choices=[1.0, 0.75, 0.5])  # with two choices the heuristic is the maximal subnetwork
    picks = (peft_elastic.maximal_subnetwork, peft_elastic.heuristic_subnetwork, peft_elastic.minimal_subnetwork)
    costs = [subnetwork_cost(model, pick(model)) for pick in picks]
    assert costs[0].params > costs[1].params > costs[2].params
    assert costs[0].macs > costs[1].macs > costs[2].macs


def test_cost_errors():
    model = mode_b()
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp:width': 96 \(valid: \[128, 64\]\)"):
        count_parameters(model, {"model.layers.0.mlp:width": 96})
    with pytest.raises(ValueError, match=r"Unknown group name\(s\) \['model.layers.0.mlp'\]"):
        count_macs(model, {"model.layers.0.mlp": 64})
    with pytest.raises(ValueError, match=r"Unknown elastic adapter 'other'"):
        count_macs(model, adapter_name="other")
    with pytest.raises(ValueError, match="with an elastic adapter, got a LlamaForCausalLM"):
        count_parameters(tiny_llama(), {"model.layers.0.mlp:width": 64})
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"seq_len must be an integer >= 1, got {bad!r}"):
            count_macs(model, seq_len=bad)


def test_measure_latency():
    model = mode_b()
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    model.train()
    model.base_model.model.lm_head.eval()  # a mixed state is restored too
    seen = []  # (training, gradients on, input shape) at every call
    model.base_model.model.model.embed_tokens.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, torch.is_grad_enabled(), args[0].shape))
    )
    latency = measure_latency(model, seq_len=16, batch_size=2, warmup=2, repeats=5)
    assert len(latency.times) == 5 and len(seen) == 7 and all(t > 0 for t in latency.times)
    assert latency.min == min(latency.times) <= latency.median <= max(latency.times)
    assert set(seen) == {(False, False, (2, 16))}
    assert model.training and model.base_model.model.model.training and not model.base_model.model.lm_head.training

    plain = tiny_llama().train()
    tokens = torch.randint(3, 96, (1, 8))
    latency = measure_latency(plain, tokens, warmup=0, repeats=1)
    assert len(latency.times) == 1 and latency.median == latency.min == latency.times[0] and plain.training
    assert len(measure_latency(plain, repeats=2, warmup=0).times) == 2  # default inputs: (1, DEFAULT_SEQ_LEN)


def test_measure_latency_errors():
    model = tiny_llama()
    cases = [
        (dict(repeats=0), r"repeats must be an integer >= 1, got 0"),
        (dict(warmup=-1), r"warmup must be an integer >= 0, got -1"),
        (dict(warmup=1.5), r"warmup must be an integer >= 0, got 1.5"),
        (dict(seq_len=0), r"seq_len must be an integer >= 1, got 0"),
        (dict(batch_size=False), r"batch_size must be an integer >= 1, got False"),
        (dict(input_ids=torch.ones(1, 4, dtype=torch.long), seq_len=4), r"either input_ids or seq_len/batch_size"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            measure_latency(model, **kwargs)
    with pytest.raises(ValueError, match=r"Cannot draw token ids for a Linear.*pass input_ids"):
        measure_latency(nn.Linear(4, 4))
    assert not model.training  # eval before, eval after
