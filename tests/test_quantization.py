"""GPTQ quantization that keeps a sparse model's zeros: the packed layout against gptqmodel's own dequantization,
the zero-point formats, `quantize_gptq` (pruned weights dequantize to exactly 0 in the saved checkpoint, which
transformers loads), the stored mask, and the errors."""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel refuses to start on 2 cores without it

import json

import pytest
import torch
from gptq_fixtures import CALIBRATION, load_gptq, sparse_model
from safetensors.torch import load_file

import peft_elastic
from peft_elastic.quantization import (
    MASK_FILE,
    dequantize,
    load_sparsity_mask,
    pack_cols,
    pack_rows,
    save_sparsity_mask,
    unpack_cols,
    unpack_rows,
    zero_points,
)


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in path.glob("*.safetensors"):
        if file.name != MASK_FILE:
            tensors.update(load_file(file))
    return tensors


# --------------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 24), generator=g, dtype=torch.int32)
    qweight = pack_rows(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (64 * bits // 32, 24)
    assert torch.equal(unpack_rows(qweight, bits, 64), codes)
    qzeros = pack_cols(codes, bits)
    assert qzeros.shape == (64, 24 * bits // 32) if 24 * bits % 32 == 0 else qzeros.shape[0] == 64
    assert torch.equal(unpack_cols(qzeros, bits, 24), codes)
    # the layout itself: code i of a word sits at bits [bits * i, bits * (i + 1))
    word = int(pack_rows(torch.arange(32 // bits).remainder(2**bits).view(-1, 1), bits)[0, 0]) % 2**32
    per_word = 32 // bits
    assert [(word >> (bits * i)) & (2**bits - 1) for i in range(per_word)] == [i % 2**bits for i in range(per_word)]


def test_packing_errors():
    with pytest.raises(ValueError, match=r"3-bit GPTQ layers are not supported; supported: \[2, 4, 8\]"):
        pack_rows(torch.zeros(32, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"4-bit codes must be in \[0, 15\], got \[0, 16\]"):
        pack_rows(torch.tensor([[16], [0]]), 4)
    with pytest.raises(ValueError, match="zero-point format must be 1 .* or 2"):
        zero_points(torch.zeros(1, 1, dtype=torch.int32), 4, 8, 3)


@pytest.mark.parametrize("bits, desc_act", [(2, False), (4, False), (4, True), (8, True)])
def test_dequantize_matches_gptqmodel_in_memory_and_on_disk(quantized, bits, desc_act):
    path, report = quantized(bits, desc_act)
    on_disk = 2 if report.checkpoint_format == "gptq_v2" else 1  # v2 where a zero-point is 0 (data-dependent)
    model = load_gptq(path)
    tensors = checkpoint_tensors(path)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
    assert len(layers) == 14
    for name, layer in layers.items():
        # the torch kernel converts a v1 checkpoint to v2 in memory (its flag then says 2; after a v2 one it stays 1)
        assert layer.qzero_format() == (2 if on_disk == 1 else 1)
        ours = dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 2)
        assert torch.equal(ours, layer.dequantize_weight().T), name
        saved = [tensors[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")]
        assert torch.equal(dequantize(*saved, bits, on_disk), ours), name  # v1 stores z - 1, v2 z
        assert torch.equal(layer.g_idx, saved[3])
        if desc_act:
            assert not torch.equal(layer.g_idx, torch.arange(layer.g_idx.numel(), dtype=torch.int32) // 32)


# ---------------------------------------------------------------------------------------------- quantize_gptq


@pytest.mark.parametrize("bits, desc_act", [(2, False), (4, False), (4, True), (8, True)])
def test_quantize_gptq_keeps_every_zero(quantized, bits, desc_act):
    path, report = quantized(bits, desc_act)
    float_model = sparse_model()
    zeros = {n: m.weight == 0 for n, m in float_model.named_modules() if n.endswith("_proj")}
    masks = load_sparsity_mask(path)
    assert set(masks) == set(zeros) and len(masks) == 14
    assert all(torch.equal(masks[name], ~zeros[name]) for name in zeros)
    model = load_gptq(path)
    for name, zero in zeros.items():
        weight = model.get_submodule(name).dequantize_weight().T
        assert bool((weight[zero] == 0).all()), name  # every pruned weight dequantizes to exactly 0
    # measure_sparsity reads GPTQ layers: the weights that gptqmodel's own dequantization makes exactly zero
    measured = peft_elastic.measure_sparsity(model).modules
    assert set(measured) == set(zeros)
    for name in zeros:
        weight = model.get_submodule(name).dequantize_weight()
        assert measured[name] == (int((weight == 0).sum()), weight.numel()), name
        assert measured[name][0] >= report.modules[name][0]
    # GPTQ's error feedback had filled some pruned weights: the zero-point restore was needed
    assert report.restored > 0 and report.sparsity == pytest.approx(0.5)
    assert json.loads((path / "quantization_report.json").read_text())["restored"] == report.restored
    # the quantized model still computes about what the float one does
    input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = float_model(input_ids).logits
        error = (model(input_ids).logits - reference).abs().max() / reference.abs().max()
    assert error < {2: 1.0, 4: 0.2, 8: 0.02}[bits]


def test_a_zero_point_of_zero_gives_a_v2_checkpoint(quantized):
    """v1 stores z - 1 and cannot hold z = 0 (gptqmodel's own conversion borrows from the neighbouring zero-point):
    such a model is written as "gptq_v2", which transformers loads through gptqmodel, with every zero kept."""
    path, report = quantized(4, False, hidden=256)
    assert report.checkpoint_format == "gptq_v2"
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "gptq_v2"
    tensors = checkpoint_tensors(path)
    model = load_gptq(path)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
    zero_groups = 0
    for name, layer in layers.items():
        saved = [tensors[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")]
        zero_groups += int((zero_points(saved[1], 4, layer.scales.shape[1], 2) == 0).sum())
        assert torch.equal(dequantize(*saved, 4, 2), layer.dequantize_weight().T), name  # v2 on disk and in memory
    assert zero_groups > 0
    masks = load_sparsity_mask(path)
    float_model = sparse_model(hidden=256)
    for name, mask in masks.items():
        assert torch.equal(mask, float_model.get_submodule(name).weight != 0)
        assert bool((layers[name].dequantize_weight().T[~mask] == 0).all()), name
    # the models with no zero-point of 0 are written as "gptq" (v1), the format every GPTQ reader takes
    assert quantized(4, False)[1].checkpoint_format == "gptq"


def test_quantize_gptq_from_a_checkpoint_folder_with_token_ids(tokenizer, tmp_path):
    source = tmp_path / "sparse"
    peft_elastic.save_sparsified(sparse_model(), source, tokenizer=tokenizer)
    calibration = [torch.tensor(tokenizer(text)["input_ids"]) for text in CALIBRATION]
    report = peft_elastic.quantize_gptq(source, tmp_path / "int8", calibration, bits=8, group_size=-1, sym=True)
    assert report.bits == 8 and report.group_size == -1 and report.sym
    assert sorted(p.name for p in (tmp_path / "int8").iterdir() if p.suffix == ".json" and "token" in p.name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_quantize_gptq_errors(tokenizer, tmp_path):
    model = sparse_model()
    target = tmp_path / "out"
    cases = [
        (dict(bits=3), r"3-bit GPTQ layers are not supported"),
        (dict(group_size=48), r"group_size must be -1 \(one group per row\) or a positive power of two, got 48"),
        (dict(sym="yes"), r"sym must be True or False, got 'yes'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            peft_elastic.quantize_gptq(model, target, CALIBRATION, tokenizer=tokenizer, **kwargs)
    with pytest.raises(ValueError, match="calibration_data is empty"):
        peft_elastic.quantize_gptq(model, target, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs tokenizer= with a model object"):
        peft_elastic.quantize_gptq(model, target, CALIBRATION)
    with pytest.raises(ValueError, match="is not a model checkpoint folder"):
        peft_elastic.quantize_gptq(tmp_path, target, CALIBRATION, tokenizer=tokenizer)
    assert not target.exists()  # nothing written by a rejected call
    held = tmp_path / "held"
    held.mkdir()
    (held / "old.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'.*held' is not empty \(it holds old.txt\).*overwrite=True"):
        peft_elastic.quantize_gptq(model, held, [], tokenizer=tokenizer)  # refused first, before the calibration
    assert [p.name for p in held.iterdir()] == ["old.txt"]


def test_sparsity_mask_file_roundtrip_and_errors(tmp_path):
    masks = {"a.q_proj": torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) > 0.5}
    save_sparsity_mask(masks, tmp_path)
    stored = load_file(tmp_path / MASK_FILE)["a.q_proj"]
    assert stored.dtype == torch.uint8 and stored.shape == (5, 2)  # bit-packed: 13 columns in 2 bytes
    loaded = load_sparsity_mask(tmp_path)
    assert loaded.keys() == masks.keys() and torch.equal(loaded["a.q_proj"], masks["a.q_proj"])
    with pytest.raises(ValueError, match="must be a 2-D bool tensor"):
        save_sparsity_mask({"x": torch.ones(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="No sparsity mask at"):
        load_sparsity_mask(tmp_path / "missing")
