"""`export_merged_model`: the merge saved atomically and read back, checked by loading the folder with transformers
(an independent reader) against the adapter's own outputs, and with the sparsity and mask file a reader needs."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from gptq_fixtures import TEXTS, load_gptq
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from test_qa_sparse_peft import randomize_adapters
from transformers import AutoModelForCausalLM

import peft_elastic
from peft_elastic import SparsePEFTConfig, export_merged_model
from peft_elastic.merged import verify_saved_model
from peft_elastic.quantization import MASK_FILE
from peft_elastic.toy import tiny_llama, train_tokenizer

INPUT = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(7))


def sparse_peft_model():
    torch.manual_seed(0)
    base = tiny_llama()
    peft_elastic.sparsify(base, None, "magnitude", 0.5, progress=False)
    config = SparsePEFTConfig(r=8, lora_alpha=16, rank_choices=[8, 4], target_modules=TARGETS)
    model = get_peft_model(base, config)
    randomize_lora_b(model, std=0.1)
    return model.eval()


def zero_patterns(model) -> dict[str, torch.Tensor]:
    return {
        name.replace(".base_layer", ""): module.weight == 0
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and ".layers." in name and "lora_" not in name
    }


def test_the_saved_merge_computes_the_subnetwork_and_keeps_every_zero(tmp_path):
    model = sparse_peft_model()
    minimal = peft_elastic.minimal_subnetwork(model)
    peft_elastic.set_subnetwork(model, minimal)
    with torch.no_grad():
        expected = model(INPUT).logits
    peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))  # the export sets it back
    zeros = zero_patterns(model.get_base_model())
    tokenizer = train_tokenizer(TEXTS, vocab_size=96)

    path = export_merged_model(model, tmp_path / "merged", subnetwork=minimal, tokenizer=tokenizer)
    assert path == tmp_path / "merged" and (path / "tokenizer.json").is_file()
    assert not (path / MASK_FILE).exists()  # a float base keeps its zeros in its weights
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(INPUT).logits, expected, atol=1e-5)
    saved = zero_patterns(loaded)
    assert saved.keys() == zeros.keys() and len(zeros) == 7 * len(loaded.model.layers)
    assert all(bool(saved[name][zeros[name]].all()) for name in zeros)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left


def test_refusals_come_before_anything_is_merged(tmp_path):
    model = sparse_peft_model()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"save_directory .*full' is not empty \(it holds config.json\)"):
        export_merged_model(model, tmp_path / "full")
    with pytest.raises(ValueError, match=r"Unknown group name\(s\) \['nope'\]"):
        export_merged_model(model, tmp_path / "out", subnetwork={"nope": 4})
    assert sum(1 for m in model.modules() if hasattr(m, "lora_A")) > 0 and not any(
        getattr(m, "merged", False) for m in model.modules()
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="export_merged_model needs a PeftModel .*got LlamaForCausalLM"):
        export_merged_model(model.get_base_model(), tmp_path / "out")


def test_a_saved_tensor_that_differs_or_is_missing_is_caught(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    verify_saved_model(tmp_path, model)  # as written: no error
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    changed = dict(tensors, **{key: tensors[key] + 1e-3})
    save_file(changed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=f"The saved {key} in .* differs from the merged model's"):
        verify_saved_model(tmp_path, model)
    without = {k: v for k, v in tensors.items() if k != key}
    save_file(without, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=rf"The merged model's \['{key}'\] were not saved"):
        verify_saved_model(tmp_path, model)


def test_a_qa_merge_into_int4_is_saved_with_the_mask_file(quantized, tmp_path):
    path, _ = quantized(4, False)
    options = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], quantization_aware=True)
    model = get_peft_model(load_gptq(path), SparsePEFTConfig(**options))
    randomize_adapters(model, seed=0, std=0.05)
    with torch.no_grad():
        expected = model(INPUT).logits

    out = export_merged_model(model, tmp_path / "merged")
    assert (out / MASK_FILE).read_bytes() == (path / MASK_FILE).read_bytes()
    reloaded = load_gptq(out)
    with torch.no_grad():
        assert torch.allclose(reloaded(INPUT).logits, expected, atol=1e-5)
