"""Elastic LoRA on quantized bases: bitsandbytes NF4 and int8, and GPTQ (quantized here with gptqmodel on CPU).

Every check compares against an oracle that does not go through peft_elastic: the LoRA term recomputed from the
factor slices `A[:k]`, `B[:, :k]`, a float model holding the dequantized base weights, and bitsandbytes' own
requantization of `dequantize(W) + s · B[:, :k] @ A[:k]` for merges.
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on 2 cores without it

import warnings

import bitsandbytes as bnb
import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTQConfig

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.tuners.elastic_lora import ElasticLoraLayer
from peft_elastic.tuners.elastic_lora import bnb as elastic_bnb

# bitsandbytes' CPU 4-bit path crashes for widths below 64.
WIDE = {"hidden_size": 128, "intermediate_size": 256}
R, ALPHA, CHOICES = 8, 16, [8, 6, 4]
SCALING = ALPHA / R  # kept for every active rank
B_STD = 0.1  # LoRA B starts at zero; random B makes every comparison non-trivial

pytestmark = pytest.mark.filterwarnings(
    "ignore:Merge lora module:UserWarning", "ignore:Unmerge lora module:UserWarning"
)


# ----------------------------------------------------------------------------------------------------------- helpers


def nf4_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_bnb(path, bits: int):
    config = nf4_config() if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )


def elastic(base):
    config = ElasticLoraConfig(r=R, lora_alpha=ALPHA, rank_choices=CHOICES, target_modules=TARGETS)
    model = get_peft_model(base, config)
    randomize_lora_b(model, std=B_STD)
    return model


def elastic_layers(model) -> dict[str, ElasticLoraLayer]:
    """The elastic layers by their name in the base model (e.g. `model.layers.0.self_attn.q_proj`)."""
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, ElasticLoraLayer)}


def mixed_subnetwork(model) -> dict[str, int]:
    """Each group at a different rank, cycling through the choices: every rank is used by some group."""
    return {g: c[i % len(c)] for i, (g, c) in enumerate(peft_elastic.search_space(model).items())}


def factors(layer, k: int | None = None):
    k = layer.active_rank("default") if k is None else k
    return layer.lora_A["default"].weight[:k], layer.lora_B["default"].weight[:, :k]


def lora_term(x, a, b, scaling=SCALING):
    return scaling * (x @ a.T) @ b.T


def dequantize(module: nn.Module) -> torch.Tensor:
    """The float32 weight (out × in) that a (quantized) linear layer multiplies with, computed without PEFT."""
    if isinstance(module, bnb.nn.Linear4bit):
        elastic_bnb.restore_4bit_layout(module.weight)  # bitsandbytes' CPU inference layout (AVX512-BF16 CPUs)
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        # bitsandbytes moves the row scales from the weight to the layer state on the first forward
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return module.weight.data.float() * scb.float()[:, None] / 127
    if hasattr(module, "dequantize_weight"):  # gptqmodel: (in × out)
        return module.dequantize_weight().T.float()
    return module.weight.float()


def requantize(weight: torch.Tensor, like: nn.Module) -> torch.Tensor:
    """`weight` quantized and dequantized the way `like` (a bitsandbytes layer) quantizes its weight."""
    if isinstance(like, bnb.nn.Linear4bit):
        state = like.weight.quant_state
        packed, new_state = bnb.functional.quantize_4bit(
            weight, blocksize=state.blocksize, quant_type=state.quant_type, compress_statistics=state.nested
        )
        return bnb.functional.dequantize_4bit(packed, new_state).float()
    # Int8Params quantizes a float16 copy row-wise (absmax / 127)
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
    return codes.float() * scales.float()[:, None] / 127


def capture_layer_io(model, input_ids) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Run the model once; return the logits and each elastic layer's (input, output)."""
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, (args[0], out)))
        for name, layer in elastic_layers(model).items()
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured


def assert_forward_is_base_plus_rank_k_lora(model, input_ids, atol: float) -> dict[str, torch.Tensor]:
    """Every elastic layer's output, in a real forward pass, equals its base output (adapter disabled) plus the
    rank-k LoRA term recomputed from `A[:k]`, `B[:, :k]`; and it differs from the full-rank term when k < r.
    Returns the captured layer inputs."""
    _, captured = capture_layer_io(model, input_ids)
    layers = elastic_layers(model)
    assert len(captured) == len(layers) == 10
    for name, layer in layers.items():
        x, y = captured[name]
        k = layer.active_rank("default")
        assert layer.scaling["default"] == SCALING
        with torch.no_grad(), model.disable_adapter():
            base_out = layer(x)
        expected = base_out + lora_term(x, *factors(layer))
        assert (y - expected).abs().max() <= atol, name
        # not vacuous: the adapter term is large, and the rank matters
        assert (y - base_out).abs().max() > 100 * atol, name
        if k < R:
            assert (y - (base_out + lora_term(x, *factors(layer, R)))).abs().max() > 100 * atol, name
    return {name: x for name, (x, _) in captured.items()}


def assert_layer_gradients_match_recomputation(model, inputs: dict[str, torch.Tensor]) -> None:
    """For each layer, an arbitrary upstream gradient gives A/B gradients equal to those of the recomputed rank-k
    LoRA term on `A[:k]`, `B[:, :k]`, and exactly zero outside those slices."""
    generator = torch.Generator().manual_seed(5)
    for name, layer in elastic_layers(model).items():
        x, k = inputs[name], layer.active_rank("default")
        weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        weight_a.grad = weight_b.grad = None
        out = layer(x)
        upstream = torch.randn(out.shape, generator=generator)
        (out * upstream).sum().backward()
        a, b = (t.detach().clone().requires_grad_() for t in factors(layer))
        (lora_term(x, a, b) * upstream).sum().backward()
        torch.testing.assert_close(weight_a.grad[:k], a.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(weight_b.grad[:, :k], b.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.count_nonzero(weight_a.grad[k:]) == 0 and torch.count_nonzero(weight_b.grad[:, k:]) == 0, name
        weight_a.grad = weight_b.grad = None


def assert_loss_gradients_only_on_active_slices(model, input_ids) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A real loss: every row of `A[:k]` and every column of `B[:, :k]` gets a gradient, nothing else does, and
    the quantized base has no trainable parameter. Returns the gradients."""
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        model(input_ids, labels=input_ids).loss.backward()
    finally:
        model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 10 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    grads = {}
    for name, layer in elastic_layers(model).items():
        k = layer.active_rank("default")
        grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert (grad_a[:k].abs().sum(dim=1) > 0).all(), name
        assert (grad_b[:, :k].abs().sum(dim=0) > 0).all(), name
        assert torch.count_nonzero(grad_a[k:]) == 0 and torch.count_nonzero(grad_b[:, k:]) == 0, name
        grads[name] = (grad_a.clone(), grad_b.clone())
    return grads


def dense_twin(model) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A plain float32 Llama holding the dequantized base weights of `model`, with the active rank-k LoRA term
    added by forward hooks on fresh leaf copies of `A[:k]`, `B[:, :k]` (returned by layer name). No PEFT inside."""
    base = model.get_base_model()
    twin = tiny_llama(**WIDE)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            module_name, _, param_name = name.rpartition(".")
            source = base.get_submodule(module_name)
            if isinstance(source, BaseTunerLayer):
                source = source.get_base_layer()
            value = dequantize(source) if param_name == "weight" else getattr(source, param_name)
            assert value.shape == param.shape, name
            param.copy_(value)
    leaves = {}
    for name, layer in elastic_layers(model).items():
        a, b = (t.detach().clone().requires_grad_() for t in factors(layer))
        twin.get_submodule(name).register_forward_hook(lambda m, args, out, a=a, b=b: out + lora_term(args[0], a, b))
        leaves[name] = (a, b)
    return twin, leaves


def assert_matches_dense_twin(model, input_ids, grads, atol: float) -> None:
    """Logits and A/B gradients of `model` equal those of its dequantized float twin."""
    twin, leaves = dense_twin(model)
    with torch.no_grad():
        logits = model(input_ids).logits
    out = twin(input_ids, labels=input_ids)
    assert (logits - out.logits).abs().max() <= atol
    out.loss.backward()
    for name, (a, b) in leaves.items():
        k = a.shape[0]
        torch.testing.assert_close(grads[name][0][:k], a.grad, rtol=1e-3, atol=1e-6, msg=name)
        torch.testing.assert_close(grads[name][1][:, :k], b.grad, rtol=1e-3, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    """A tiny float Llama saved with a locally trained tokenizer (gptqmodel needs the tokenizer next to it)."""
    path = tmp_path_factory.mktemp("fp")
    texts = [p["prompt"] + p["completion"] for p in arithmetic_problems(64)]
    tiny_llama(**WIDE).save_pretrained(path)
    train_tokenizer(texts, vocab_size=96).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ bitsandbytes NF4


def test_nf4_layers_forward_and_backward(fp_checkpoint, input_ids):
    model = elastic(load_bnb(fp_checkpoint, 4))
    layers = elastic_layers(model)
    assert all(type(layer) is elastic_bnb.Linear4bit for layer in layers.values())
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in layers.values())
    assert layers["model.layers.0.self_attn.q_proj"].get_base_layer().weight.quant_state.quant_type == "nf4"

    peft_elastic.set_subnetwork(model, mixed_subnetwork(model))
    assert sorted(set(peft_elastic.get_subnetwork(model).values())) == [4, 6, 8]
    # the LoRA term is added in float32 after the base output, so only summation order differs
    inputs = assert_forward_is_base_plus_rank_k_lora(model, input_ids, atol=1e-5)
    assert_layer_gradients_match_recomputation(model, inputs)
    grads = assert_loss_gradients_only_on_active_slices(model, input_ids)
    # the CPU NF4 matmul (compute dtype float32) is a float32 matmul with the dequantized weight
    assert_matches_dense_twin(model, input_ids, grads, atol=1e-4)


def test_nf4_merge_uses_the_active_rank(fp_checkpoint, input_ids):
    fp_logits = tiny_llama(**WIDE)(input_ids).logits.detach()
    model = elastic(load_bnb(fp_checkpoint, 4))
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids).logits
    # The merged layer holds NF4(dequant(W) + ΔW_k) while the unmerged one computes dequant(W) + ΔW_k: they differ
    # by one NF4 rounding of the weights, the same kind of error as quantizing the float model once. Measured here:
    # fp32 -> NF4 moves the logits by 0.186; merged vs unmerged differ by 0.10-0.14 (B std 0.1; 0.20 with B std 0.3).
    # Tolerance: 1.5x that one-rounding error.
    one_rounding = (fp_logits - base_logits).abs().max().item()
    assert 0.05 < one_rounding < 0.5
    tolerance = 1.5 * one_rounding

    merged_logits = {}
    for label, subnetwork in [
        ("min", peft_elastic.minimal_subnetwork(model)),
        ("max", peft_elastic.maximal_subnetwork(model)),
    ]:
        peft_elastic.set_subnetwork(model, subnetwork)
        with torch.no_grad():
            unmerged = model(input_ids).logits
        layers = elastic_layers(model)  # kept: merge_and_unload takes them out of the model
        before = {name: dequantize(layer.get_base_layer()) for name, layer in layers.items()}
        if label == "min":
            model.merge_adapter()
        else:
            merged_model = model.merge_and_unload()
        for name, layer in layers.items():
            k = layer.active_rank("default")
            base_layer = layer.get_base_layer()
            assert isinstance(base_layer.weight, bnb.nn.Params4bit) and base_layer.weight.bnb_quantized, name
            with torch.no_grad():
                expected = requantize(before[name] + SCALING * factors(layer)[1] @ factors(layer)[0], base_layer)
                full = requantize(before[name] + SCALING * factors(layer, R)[1] @ factors(layer, R)[0], base_layer)
            # exactly bitsandbytes' requantization of the rank-k delta, which differs from the full-rank one
            assert torch.equal(dequantize(base_layer), expected), name
            if k < R:
                assert (expected != full).float().mean() > 0.05, name
        if label == "min":
            with torch.no_grad():
                merged_logits[label] = model(input_ids).logits
            with pytest.raises(ValueError, match="unmerge it"):
                peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))
            model.unmerge_adapter()
        else:
            # merge_and_unload gives back plain bitsandbytes layers
            assert not any(isinstance(m, BaseTunerLayer) for m in merged_model.modules())
            assert isinstance(merged_model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
            with torch.no_grad():
                merged_logits[label] = merged_model(input_ids).logits
        assert (merged_logits[label] - unmerged).abs().max() < tolerance, label
        assert (merged_logits[label] - base_logits).abs().max() > 2 * tolerance, label  # the delta survived
    # merging another rank merges another delta (measured: 0.55-0.61 apart, the tolerance being 0.28-0.42)
    assert (merged_logits["max"] - merged_logits["min"]).abs().max() > tolerance


def test_nf4_cpu_relayout_is_undone_when_wrapped(fp_checkpoint, input_ids):
    """bitsandbytes re-lays out 4-bit weights for its AVX512-BF16 CPU inference kernel at the first eval forward (on
    CPUs that have it). Done here by hand, so that the test runs on any CPU: wrapping restores the standard layout
    of every 4-bit layer (adapted or not) and switches the re-layout off, so gradients and merges stay right."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    base = load_bnb(fp_checkpoint, 4)
    relaid = [base.model.layers[0].self_attn.q_proj, base.model.layers[0].self_attn.o_proj]  # adapted, not adapted
    before = [dequantize(module) for module in relaid]
    for module in relaid:
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
            module.weight.data, module.weight.quant_state
        )
        assert module.weight.quant_state.packing_format_for_cpu
    model = elastic(base)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    for module, weight in zip(relaid, before, strict=True):
        state = module.weight.quant_state
        assert not state.packing_format_for_cpu
        restored = bnb.functional.dequantize_4bit(module.weight.data, state)
        # the same codes; the block scales keep the bfloat16 rounding of the re-layout (8 significant bits)
        assert torch.equal(restored == 0, weight == 0)
        assert (restored - weight).abs().max() <= 2**-8 * weight.abs().max()
    with torch.no_grad():
        model.eval()
        model(input_ids)  # an evaluation pass, then training: every active slice still gets its gradient
    assert_loss_gradients_only_on_active_slices(model, input_ids)


def test_nf4_save_and_load_roundtrip(fp_checkpoint, input_ids, tmp_path):
    model = elastic(load_bnb(fp_checkpoint, 4))
    subnetwork = mixed_subnetwork(model)
    peft_elastic.set_subnetwork(model, subnetwork)
    with torch.no_grad():
        logits = model(input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    # the super-adapter only: A, B and the active rank of the 10 modules, nothing of the 4-bit base
    assert len(tensors) == 3 * 10 and all(".lora_A." in key or ".lora_B." in key for key in tensors)

    again = PeftModel.from_pretrained(load_bnb(fp_checkpoint, 4), tmp_path / "adapter")
    assert all(type(layer) is elastic_bnb.Linear4bit for layer in elastic_layers(again).values())
    assert peft_elastic.get_subnetwork(again) == subnetwork
    assert peft_elastic.search_space(again) == peft_elastic.search_space(model)
    with torch.no_grad():
        assert (again(input_ids).logits - logits).abs().max() == 0
        for sub in (peft_elastic.minimal_subnetwork(model), peft_elastic.maximal_subnetwork(model)):
            peft_elastic.set_subnetwork(model, sub)
            peft_elastic.set_subnetwork(again, sub)
            assert (again(input_ids).logits - model(input_ids).logits).abs().max() == 0


# ----------------------------------------------------------------------------------------------- bitsandbytes int8


def test_int8_layers_forward_backward_and_merge(fp_checkpoint, input_ids):
    model = elastic(load_bnb(fp_checkpoint, 8))
    layers = elastic_layers(model)
    assert all(type(layer) is elastic_bnb.Linear8bitLt for layer in layers.values())
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear8bitLt) for layer in layers.values())

    peft_elastic.set_subnetwork(model, mixed_subnetwork(model))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        inputs = assert_forward_is_base_plus_rank_k_lora(model, input_ids, atol=1e-5)
        assert_layer_gradients_match_recomputation(model, inputs)
        assert_loss_gradients_only_on_active_slices(model, input_ids)

        # merge (dequantize, add the rank-k delta, requantize row-wise int8) works on CPU
        with torch.no_grad():
            unmerged = model(input_ids).logits
            with model.disable_adapter():
                base_logits = model(input_ids).logits
        before = {name: dequantize(layer.get_base_layer()) for name, layer in layers.items()}
        model.merge_adapter()
        for name, layer in layers.items():
            base_layer = layer.get_base_layer()
            assert base_layer.weight.dtype == torch.int8, name
            with torch.no_grad():
                expected = requantize(before[name] + SCALING * factors(layer)[1] @ factors(layer)[0], base_layer)
            assert torch.equal(dequantize(base_layer), expected), name
        with torch.no_grad():
            merged = model(input_ids).logits
        # one int8 row-wise rounding of the weights (plus the int8 activations): measured 0.017 (rank 4/6/8 mix);
        # the adapter moves the logits by ~0.9
        assert (merged - unmerged).abs().max() < 0.05
        assert (merged - base_logits).abs().max() > 0.3
        model.unmerge_adapter()


# -------------------------------------------------------------------------------------------------------------- GPTQ


@pytest.fixture(scope="module")
def gptq_checkpoint(fp_checkpoint, tmp_path_factory):
    """`fp_checkpoint` quantized with gptqmodel on CPU: 4 bits, groups of 32, symmetric, no act-order (~2 s)."""
    from gptqmodel import GPTQModel, QuantizeConfig

    path = tmp_path_factory.mktemp("gptq")
    texts = [p["prompt"] + p["completion"] for p in arithmetic_problems(64, seed=1)]
    calibration = [" ".join(texts[i : i + 8]) for i in range(0, len(texts), 8)]
    quantizer = GPTQModel.load(str(fp_checkpoint), QuantizeConfig(bits=4, group_size=32, offload_to_disk=False))
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("gptq_logs"))  # gptqmodel writes its quantization log to ./logs
    try:
        quantizer.quantize(calibration)
    finally:
        os.chdir(cwd)
    quantizer.save(str(path))
    return path


def load_gptq(path):
    # backend "gptq_torch" = gptqmodel's TorchLinear: standard packed layout, differentiable w.r.t. its input.
    # Without it this CPU gets TorchAtenLinear, which re-lays out qweight for an inference kernel.
    config = GPTQConfig(bits=4, backend="gptq_torch")
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )


def test_gptq_layers_forward_backward_and_no_merge(gptq_checkpoint, input_ids):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from peft_elastic.tuners.elastic_lora.gptq import GPTQLinear

    base = load_gptq(gptq_checkpoint)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj) is TorchLinear and (q_proj.bits, q_proj.group_size) == (4, 32)
    # a real quantization of the float model: within a few quantization steps of the float weights
    fp_q_proj = tiny_llama(**WIDE).model.layers[0].self_attn.q_proj.weight
    error = (dequantize(q_proj) - fp_q_proj).abs()
    assert error.mean() < q_proj.scales.float().mean() and error.max() < 4 * q_proj.scales.float().max()

    model = elastic(base)
    layers = elastic_layers(model)
    assert all(type(layer) is GPTQLinear for layer in layers.values())
    assert all(isinstance(layer.get_base_layer(), BaseQuantLinear) for layer in layers.values())

    peft_elastic.set_subnetwork(model, mixed_subnetwork(model))
    inputs = assert_forward_is_base_plus_rank_k_lora(model, input_ids, atol=1e-5)
    assert_layer_gradients_match_recomputation(model, inputs)
    grads = assert_loss_gradients_only_on_active_slices(model, input_ids)
    # TorchLinear multiplies with its dequantized weight in float32
    assert_matches_dense_twin(model, input_ids, grads, atol=1e-4)

    # LoRA refuses to merge into GPTQ integer weights, and so does the elastic adapter (pointing to QA-SparsePEFT);
    # the model stays usable
    with torch.no_grad():
        logits = model(input_ids).logits
    with pytest.raises(ValueError, match="Cannot merge LoRA layers into a gptq quantized model.*quantization_aware"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="gptq quantized"):
        model.merge_adapter()
    assert all(type(layer) is GPTQLinear and not layer.merged for layer in elastic_layers(model).values())
    with torch.no_grad():
        assert (model(input_ids).logits - logits).abs().max() == 0
