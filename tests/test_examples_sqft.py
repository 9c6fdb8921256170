"""The three SQFT examples run end to end and do what they say: SparsePEFT merged into a sparse float model, an FP
adapter on a sparse INT4 (GPTQ) base, and QA-SparsePEFT merged into the INT4 model.

Each script runs as a subprocess for 8 steps. The environment pins gptqmodel's CPU workers (it refuses to start on 2
cores otherwise), keeps transformers offline, and, for speed on a shared 2-core machine, uses one torch thread (the
tiny model's matmuls are slower with two busy threads) and no torch.compile (gptqmodel compiles the `gptq_torch`
kernel's dequantization at each model load: several seconds per load, for no gain on a model this small)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_elastic.quantization import MASK_FILE, dequantize, load_sparsity_mask

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {
    "GPTQMODEL_CPU_WORKERS": "2",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TORCHDYNAMO_DISABLE": "1",
}
STEPS = 8
# The tiny Llama of the examples: 2 layers, hidden 128, intermediate 256, 4 heads of 32, 2 KV heads (k/v out 64).
# Adapter parameters per rank and layer: q 128+128, k 128+64, v 128+64, up 128+256, down 256+128 = 1408.
PARAMS_PER_RANK = 2 * 1408
HEURISTIC_RANK = 6  # ranks [8, 6, 4]: the middle one
PROJECTIONS = 14  # q, k, v, o, gate, up, down in 2 layers


def run(script: str, tmp_path: Path, *args: str) -> tuple[dict, str, Path]:
    """Run `examples/<script>` for a few steps in `tmp_path` (gptqmodel writes ./logs); its figures, stdout and output
    folder."""
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "examples" / script), "--output-dir", str(out), "--steps", str(STEPS), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "figures.json").read_text()), result.stdout, out


def table(stdout: str) -> dict[str, list[str]]:
    """The rows of the printed table by their first word."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.split()}


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("model*.safetensors") for k, v in load_file(f).items()}


def test_sparse_peft_merges_into_a_model_with_the_same_zeros(tmp_path):
    figures, stdout, out = run("sqft_sparse_peft.py", tmp_path)
    assert figures["tuned_loss"] < figures["base_loss"] - 0.03, figures  # 8 steps already help
    assert figures["merged_loss"] == pytest.approx(figures["tuned_loss"], abs=1e-5)
    assert figures["max_logit_diff"] < 1e-4
    # Wanda zeroes exactly half of every row (even widths): the merged model keeps exactly those zeros
    assert figures["sparsity"] == 0.5 and figures["merged_sparsity"] == 0.5
    assert figures["adapter_params"] == HEURISTIC_RANK * PARAMS_PER_RANK
    assert table(stdout)["merged,"][-2:] == [f"{figures['merged_loss']:.4f}", "50.00%"]

    merged = out / "merged"
    tensors = checkpoint(merged)
    assert not [key for key in tensors if "lora" in key]  # a plain model, not an adapter
    for key, weight in tensors.items():
        if key.endswith("_proj.weight"):
            assert int((weight == 0).sum()) == weight.numel() // 2, key
            assert bool(((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()), key  # per row, as Wanda prunes
    report = json.loads((merged / "sparsity_report.json").read_text())
    assert report["sparsity"] == 0.5 and len(report["modules"]) == PROJECTIONS
    assert (merged / "tokenizer.json").is_file()


def test_fp_adapter_on_the_int4_base_reloads_and_computes_the_same(tmp_path):
    figures, stdout, out = run("sqft_int4_adapter.py", tmp_path)  # the SparsePEFT adapter (--adapter nls: NLS)
    assert figures["tuned_loss"] < figures["base_loss"] - 0.03, figures
    assert figures["reloaded_loss"] == pytest.approx(figures["tuned_loss"], abs=1e-6)
    assert figures["max_logit_diff"] == 0.0  # the same INT4 weights and adapter in the same float32 kernel
    # every pruned weight of the INT4 base dequantizes to 0, before training and on the reloaded base
    assert figures["sparsity"] == figures["int4_sparsity"] == figures["reloaded_int4_sparsity"] == 0.5
    assert figures["update_on_pruned"] == 0.0  # SparsePEFT's update is masked (NLS's, plain LoRA, is not: ~1.0)
    assert figures["adapter_params"] == HEURISTIC_RANK * PARAMS_PER_RANK
    assert "reloaded" in table(stdout)

    quantization = json.loads((out / "int4" / "config.json").read_text())["quantization_config"]
    assert quantization["bits"] == 4 and quantization["group_size"] == 32 and quantization["sym"] is False
    masks = load_sparsity_mask(out / "int4")
    assert len(masks) == PROJECTIONS and all(mask.sum() * 2 == mask.numel() for mask in masks.values())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSE_PEFT" and config["quantization_aware"] is False
    assert config["r"] == 8 and config["rank_choices"] == [8, 6, 4]
    assert config["sparsity_mask"] is None  # the mask is found next to the INT4 base when the adapter is loaded
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora_A" in key or "lora_B" in key for key in weights)  # the adapter only, no base


def test_qa_sparse_peft_merges_into_an_int4_checkpoint_with_the_same_zeros(tmp_path):
    figures, stdout, out = run("sqft_qa_sparse_peft.py", tmp_path)
    assert figures["tuned_loss"] < figures["base_loss"] - 0.03, figures
    assert figures["merged_loss"] == figures["tuned_loss"]
    assert figures["max_logit_diff"] == 0.0  # as in test_qa_sparse_peft: float32 `gptq_torch`, bit-identical logits
    assert figures["sparsity"] == figures["int4_sparsity"] == figures["merged_int4_sparsity"] == 0.5
    assert figures["changed_codes"] > 0  # the QA-trained update did not round away
    assert figures["adapter_params"] == HEURISTIC_RANK * PARAMS_PER_RANK
    assert table(stdout)["merged"][-1] == "50.00%"

    before, after = out / "int4", out / "merged-int4"
    config = json.loads((after / "config.json").read_text())["quantization_config"]
    original = json.loads((before / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and config["group_size"] == 32 and config["format"] == original["format"]
    assert (after / MASK_FILE).read_bytes() == (before / MASK_FILE).read_bytes()
    assert (after / "tokenizer.json").is_file()
    # the merge rewrote codes only: scales, zero-points and g_idx are the original checkpoint's, bit for bit
    old, new = checkpoint(before), checkpoint(after)
    assert sorted(old) == sorted(new) and not [key for key in new if "lora" in key]
    masks = load_sparsity_mask(before)
    zero_format = 2 if config["format"] == "gptq_v2" else 1
    changed = 0
    for name, mask in masks.items():
        for part in ("qzeros", "scales", "g_idx"):
            assert torch.equal(new[f"{name}.{part}"], old[f"{name}.{part}"]), (name, part)
        changed += int((new[f"{name}.qweight"] != old[f"{name}.qweight"]).sum())
        parts = [new[f"{name}.{part}"] for part in ("qweight", "qzeros", "scales", "g_idx")]
        weight = dequantize(*parts, 4, zero_format)  # read from the file, not through gptqmodel
        assert bool((weight[~mask] == 0).all()), name  # every pruned weight is still exactly 0
    assert changed > 0


def load_example(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "examples" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("sqft_sparse_peft.py", ["--sparsity", "1.5"], "--sparsity must be between 0 and 1 (exclusive), got 1.5"),
        ("sqft_int4_adapter.py", ["--adapter", "lora"], "argument --adapter: invalid choice: 'lora'"),
        ("sqft_qa_sparse_peft.py", ["--group-size", "48"], "--group-size must be -1 or a power of two, got 48"),
        ("sqft_qa_sparse_peft.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ],
)
def test_examples_reject_bad_arguments_in_one_line(script, args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_example(script).main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"error: {message}" in err[-1] and "Traceback" not in "".join(err)
