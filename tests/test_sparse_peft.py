"""SparsePEFT: the fused masked update against the naive formula (values, gradients, gradcheck), the layer against a
dense recomputation at every rank, merges that keep the zero pattern exactly, exact unmerge, the mask's life cycle,
quantized and Conv1D bases, errors, and a short SFTTrainer run followed by a merge."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel
from trl import SFTConfig

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import SubnetworkSamplingCallback
from peft_elastic.tuners.sparse_peft import (
    clear_workspace,
    is_sparse_peft_layer,
    masked_low_rank_linear,
    pack_mask,
    sparsity_mask,
    unpack_mask,
    workspace_bytes,
)

R, ALPHA, CHOICES = 8, 16, [8, 6, 4]
SCALING = ALPHA / R


def sparse_llama(sparsity: float = 0.5, **kwargs):
    model = tiny_llama(**kwargs)
    peft_elastic.sparsify(model, None, "magnitude", sparsity, progress=False)
    return model


def sparse_peft(base=None, choices=CHOICES, **kwargs):
    torch.manual_seed(0)
    config = SparsePEFTConfig(r=choices[0], lora_alpha=2 * choices[0], rank_choices=choices, target_modules=TARGETS)
    for key, value in kwargs.items():
        setattr(config, key, value)
    model = get_peft_model(sparse_llama() if base is None else base, config)
    randomize_lora_b(model, std=0.1)
    return model


def layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.get_base_model().named_modules() if is_sparse_peft_layer(m)}


def zero_patterns(model) -> dict[str, torch.Tensor]:
    """`{linear layer name (without PEFT's ".base_layer"): W == 0}` over the decoder blocks."""
    return {
        name.replace(".base_layer", ""): (module.weight == 0).clone()
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and ".layers." in f".{name}" and "lora_" not in name
    }


def naive(x, weight, a, b, mask, scaling, bias=None):
    """The reference formulation: `x Wᵀ + x ((B A) s ⊙ M)ᵀ` with autograd."""
    out = x @ weight.T + x @ ((b @ a) * scaling * mask).T
    return out if bias is None else out + bias


# ------------------------------------------------------------------------------------------- the fused function


@pytest.mark.parametrize("cols", [8, 13, 64])
def test_pack_mask_roundtrip(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 7) // 8)
    assert torch.equal(unpack_mask(packed, cols), mask)


@pytest.mark.parametrize("with_weight", [True, False])
def test_fused_function_matches_the_naive_formula(with_weight):
    g = torch.Generator().manual_seed(0)
    out_features, in_features, k = 24, 20, 5
    weight = torch.randn(out_features, in_features, generator=g)
    weight[torch.rand(weight.shape, generator=g) < 0.5] = 0
    mask = weight != 0
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(3, 7, in_features, generator=g, requires_grad=True)
    a = torch.randn(k, in_features, generator=g, requires_grad=True)
    b = torch.randn(out_features, k, generator=g, requires_grad=True)
    upstream = torch.randn(3, 7, out_features, generator=g)

    ours = masked_low_rank_linear(
        x, a, b, pack_mask(mask), in_features, SCALING, weight if with_weight else None, bias if with_weight else None
    )
    (ours * upstream).sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    reference = naive(x, weight if with_weight else torch.zeros_like(weight), a, b, mask, SCALING)
    if with_weight:
        reference = reference + bias
    (reference * upstream).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for ours_grad, t in zip(grads, (x, a, b), strict=True):
        torch.testing.assert_close(ours_grad, t.grad, rtol=1e-5, atol=1e-5)


def test_fused_function_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 10, generator=g, dtype=torch.float64)
    weight[torch.rand(weight.shape, generator=g) < 0.4] = 0
    packed = pack_mask(weight != 0)
    x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: masked_low_rank_linear(x, a, b, packed, 10, 1.7, weight), (x, a, b)
    )
    assert torch.autograd.gradcheck(lambda x, a, b: masked_low_rank_linear(x, a, b, packed, 10, 1.7), (x, a, b))


def _random_problem(seed: int, out_features: int, in_features: int, k: int = 4):
    """A sparse weight, its packed mask, an input and factors (the last three require grad), an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g)
    weight[torch.rand(weight.shape, generator=g) < 0.5] = 0
    x = torch.randn(5, in_features, generator=g, requires_grad=True)
    a = torch.randn(k, in_features, generator=g, requires_grad=True)
    b = torch.randn(out_features, k, generator=g, requires_grad=True)
    return weight, pack_mask(weight != 0), x, a, b, torch.randn(5, out_features, generator=g)


def _naive_grads(weight, x, a, b, upstream):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    out = naive(x, weight, a, b, weight != 0, SCALING)
    (out * upstream).sum().backward()
    return out.detach(), [x.grad, a.grad, b.grad]


def test_interleaved_calls_share_the_scratch_buffers_correctly():
    """Forwards of differently shaped layers, then their backwards in reverse order, as in a model: each call
    rebuilds what it needs, so the reused buffers never carry one layer's values into another's result."""
    clear_workspace()
    problems = [_random_problem(seed, *shape) for seed, shape in enumerate([(24, 16), (16, 40), (32, 8)])]
    outs = [masked_low_rank_linear(x, a, b, packed, w.shape[1], SCALING, w) for w, packed, x, a, b, _ in problems]
    # two slots (effective weight and mask) of the largest (out x in) among the layers, in float32
    assert workspace_bytes() == 2 * 16 * 40 * 4
    sum((out * p[-1]).sum() for out, p in zip(outs, problems, strict=True)).backward()
    for out, (weight, _, x, a, b, upstream) in zip(outs, problems, strict=True):
        expected_out, expected_grads = _naive_grads(weight, x, a, b, upstream)
        torch.testing.assert_close(out.detach(), expected_out, rtol=1e-5, atol=1e-5)
        for ours, expected in zip([x.grad, a.grad, b.grad], expected_grads, strict=True):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert workspace_bytes() == 2 * 16 * 40 * 4  # reused, not grown
    clear_workspace()
    assert workspace_bytes() == 0


def test_threads_have_their_own_scratch_buffers():
    import threading

    errors, barrier = [], threading.Barrier(2)

    def work(seed):
        try:
            weight, packed, x, a, b, upstream = _random_problem(seed, 48, 64)
            expected_out, expected_grads = _naive_grads(weight, x, a, b, upstream)
            barrier.wait()
            for _ in range(20):
                x.grad = a.grad = b.grad = None
                out = masked_low_rank_linear(x, a, b, packed, 64, SCALING, weight)
                (out * upstream).sum().backward()
                torch.testing.assert_close(out.detach(), expected_out, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(a.grad, expected_grads[1], rtol=1e-5, atol=1e-5)
        except Exception as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (10, 11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_gradients_are_not_differentiable_again():
    """The function is once-differentiable (its backward writes into scratch buffers): with `create_graph=True` the
    first-order gradients are right and carry no graph, rather than a wrong one."""
    weight, packed, x, a, b, upstream = _random_problem(0, 8, 8)
    out = masked_low_rank_linear(x, a, b, packed, 8, SCALING, weight)
    (grad_a,) = torch.autograd.grad((out * upstream).sum(), a, create_graph=True)
    torch.testing.assert_close(grad_a, _naive_grads(weight, x, a, b, upstream)[1][1], rtol=1e-5, atol=1e-5)
    assert not grad_a.requires_grad and grad_a.grad_fn is None


# ------------------------------------------------------------------------------------------------------ layers


def test_layer_forward_and_gradients_at_every_rank(input_ids):
    model = sparse_peft()
    assert model.peft_config["default"].peft_type.value == "SPARSE_PEFT"
    for choice in CHOICES:
        peft_elastic.set_subnetwork(model, {g: choice for g in peft_elastic.search_space(model)})
        for name, layer in layers(model).items():
            x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
            weight = layer.get_base_layer().weight
            a_full, b_full = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a, b = (t.detach().clone().requires_grad_() for t in (a_full[:choice], b_full[:, :choice]))
            upstream = torch.randn(2, 5, layer.out_features, generator=torch.Generator().manual_seed(4))
            a_full.grad = b_full.grad = None
            (layer(x) * upstream).sum().backward()
            (naive(x, weight, a, b, weight != 0, SCALING) * upstream).sum().backward()
            with torch.no_grad():
                torch.testing.assert_close(
                    layer(x), naive(x, weight, a, b, weight != 0, SCALING), rtol=1e-5, atol=1e-5
                )
            torch.testing.assert_close(a_full.grad[:choice], a.grad, rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(b_full.grad[:, :choice], b.grad, rtol=1e-4, atol=1e-6, msg=name)
            assert torch.count_nonzero(a_full.grad[choice:]) == 0 and torch.count_nonzero(b_full.grad[:, choice:]) == 0
            # not plain LoRA: the mask matters
            with torch.no_grad():
                unmasked = x @ weight.T + SCALING * (x @ a.T) @ b.T
                assert (layer(x) - unmasked).abs().max() > 1e-3


def test_unfused_path_equals_the_fused_one(input_ids):
    fused = sparse_peft()
    with_dropout = sparse_peft(lora_dropout=0.1)  # nn.Dropout (inactive in eval) takes the unfused path
    assert type(layers(with_dropout)["model.layers.0.self_attn.q_proj"].lora_dropout["default"]) is torch.nn.Dropout
    fused.eval()
    with_dropout.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids).logits, with_dropout(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batches(input_ids):
    model = sparse_peft()
    model.add_adapter("other", SparsePEFTConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_lora_b(model, std=0.1, seed=7)
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids, adapter_names=["default", "other"]).logits
        model.set_adapter("default")
        first = model(input_ids[:1]).logits
        model.set_adapter("other")
        second = model(input_ids[1:]).logits
    torch.testing.assert_close(mixed[:1], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], second, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ merges


def test_merge_keeps_the_zero_pattern_exactly_and_unmerge_restores_the_base(input_ids):
    base = sparse_llama()
    before_zeros = zero_patterns(base)
    before_weights = {n: m.weight.clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = sparse_peft(base)
    peft_elastic.set_subnetwork(model, peft_elastic.heuristic_subnetwork(model))
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids).logits
        model.merge_adapter()
        merged = model(input_ids).logits
        assert {n: torch.equal(z, zero_patterns(model.get_base_model())[n]) for n, z in before_zeros.items()} == {
            n: True for n in before_zeros
        }
        changed = [
            n for n, lay in layers(model).items() if not torch.equal(lay.get_base_layer().weight, before_weights[n])
        ]
        assert len(changed) == 10  # the adapted weights did change
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        for name, layer in layers(model).items():
            assert torch.equal(layer.get_base_layer().weight, before_weights[name]), name  # bit for bit
        merged_model = model.merge_and_unload()
        assert {n: torch.equal(z, zero_patterns(merged_model)[n]) for n, z in before_zeros.items()} == {
            n: True for n in before_zeros
        }
        torch.testing.assert_close(merged_model(input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    report = peft_elastic.measure_sparsity(merged_model)
    assert report.modules == peft_elastic.measure_sparsity(base).modules


def test_plain_lora_merge_would_lose_the_sparsity():
    # the reason for SparsePEFT: the same adapter merged without the mask fills the zeros
    model = sparse_peft()
    layer = layers(model)["model.layers.0.mlp.down_proj"]
    unmasked = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * SCALING
    weight = layer.get_base_layer().weight
    assert ((weight + unmasked) == 0).float().mean() < 0.01 < 0.49 < (weight == 0).float().mean()
    assert torch.equal(layer.get_delta_weight("default") != 0, (weight != 0) & (unmasked != 0))


def test_mask_is_cached_from_creation_and_not_saved(tmp_path, input_ids):
    model = sparse_peft()
    layer = layers(model)["model.layers.0.self_attn.q_proj"]
    expected = layer.get_base_layer().weight != 0
    assert torch.equal(sparsity_mask(layer), expected)
    assert layer.sparse_mask.dtype == torch.uint8 and layer.sparse_mask.numel() == expected.numel() // 8
    model.merge_adapter()
    assert torch.equal(sparsity_mask(layer), expected)  # unchanged by merging
    model.unmerge_adapter()

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("mask" in key for key in tensors) and len(tensors) == 30
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SPARSE_PEFT"
    again = PeftModel.from_pretrained(sparse_llama(), tmp_path)
    assert torch.equal(sparsity_mask(layers(again)["model.layers.0.self_attn.q_proj"]), expected)
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, model(input_ids).logits)


def test_gpt2_conv1d_base(input_ids):
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config).eval()
    peft_elastic.sparsify(base, None, "magnitude", 0.5, progress=False)
    zeros = (base.transformer.h[0].attn.c_attn.weight == 0).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is set for Conv1D
        model = get_peft_model(base, SparsePEFTConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize_lora_b(model, std=0.1)
    with torch.no_grad():
        unmerged = model(input_ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.transformer.h[0].attn.c_attn.weight == 0, zeros)


def test_nf4_base_keeps_zeros_through_merge(tmp_path, input_ids):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    sparse = sparse_llama(hidden_size=128, intermediate_size=256)  # bitsandbytes' CPU 4-bit path needs width >= 64
    sparse.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")

    def dequantized(module):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)

    q_proj = base.model.layers[0].self_attn.q_proj
    zeros = dequantized(q_proj) == 0
    assert torch.equal(zeros, sparse.model.layers[0].self_attn.q_proj.weight == 0)  # NF4 keeps exact zeros
    model = sparse_peft(base)
    layer = layers(model)["model.layers.0.self_attn.q_proj"]
    assert type(layer).__name__ == "Linear4bit" and torch.equal(sparsity_mask(layer), ~zeros)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0))
    k = layer.active_rank("default")
    a, b = layer.lora_A["default"].weight[:k], layer.lora_B["default"].weight[:, :k]
    with torch.no_grad():
        expected = x @ dequantized(q_proj).T + x @ ((b @ a) * SCALING * ~zeros).T
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        model.merge_adapter()
    after = dequantized(layer.get_base_layer()) == 0
    # every zero survives the requantization; NF4 also rounds some merged values below half its smallest code to zero
    # (measured: 3.6 % of the weights here; magnitude pruning had removed all small ones before)
    assert bool(after[zeros].all()) and (after & ~zeros).float().mean() < 0.1
    assert torch.equal(sparsity_mask(layer), ~zeros)


# ------------------------------------------------------------------------------------------------------ errors


def test_a_dense_base_warns_that_the_mask_is_all_ones():
    with pytest.warns(UserWarning, match=r"has no zeros: the SparsePEFT mask is all ones .*\(peft_elastic.sparsify\)"):
        get_peft_model(tiny_llama(), SparsePEFTConfig(r=4, target_modules=["q_proj"]))


def test_config_defaults_and_errors():
    assert SparsePEFTConfig(r=16).rank_choices == [16]  # fixed rank unless rank_choices are given
    assert SparsePEFTConfig(r=16, rank_choices=[16, 12, 8]).rank_choices == [16, 12, 8]
    with pytest.raises(ValueError, match="SparsePEFTConfig does not support lora_bias=True"):
        SparsePEFTConfig(r=4, lora_bias=True)
    with pytest.raises(ValueError, match=r"The largest of rank_choices=\[8, 4\] must equal r=16"):
        SparsePEFTConfig(r=16, rank_choices=[8, 4])


# ------------------------------------------------------------------------------------------ training end to end


def test_sft_run_on_a_sparse_model_then_merge_keeps_the_sparsity(tmp_path):
    problems = arithmetic_problems(64)
    tokenizer = train_tokenizer([p["prompt"] + p["completion"] for p in problems], vocab_size=96)
    base = tiny_llama(vocab_size=len(tokenizer))
    calibration = [tokenizer(p["prompt"] + p["completion"], return_tensors="pt")["input_ids"] for p in problems[:16]]
    report = peft_elastic.sparsify(base, calibration, method="wanda", sparsity=0.5, progress=False)
    before = zero_patterns(base)
    trainer = peft_elastic.training.ElasticSFTTrainer(
        model=base,
        args=SFTConfig(
            output_dir=str(tmp_path / "run"),
            max_steps=6,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            max_length=32,
            bf16=False,
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list(problems),
        processing_class=tokenizer,
        peft_config=SparsePEFTConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=TARGETS),
        callbacks=[SubnetworkSamplingCallback("sandwich", seed=0)],
    )
    trainer.train()
    model = trainer.model
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)
    merged = model.merge_and_unload()
    after = zero_patterns(merged)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert peft_elastic.measure_sparsity(merged).modules == report.modules


def test_low_cpu_mem_usage_and_transformers_load_adapter(tmp_path, input_ids):
    model = sparse_peft()
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    model.save_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
        again = PeftModel.from_pretrained(sparse_llama(), tmp_path, low_cpu_mem_usage=True)
        assert peft_elastic.get_subnetwork(again) == peft_elastic.minimal_subnetwork(model)
        assert torch.equal(again(input_ids).logits, expected)
        base = sparse_llama()
        base.load_adapter(str(tmp_path))
        assert torch.equal(base(input_ids).logits, expected)
