"""QA-SparsePEFT and the SQFT INT4 pipelines on GPTQ bases quantized here with `peft_elastic.quantize_gptq`.

Oracle: the paper's formula in float64, `Ŵ = clamp(⌊(W + s·(B A) ⊙ M) / S + ½⌋ + Z, 0, 2ᵇ − 1)`, `W̃ = S (Ŵ − Z)`
from the dequantized base (`packing.dequantize`, itself checked against gptqmodel in test_quantization), with
autograd and a straight-through round for the gradients.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from gptq_fixtures import CALIBRATION, TEXTS, load_gptq, sparse_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

import peft_elastic
from peft_elastic import ElasticLoraConfig, NLSConfig, SparsePEFTConfig
from peft_elastic.quantization import MASK_FILE, dequantize, load_sparsity_mask
from peft_elastic.quantization.layers import zero_format, zeros
from peft_elastic.training import SubnetworkSamplingCallback
from peft_elastic.tuners.sparse_peft import is_quant_aware_layer, is_sparse_peft_layer, sparsity_mask
from peft_elastic.tuners.sparse_peft.gptq import quant_grid, transposed_mask
from peft_elastic.tuners.sparse_peft.quant_aware_linear import merged_codes

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qa_config(**kwargs) -> SparsePEFTConfig:
    options = dict(r=8, lora_alpha=16, target_modules=TARGETS, quantization_aware=True)
    return SparsePEFTConfig(**(options | kwargs))


def randomize_adapters(model, seed: int = 0, std: float = 0.05) -> None:
    """Random A and B, large enough that a good share of the updates crosses a quantization step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def gptq_state(model) -> dict[str, tuple[torch.Tensor, ...]]:
    """`{layer: (qweight, qzeros, scales, g_idx)}` cloned, for every GPTQ layer."""
    return {
        name.removeprefix("base_model.model.").removesuffix(".base_layer"): tuple(
            getattr(module, part).detach().clone() for part in ("qweight", "qzeros", "scales", "g_idx")
        )
        for name, module in model.named_modules()
        if hasattr(module, "qzeros") and hasattr(module, "g_idx")
    }


def dense(layer) -> torch.Tensor:
    """The base weight (out × in) in float64, dequantized from the packed tensors."""
    scales = layer.scales.double()
    return dequantize(layer.qweight, layer.qzeros, scales, layer.g_idx, layer.bits, zero_format(layer))


def oracle(layer, weight_a, weight_b, scaling, mask):
    """The paper's codes (out × in) and fake-quantized weight (out × in, rounded to the scales' dtype) in float64,
    differentiable with respect to the factors through a straight-through round."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    groups = base.g_idx.long()
    scales = base.scales.double()[groups].T
    zero = zeros(base).double()[groups].T
    update = scaling * (weight_b.double() @ weight_a.double()) * mask
    scaled = (dense(base) + update) / scales
    rounded = scaled + (torch.floor(scaled + 0.5) - scaled).detach()
    codes = torch.clamp(rounded + zero, 0, 2**base.bits - 1)
    weight = scales * (codes - zero)
    weight = weight + (weight.to(base.scales.dtype).double() - weight).detach()  # the kernel's rounding
    return codes.detach().to(torch.int64), weight


def qa_layers(model) -> dict[str, torch.nn.Module]:
    found = {n: m for n, m in model.named_modules() if is_quant_aware_layer(m)}
    return {n.removeprefix("base_model.model."): m for n, m in found.items()}


def train_steps(model, input_ids, steps: int, lr: float = 2e-2) -> list[float]:
    """`steps` AdamW steps on the causal LM loss of `input_ids`; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def factors(layer, adapter: str = "default"):
    k = layer.active_rank(adapter)
    return layer.lora_A[adapter].weight[:k], layer.lora_B[adapter].weight[:, :k]


# ------------------------------------------------------------------------------------------- forward and merge


@pytest.mark.parametrize(
    "bits, desc_act, hidden", [(4, False, 128), (2, False, 128), (8, True, 128), (4, True, 128), (4, False, 256)]
)
def test_qa_forward_merge_and_reload_are_exact(quantized, bits, desc_act, hidden, tmp_path):
    """hidden 256: zero-points of 0, a "gptq_v2" checkpoint (see test_quantization); the 8-bit act-order model has
    one too (data-dependent), the others none."""
    path, report = quantized(bits, desc_act, hidden)
    assert report.checkpoint_format == ("gptq_v2" if hidden == 256 or bits == 8 else "gptq")
    masks = load_sparsity_mask(path)
    model = get_peft_model(load_gptq(path), qa_config())
    before = gptq_state(model)
    randomize_adapters(model)
    layers = qa_layers(model)
    assert len(layers) == 12 and all(sparsity_mask(layer).equal(masks[name]) for name, layer in layers.items())

    inputs, outputs = {}, {}

    def record(name):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0], out

        return hook

    hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        qa_logits = model(input_ids).logits
    for hook in hooks:
        hook.remove()

    expected_codes = {}
    for name, layer in layers.items():
        weight_a, weight_b = factors(layer)
        codes, weight = oracle(layer, weight_a, weight_b, layer.scaling["default"], masks[name])
        expected_codes[name] = codes
        reference = inputs[name].double() @ weight.T
        torch.testing.assert_close(outputs[name].double(), reference, rtol=1e-5, atol=1e-5)

    merged = model.merge_and_unload()
    after = gptq_state(merged)
    moved = 0
    for name, (qweight, qzeros, scales, g_idx) in before.items():
        now = after[name]
        assert torch.equal(now[1], qzeros) and torch.equal(now[2], scales) and torch.equal(now[3], g_idx), name
        layer = merged.get_submodule(name)
        if name not in expected_codes:
            assert torch.equal(now[0], qweight), name  # untargeted (k_proj): untouched
            continue
        # the merged layer holds exactly the paper's codes; pruned weights still dequantize to 0
        weight = dense(layer)
        groups = layer.g_idx.long()
        codes = torch.round(weight / layer.scales.double()[groups].T + zeros(layer).double()[groups].T).long()
        assert torch.equal(codes, expected_codes[name]), name
        assert bool((weight[~masks[name]] == 0).all()), name
        moved += int((now[0] != qweight).sum())
    assert moved > 0  # the adapters did move codes
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
    assert torch.equal(merged_logits, qa_logits)  # same weights, same kernel arithmetic: bit-identical

    merged.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    original = {k: v for f in path.glob("model*.safetensors") for k, v in load_file(f).items()}
    for name in before:
        assert torch.equal(saved[f"{name}.qzeros"], original[f"{name}.qzeros"]), name  # the original's format
        assert torch.equal(saved[f"{name}.scales"], original[f"{name}.scales"]), name
    reloaded = load_gptq(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, qa_logits)
    for name, mask in masks.items():
        assert bool((dense(reloaded.get_submodule(name))[~mask] == 0).all()), name


def test_zero_update_merges_to_the_identical_qweight(quantized):
    path, _ = quantized(4, False)
    model = get_peft_model(load_gptq(path), qa_config())  # B = 0: a zero update
    before = gptq_state(model)
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        qa_logits = model(input_ids).logits
    merged = model.merge_and_unload()
    after = gptq_state(merged)
    assert all(all(torch.equal(a, b) for a, b in zip(before[n], after[n], strict=True)) for n in before)
    with torch.no_grad():
        assert torch.equal(merged(input_ids).logits, qa_logits)


def test_unmerge_restores_the_codes_and_merge_follows_the_active_rank(quantized):
    path, _ = quantized(4, False)
    model = get_peft_model(load_gptq(path), qa_config(rank_choices=[8, 4]))
    randomize_adapters(model, seed=3)
    before = gptq_state(model)
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    layer = next(iter(qa_layers(model).values()))
    assert layer.active_rank("default") == 4
    expected, _ = oracle(layer, *factors(layer), layer.scaling["default"], sparsity_mask(layer))
    model.merge_adapter()
    weight = dense(layer.get_base_layer())
    groups = layer.get_base_layer().g_idx.long()
    scales, zero = layer.get_base_layer().scales.double()[groups].T, zeros(layer.get_base_layer()).double()[groups].T
    assert torch.equal(torch.round(weight / scales + zero).long(), expected)
    with pytest.raises(ValueError, match="merged with rank 4"):
        peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))
    model.unmerge_adapter()
    assert all(all(torch.equal(a, b) for a, b in zip(before[n], v, strict=True)) for n, v in gptq_state(model).items())
    # disabling a merged adapter unmerges it, as for LoRA: the base model's outputs
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids).logits
        model.merge_adapter()
        with model.disable_adapter():
            assert torch.equal(model(input_ids).logits, base_logits)
    assert all(all(torch.equal(a, b) for a, b in zip(before[n], v, strict=True)) for n, v in gptq_state(model).items())


def test_straight_through_gradients_match_the_oracle(quantized):
    path, _ = quantized(4, True)  # act-order: g_idx is a permutation
    model = get_peft_model(load_gptq(path), qa_config(rank_choices=[8, 6]))
    randomize_adapters(model, seed=4)
    peft_elastic.set_subnetwork(model, peft_elastic.minimal_subnetwork(model))
    name, layer = next((n, m) for n, m in qa_layers(model).items() if n.endswith("down_proj"))
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(5), requires_grad=True)
    probe = torch.randn(3, 5, layer.out_features, generator=torch.Generator().manual_seed(6))
    (layer(x) * probe).sum().backward()

    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    _, weight = oracle(layer, a[:6], b[:, :6], layer.scaling["default"], sparsity_mask(layer))
    ((x64 @ weight.T) * probe.double()).sum().backward()
    assert layer.active_rank("default") == 6
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad.double(), a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    assert not a.grad[6:].any() and not layer.lora_A["default"].weight.grad[6:].any()  # inactive rows: no gradient
    # the gradient is masked: the STE passes it only to kept weights that were not clipped
    assert sparsity_mask(layer).float().mean() == pytest.approx(0.5, abs=0.01), name


@pytest.mark.parametrize("hidden", [128, 256])
def test_zero_points_are_the_ones_the_kernel_computes_with(quantized, hidden):
    """v1 and v2 checkpoints: the torch kernels hold v2 in memory (their `qzero_format()` flag stays 1 after loading a
    v2 checkpoint); QA-SparsePEFT reads the zero-points they compute with. A zero update reproduces the kernel's
    weight bit for bit."""
    path, report = quantized(4, False, hidden)
    model = get_peft_model(load_gptq(path), qa_config())
    for layer in qa_layers(model).values():
        base = layer.get_base_layer()
        assert base.qzero_format() == (1 if report.checkpoint_format == "gptq_v2" else 2)
        assert zero_format(base) == 2
        x = torch.eye(layer.in_features)  # the rows of the effective weight (in × out)
        with torch.no_grad():
            assert torch.equal(layer(x), base.dequantize_weight().float())

    # the cached grid follows the base's tensors when they are written in place (load_state_dict)
    layer = next(iter(qa_layers(model).values()))
    base = layer.get_base_layer()
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        before = layer(x)
        state = {key: value.clone() for key, value in base.state_dict().items()}
        state["scales"] = state["scales"] * 2
        base.load_state_dict(state)
        torch.testing.assert_close(layer(x), before * 2, rtol=1e-3, atol=1e-5)

    class Flagged:  # a layer whose kernel does not require v2: its flag is the truth
        def qzero_format(self):
            return 1

    assert zero_format(Flagged()) == 1


# ------------------------------------------------------------------------------------------ the user's flow


def test_user_flow_verbatim_on_the_default_cpu_kernel(tokenizer, tmp_path):
    """The issue's flow: quantize a sparse checkpoint folder (groups of 128), default `from_pretrained`
    (TorchAtenLinear, bfloat16), train, merge, save, reload."""
    source, path, calibration_data = tmp_path / "sparse-model-dir", tmp_path / "int4-dir", CALIBRATION
    peft_elastic.save_sparsified(sparse_model(), source, tokenizer=tokenizer)
    peft_elastic.quantize_gptq(source, path, calibration_data, bits=4, group_size=128, sym=False)
    qmodel = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    assert type(qmodel.model.layers[0].mlp.up_proj).__name__ == "TorchAtenLinear"
    config = SparsePEFTConfig(r=16, lora_alpha=32, target_modules=TARGETS, quantization_aware=True)
    model = get_peft_model(qmodel, config)
    # an evaluation pass before training must not re-lay the layers out for the inference kernel
    input_ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        model(input_ids)
    assert {m.linear_mode for m in model.modules() if type(m).__name__ == "TorchAtenLinear"} == {"train"}
    model.train()
    losses = train_steps(model, input_ids, 6)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        qa_logits = model(input_ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
    # bfloat16 model: the merged layers compute in bfloat16, the QA forward in float32
    assert (merged_logits.float() - qa_logits.float()).abs().max() < 0.05
    merged.save_pretrained(tmp_path / "merged-int4")
    saved_config = json.loads((tmp_path / "merged-int4" / "config.json").read_text())
    assert saved_config["quantization_config"]["format"] == "gptq"  # v1, the widely read format
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-int4", device_map="cpu")
    reloaded.train()  # the same (dequantizing) kernel path as the merged model in memory
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, merged_logits)
    masks = load_sparsity_mask(path)
    for name, mask in masks.items():
        assert bool((dense(reloaded.get_submodule(name))[~mask] == 0).all()), name


def test_transformers_save_of_an_unloaded_gptq_model_keeps_the_zero_points(quantized, tmp_path):
    """transformers writes the in-memory v2 zero-points under the checkpoint's v1 label; wrapped models do not."""
    path, _ = quantized(4, False)
    model = get_peft_model(load_gptq(path), ElasticLoraConfig(r=4, target_modules=["q_proj"]))
    base = model.unload()
    base.save_pretrained(tmp_path / "resaved")
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert torch.equal(load_gptq(tmp_path / "resaved")(input_ids).logits, base(input_ids).logits)


def test_sft_trainer_on_an_int4_base_keeps_the_mask_through_merge_and_reload(quantized, tokenizer, tmp_path):
    path, _ = quantized(4, False)
    dataset = Dataset.from_list([{"text": text} for text in TEXTS[:32]])
    config = qa_config(r=8, rank_choices=[8, 6, 4])  # QA-SparsePEFT + NLS
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        max_length=32,
        disable_tqdm=True,
    )
    assert args.gradient_checkpointing  # SFTConfig's default: the QA forward is recomputed in the backward pass
    trainer = SFTTrainer(
        model=load_gptq(path),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SubnetworkSamplingCallback(strategy="random", seed=0)],
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    model = trainer.model
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)  # it trained

    again = PeftModel.from_pretrained(load_gptq(path), tmp_path / "adapter")
    assert isinstance(again.peft_config["default"], SparsePEFTConfig)
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(11))
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids).logits
        assert torch.equal(again(input_ids).logits, trained_logits)
    merged = again.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load_gptq(tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, trained_logits)
    for name, mask in load_sparsity_mask(path).items():
        assert bool((dense(reloaded.get_submodule(name))[~mask] == 0).all()), name


# --------------------------------------------------------------------------------- unmerged SQFT pipelines


@pytest.mark.parametrize("kind", ["elastic_lora", "nls", "sparse_peft"])
def test_fp_adapters_train_and_reload_on_the_default_int4_base(quantized, kind, tmp_path):
    """SQFT's "INT4 base + FP adapter": adapters train on the default CPU kernel and save/load; SparsePEFT's update
    keeps the stored mask."""
    path, _ = quantized(4, False)
    config = {
        "elastic_lora": ElasticLoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
        "nls": NLSConfig(r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=TARGETS),
        "sparse_peft": SparsePEFTConfig(r=8, lora_alpha=16, target_modules=TARGETS),
    }[kind]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, device_map="cpu"), config)
    input_ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(12))
    losses = train_steps(model, input_ids, 5)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    again = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids).logits, model(input_ids).logits)
    if kind == "sparse_peft":
        masks = load_sparsity_mask(path)
        found = {n: m for n, m in again.named_modules() if is_sparse_peft_layer(m)}
        layers = {n.removeprefix("base_model.model."): m for n, m in found.items()}
        assert len(layers) == 12
        for name, layer in layers.items():
            assert torch.equal(sparsity_mask(layer), masks[name])
            assert bool((layer.get_delta_weight("default")[~masks[name]] == 0).all())
        with pytest.raises(ValueError, match="trained without quantization_aware=True"):
            again.merge_and_unload()
        assert len(layers) == sum(is_sparse_peft_layer(m) for m in again.modules())  # nothing was unloaded


# ----------------------------------------------------------------------------------------------------- errors


def test_errors(quantized, tmp_path):
    path, _ = quantized(4, False)
    with pytest.raises(ValueError, match="needs lora_dropout=0"):
        qa_config(lora_dropout=0.1)
    with pytest.raises(ValueError, match="quantization_aware must be True or False"):
        qa_config(quantization_aware="yes")
    from peft_elastic.toy import tiny_llama

    with pytest.raises(ValueError, match="module 'model.layers.0.self_attn.q_proj' is a Linear"):
        get_peft_model(tiny_llama(), qa_config())

    # no mask next to the checkpoint
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in path.iterdir():
        if file.name != MASK_FILE:
            (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match=rf"there is no {MASK_FILE} in the folder the model was loaded from"):
        get_peft_model(load_gptq(bare), qa_config())
    with pytest.raises(FileNotFoundError, match="No sparsity mask at"):
        get_peft_model(load_gptq(bare), qa_config(sparsity_mask=str(tmp_path / "nowhere")))
    dense_model = get_peft_model(load_gptq(bare), qa_config(sparsity_mask="dense"))
    assert all(bool(sparsity_mask(layer).all()) for layer in qa_layers(dense_model).values())
    # a mask of another model
    other = tmp_path / "other.safetensors"
    peft_elastic.quantization.save_sparsity_mask({"transformer.h.0.attn": torch.ones(2, 2, dtype=torch.bool)}, other)
    with pytest.raises(ValueError, match="names modules this model does not have .*belongs to another model"):
        get_peft_model(load_gptq(path), qa_config(sparsity_mask=str(other)))

    # a layer already re-laid out for the int4 inference kernel (an eval pass before wrapping)
    qmodel = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    qmodel.eval()
    with torch.no_grad():
        qmodel(torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match="already re-laid out for gptqmodel's int4 inference kernel"):
        get_peft_model(qmodel, qa_config())
    # 3-bit layers
    qmodel = load_gptq(path)
    qmodel.model.layers[0].self_attn.q_proj.bits = 3
    with pytest.raises(ValueError, match=r"3-bit GPTQ layers are not supported; supported: \[2, 4, 8\]"):
        get_peft_model(qmodel, qa_config())
    # a kernel with its own packed layout
    qmodel = load_gptq(path)
    layer = qmodel.model.layers[0].self_attn.q_proj
    layer.__class__ = type("MarlinQuantLinear", (type(layer),), {})
    with pytest.raises(ValueError, match="kernel-specific packed layout .* backend='gptq_torch'"):
        get_peft_model(qmodel, qa_config())


def test_qa_forward_and_gradients_are_float32_under_bf16_autocast(quantized):
    """TRL's SFTConfig turns on bf16 autocast by default, also on a CPU. The QA layers compute in float32 anyway: in
    bfloat16 the update `s · B A` rounded codes differently from the merge (and the forward ran ~10x slower on a CPU
    without bfloat16 units: 53 s against 5 s per SmolLM2 step)."""
    path, _ = quantized(4, False)
    model = get_peft_model(load_gptq(path), qa_config())
    randomize_adapters(model, seed=5)
    input_ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    layers = qa_layers(model)

    def outputs(autocast: bool):
        model.zero_grad(set_to_none=True)
        captured = {}
        hooks = [
            m.register_forward_hook(lambda mod, a, out, n=n: captured.__setitem__(n, out)) for n, m in layers.items()
        ]
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids).logits
            logits.float().square().mean().backward()
        finally:
            for hook in hooks:
                hook.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return captured, grads

    plain, plain_grads = outputs(False)
    cast, cast_grads = outputs(True)
    first = "model.layers.0.self_attn.q_proj"
    # the first QA layer sees the same float32 input either way (the norm's): its output must be bit-identical
    assert cast[first][0].dtype == torch.float32
    assert cast[first][1].dtype == torch.float32 and torch.equal(cast[first][1], plain[first][1])
    # a layer behind bf16 attention gets bfloat16 activations and returns them in that dtype, as autocast's layers do
    assert cast["model.layers.0.self_attn.o_proj"][1].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in cast_grads.values()) and set(cast_grads) == set(plain_grads)
    codes = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
            layer = layers[first]
            codes[autocast] = merged_codes(
                quant_grid(layer), *factors(layer), layer.scaling["default"], transposed_mask(layer)
            )
    assert torch.equal(codes[True], codes[False])
