"""What `quantize_gptq` writes runs in every loader: transformers' default kernel, `backend="gptq_torch"` and
`gptqmodel.GPTQModel.load`, on a tiny Llama whose widths (hidden 192, intermediate 384) are not multiples of 128;
a group size that does not divide a quantized layer's in-features is refused before any work; a merged
QA-SparsePEFT checkpoint reads back bit for bit through `gptq_torch` and within bfloat16 rounding through the default
CPU kernel of transformers and gptqmodel (`TorchAtenLinear`).

Oracles: the checkpoint's own tensors, dequantized with `packing.dequantize` (checked against gptqmodel in
test_quantization) into a float32 copy of the model; the float model the checkpoint was quantized from; the
QA-SparsePEFT forward before the merge.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from gptq_fixtures import CALIBRATION, load_gptq
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPTQConfig

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.quantization import dequantize, gptq, load_sparsity_mask, unpack_rows, zero_points
from peft_elastic.toy import tiny_llama

HIDDEN, INTERMEDIATE = 192, 384  # in-features 192 (q/k/v/o/gate/up_proj) and 384 (down_proj): 128 divides neither
GROUP_SIZE = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOADERS = ("default", "gptq_torch", "gptq_torch_float32", "gptqmodel")
BF16_EPS = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)
#: bound on a bfloat16 kernel's logits against a float32 computation of the same weights, relative to max |logit|:
#: about 5 bfloat16 roundings; measured 0.41-0.59 % (see docs/quantization.md)
BF16_LOGITS_BOUND = 0.02


def sparse_float_model():
    model = tiny_llama(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    peft_elastic.sparsify(model, None, "magnitude", 0.5, progress=False)
    return model


@pytest.fixture(scope="module")
def float_model():
    return sparse_float_model()


@pytest.fixture(scope="module")
def checkpoint(float_model, tokenizer, tmp_path_factory):
    """(folder, report) of `float_model` quantized to 4 bits in groups of 64."""
    path = tmp_path_factory.mktemp("gptq_loaders") / "int4"
    report = peft_elastic.quantize_gptq(
        float_model, path, CALIBRATION, bits=4, group_size=GROUP_SIZE, tokenizer=tokenizer
    )
    return path, report


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def load(path, loader: str):
    """The checkpoint in `path` loaded on CPU the way `loader` names; eval mode."""
    if loader == "gptqmodel":
        from gptqmodel import GPTQModel

        return GPTQModel.load(str(path), device="cpu").model
    if loader == "gptq_torch_float32":
        return load_gptq(path)
    options = {"quantization_config": GPTQConfig(bits=4, backend="gptq_torch")} if loader == "gptq_torch" else {}
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **options)


def saved_gptq_tensors(path) -> dict[str, tuple[torch.Tensor, ...]]:
    """`{layer: (qweight, qzeros, scales, g_idx)}` as saved in the checkpoint folder `path`."""
    tensors = {k: v for f in path.glob("model*.safetensors") for k, v in load_file(f).items()}
    names = {key.rsplit(".", 1)[0] for key in tensors if key.endswith(".qweight")}
    return {n: tuple(tensors[f"{n}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")) for n in sorted(names)}


def saved_zero_format(path) -> int:
    """The zero-point format of the checkpoint in `path`: 1 ("gptq", `z − 1`) or 2 ("gptq_v2", `z`)."""
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    return 2 if config.get("checkpoint_format", config["format"]) == "gptq_v2" else 1


def checkpoint_reference(path, float_model):
    """A float32 copy of `float_model` holding the 4-bit checkpoint's weights: the GPTQ layers dequantized, the other
    tensors as saved (in the float model's dtype, float32)."""
    tensors = {k: v for f in path.glob("model*.safetensors") for k, v in load_file(f).items()}
    state = {k: v.float() for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name, parts in saved_gptq_tensors(path).items():
        state[f"{name}.weight"] = dequantize(*parts, 4, saved_zero_format(path)).float()
    reference = copy.deepcopy(float_model)
    reference.load_state_dict(state)
    return reference


def kernel_weight(layer, dtype) -> torch.Tensor:
    """The weight (out × in, float32) that `layer`'s forward computes with: its output for the identity matrix."""
    with torch.no_grad():
        return layer(torch.eye(layer.in_features, dtype=dtype)).T.float()


def check_sparsity(path, model, stored: dict[str, torch.Tensor]) -> None:
    """Every pruned weight of `path` (its sparsity mask) is exactly 0 in `stored` (the loaded layers' codes
    dequantized before any forward) and in the weight the loaded kernels compute with — but for the int4 inference
    kernel of `TorchAtenLinear`, whose zero offset `(8 − z)·s` is rounded to bfloat16: there the pruned weights are
    at most one bfloat16 rounding of it away from 0."""
    masks = load_sparsity_mask(path)
    saved = saved_gptq_tensors(path)
    assert masks.keys() == saved.keys() == stored.keys()
    for name, mask in masks.items():
        assert bool((stored[name][~mask] == 0).all()), name
        layer = model.get_submodule(name)
        weight = kernel_weight(layer, model.dtype)
        if type(layer).__name__ != "TorchAtenLinear":
            assert bool((weight[~mask] == 0).all()), name
            continue
        _, qzeros, scales, g_idx = saved[name]
        groups = g_idx.long()
        z = zero_points(qzeros, 4, scales.shape[1], saved_zero_format(path))[groups].T.float()  # (out × in)
        s = scales.to(torch.bfloat16).float()[groups].T
        bound = BF16_EPS * (1 + BF16_EPS) * ((8 - z) * s).abs()
        assert bool((weight[~mask].abs() <= bound[~mask]).all()), name


def stored_weights(model) -> dict[str, torch.Tensor]:
    """`{layer: weight (out × in)}` dequantized from every GPTQ layer's packed tensors as loaded."""
    from peft_elastic.quantization.layers import zero_format

    return {
        name: dequantize(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits, zero_format(m))
        for name, m in model.named_modules()
        if hasattr(m, "qweight") and hasattr(m, "g_idx")
    }


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| over the scale of `b` (max |b|)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ------------------------------------------------------------------------------------------------ group sizes


class Forbidden(AssertionError):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Make calibration and gptqmodel fail the test if `quantize_gptq` reaches them."""
    from gptqmodel import GPTQModel

    def forbidden(*args, **kwargs):
        raise Forbidden("quantize_gptq went on to calibration or gptqmodel")

    monkeypatch.setattr(gptq, "calibration_batches", forbidden)
    monkeypatch.setattr(GPTQModel, "load", forbidden)


def test_group_size_that_does_not_divide_a_layer_is_refused_before_any_work(tokenizer, tmp_path, no_work):
    model = tiny_llama(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    model.save_pretrained = lambda *args, **kwargs: pytest.fail("the model was saved for gptqmodel")
    target = tmp_path / "int4"
    with pytest.raises(ValueError) as error:
        peft_elastic.quantize_gptq(model, target, CALIBRATION, bits=4, group_size=128, tokenizer=tokenizer)
    message = str(error.value)
    assert message.startswith(
        "group_size=128 does not divide the in-features of model.layers.0.self_attn.q_proj (192): "
    )
    assert "expect K to be divisible by qGroupSize" in message
    assert message.endswith(
        "Group sizes that divide the in-features of every quantized layer (192, 384): 64, 32, 16 or -1 (one group "
        "per row)."
    )
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder beside it

    # a checkpoint folder is checked from its config alone: no weights (nor a tokenizer) are read. Every quantized
    # layer counts: here only down_proj's 640 in-features are not a multiple of 256
    source = tmp_path / "config-only"
    tiny_llama(hidden_size=256, intermediate_size=640).config.save_pretrained(source)
    with pytest.raises(ValueError) as error:
        peft_elastic.quantize_gptq(source, target, CALIBRATION, bits=8, group_size=256)
    message = str(error.value)
    assert message.startswith("group_size=256 does not divide the in-features of model.layers.0.mlp.down_proj (640)")
    assert message.endswith("(256, 640): 128, 64, 32, 16 or -1 (one group per row).")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config-only"]
    assert sorted(p.name for p in source.iterdir()) == ["config.json"]
    with pytest.raises(ValueError, match="must be a transformers model .* got Linear"):
        peft_elastic.quantize_gptq(torch.nn.Linear(4, 4), target, CALIBRATION, tokenizer=tokenizer)


def test_group_sizes_gptqmodel_does_not_pack_are_refused_first(tokenizer, tmp_path, no_work):
    """gptqmodel refuses groups of 8 only when it packs, after calibrating."""
    model = tiny_llama(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    for size in (8, 2048):
        with pytest.raises(ValueError) as error:
            peft_elastic.quantize_gptq(model, tmp_path / "int4", CALIBRATION, group_size=size, tokenizer=tokenizer)
        assert str(error.value) == (
            f"group_size={size} is not one gptqmodel packs; use -1 (one group per row) or one of "
            "16, 32, 64, 128, 256, 512, 1024."
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [16, -1])
def test_a_4_bit_group_size_the_default_cpu_kernel_cannot_run_warns(tokenizer, tmp_path, no_work, size):
    """Measured: at 4 bits, transformers' default CPU kernels fail on groups of 16 (`TorchAtenLinear`) and of a
    whole 192-wide row (-1, `TorchFusedLinear`): `_weight_int4pack_mm_cpu: expect qGroupSize to be 32, 64, 128 or
    256`. Such checkpoints are still written (`gptq_torch` and GPU kernels read them); the warning says so."""
    model = tiny_llama(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    with pytest.warns(UserWarning) as caught, pytest.raises(Forbidden):
        peft_elastic.quantize_gptq(model, tmp_path / "int4", CALIBRATION, group_size=size, tokenizer=tokenizer)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"group_size={size}: transformers' default 4-bit CPU kernels (gptqmodel's TorchAtenLinear / TorchFusedLinear) "
        "cannot run this checkpoint (torch's int4 matmul takes groups of 32, 64, 128, 256; in-features here: 192, "
        "384); on CPU load it with GPTQConfig(bits=4, backend='gptq_torch'), or quantize with group_size 64 or 32."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fine in (dict(group_size=64), dict(group_size=32), dict(group_size=16, bits=8)):
            with pytest.raises(Forbidden):
                peft_elastic.quantize_gptq(model, tmp_path / "int4", CALIBRATION, tokenizer=tokenizer, **fine)


def test_the_checked_layers_are_the_ones_gptqmodel_quantizes(checkpoint, float_model, tmp_path):
    """gptqmodel's Llama definition: the seven projections of every decoder block; not lm_head."""
    from gptqmodel import QuantizeConfig

    _, report = checkpoint
    config = QuantizeConfig(bits=4, group_size=GROUP_SIZE)
    planned = gptq._planned_in_features(float_model, config)
    float_model.config.save_pretrained(tmp_path)
    assert gptq._planned_in_features(tmp_path, config) == planned  # from the config, on the meta device
    assert sorted(planned) == sorted(report.modules)
    assert len(planned) == 14 and not any("lm_head" in name or "embed" in name for name in planned)
    widths = {name.rsplit(".", 1)[1]: width for name, width in planned.items()}
    assert widths == {p: INTERMEDIATE if p == "down_proj" else HIDDEN for p in TARGETS}


# ---------------------------------------------------------------------------------- the checkpoint's loaders


@pytest.mark.parametrize("loader", LOADERS)
def test_the_checkpoint_runs_in_each_loader_and_keeps_its_zeros(checkpoint, float_model, input_ids, loader):
    path, report = checkpoint
    assert report.group_size == GROUP_SIZE and report.sparsity == pytest.approx(0.5, abs=0.01)
    model = load(path, loader)
    kernel = type(model.get_submodule("model.layers.0.mlp.down_proj")).__name__
    # the checkpoint keeps the float model's dtype (float32), which transformers loads it in by default (`dtype`
    # "auto"); gptqmodel's own loader picks bfloat16 on CPU
    expected = {
        "default": ("TorchAtenLinear", torch.float32),
        "gptq_torch": ("TorchLinear", torch.float32),
        "gptq_torch_float32": ("TorchLinear", torch.float32),
        "gptqmodel": ("TorchAtenLinear", torch.bfloat16),
    }[loader]
    assert (kernel, model.dtype) == expected and not model.training
    stored = stored_weights(model)  # before the first forward, which re-lays TorchAtenLinear out
    with torch.no_grad():
        logits = model(input_ids).logits
        reference = checkpoint_reference(path, float_model)(input_ids).logits
        float_logits = float_model(input_ids).logits
    # the kernel against the same weights in float32; measured: 0 (TorchLinear), 0.41 % (TorchAtenLinear, whose int4
    # kernel computes with bfloat16 scales also in a float32 model), 0.58 % (TorchAtenLinear, bfloat16)
    if kernel == "TorchLinear":
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    else:
        assert relative(logits, reference) < BF16_LOGITS_BOUND
    # against the float model: 4-bit quantization of a random tiny model, measured 8.6-8.7 % in every loader
    assert relative(reference, float_logits) < 0.15 and relative(logits, float_logits) < 0.15
    check_sparsity(path, model, stored)


def test_quantize_gptq_leaves_no_gptqmodel_worker_alive(checkpoint):
    """gptqmodel's device pool workers run torch ops (each owning an OpenMP team); left idle they made every later
    parallel region wait for sleeping threads (0.6x speed on 2 cores). `quantize_gptq` stops them; the pool is built
    again when gptqmodel next needs it."""
    import sys
    import threading

    gptqmodel = sys.modules["gptqmodel"]
    assert gptqmodel._DEVICE_THREAD_POOL is None
    alive = [t.name for t in threading.enumerate()]
    assert not [name for name in alive if name.startswith(("DPWorker-cpu#1", "DPWorker-model_loader"))], alive
    pool = gptqmodel.get_device_thread_pool()  # gptqmodel's own later use still works
    try:
        assert pool.submit("cpu", lambda: torch.ones(2).sum().item()).result() == 2.0
    finally:
        from peft_elastic.quantization.gptqmodel_env import release_gptqmodel_threads

        assert release_gptqmodel_threads() is True and gptqmodel._DEVICE_THREAD_POOL is None


def test_eager_dequantization_restores_the_kernels_own_method(checkpoint, float_model, input_ids):
    """gptqmodel compiles each TorchLinear's dequantization when it loads; `eager_dequantization` undoes it on every
    layer (the demo's loader does, to spare the first run inductor's compile) and the logits stay the checkpoint's."""
    from peft_elastic.quantization.layers import eager_dequantization

    path, _ = checkpoint
    model = load_gptq(path)
    layers = [m for m in model.modules() if type(m).__name__ == "TorchLinear"]
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert all("dequantize_weight" in vars(m) for m in layers)  # gptqmodel's compiled wrapper, per instance
    assert eager_dequantization(model) == len(layers)
    assert not any("dequantize_weight" in vars(m) for m in layers)
    assert eager_dequantization(model) == 0  # nothing left to undo
    model.train()  # the training path (a float32 dequantization per forward), as QA-SparsePEFT and SQFT run it
    with torch.no_grad():
        trained = model(input_ids).logits
    model.eval()
    with torch.no_grad():
        logits = model(input_ids).logits
        reference = checkpoint_reference(path, float_model)(input_ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- merged QA-SparsePEFT


@pytest.fixture(scope="module")
def merged(checkpoint, tokenizer, input_ids, tmp_path_factory):
    """QA-SparsePEFT on the checkpoint loaded with `gptq_torch` (float32), with random adapters, merged and saved
    (with the tokenizer, which gptqmodel's loader needs): (folder, QA forward logits, fraction of codes changed)."""
    path, _ = checkpoint
    base = load_gptq(path)
    before = {n: m.qweight.clone() for n, m in base.named_modules() if hasattr(m, "qweight")}
    model = get_peft_model(base, SparsePEFTConfig(r=8, lora_alpha=16, target_modules=TARGETS, quantization_aware=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        qa_logits = model(input_ids).logits
    merged = model.merge_and_unload()
    changed = total = 0
    for name, qweight in before.items():
        layer = merged.get_submodule(name)
        rows = layer.g_idx.shape[0]
        changed += int((unpack_rows(layer.qweight, 4, rows) != unpack_rows(qweight, 4, rows)).sum())
        total += rows * layer.scales.shape[1]
    folder = tmp_path_factory.mktemp("gptq_loaders_merged") / "merged-int4"
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "sparsity_mask.safetensors").write_bytes((path / "sparsity_mask.safetensors").read_bytes())
    return folder, qa_logits, changed / total


@pytest.mark.parametrize("loader", LOADERS)
def test_merged_int4_checkpoint_in_each_loader(checkpoint, merged, input_ids, loader):
    """The merged checkpoint keeps the quantization config of the checkpoint it was trained on: the `gptq_torch`
    backend it was loaded with is not pinned (transformers' own save wrote it), so every loader picks its kernel as
    for that checkpoint. `TorchLinear` (`backend="gptq_torch"`) reads it bit for bit; `TorchAtenLinear` (the default
    of transformers, in float32, and of gptqmodel's loader, in bfloat16) re-lays the codes out for its int4 kernel
    with bfloat16 scales: measured 0.45 % and 0.59 % of max |logit| off."""
    folder, qa_logits, changed = merged
    assert changed > 0.2  # the adapters moved many codes (measured: 38.6 %)
    config, original = (json.loads((path / "config.json").read_text()) for path in (folder, checkpoint[0]))
    assert config["quantization_config"] == original["quantization_config"] and config["dtype"] == "float32"
    assert "backend" not in config["quantization_config"]
    model = load(folder, loader)
    kernel = type(model.get_submodule("model.layers.0.mlp.down_proj")).__name__
    stored = stored_weights(model)
    with torch.no_grad():
        logits = model(input_ids).logits
    expected = {
        "default": ("TorchAtenLinear", torch.float32),
        "gptq_torch": ("TorchLinear", torch.float32),
        "gptq_torch_float32": ("TorchLinear", torch.float32),
        "gptqmodel": ("TorchAtenLinear", torch.bfloat16),
    }[loader]
    assert (kernel, model.dtype) == expected
    if kernel == "TorchLinear":
        assert torch.equal(logits, qa_logits)
    else:
        assert relative(logits, qa_logits) < BF16_LOGITS_BOUND
    check_sparsity(folder, model, stored)
