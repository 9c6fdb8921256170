"""Library exports write a folder whole: a new or empty folder is written, a non-empty one is refused unless
`overwrite=True`, which replaces it (nothing of the old one is kept), and a failed export changes nothing."""

from __future__ import annotations

import os
import re

import pytest
from conftest import randomize_lora_b
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model():
    config = ElasticLoraConfig(r=4, target_modules=TARGETS, width_choices=[1.0, 0.75, 0.5], head_choices=[1.0, 0.5])
    model = get_peft_model(tiny_llama(), config)
    randomize_lora_b(model)
    return model


def sub_adapter(model, folder, **kwargs):
    return peft_elastic.export_sub_adapter(model, folder, peft_elastic.maximal_subnetwork(model), **kwargs)


def compressed(model, folder, **kwargs):
    return peft_elastic.export_compressed_model(model, folder, peft_elastic.heuristic_subnetwork(model), **kwargs)


def loads(export, folder) -> None:
    """The folder holds exactly what `export` writes, and it loads."""
    if export is sub_adapter:
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        PeftModel.from_pretrained(tiny_llama(), folder)
    else:
        assert not (folder / "adapter_config.json").exists()
        AutoModelForCausalLM.from_pretrained(folder)


def contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("export", [sub_adapter, compressed])
def test_a_non_empty_folder_is_refused_and_left_as_it_was(tmp_path, model, export):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "adapter_config.json").write_text("{}")
    expected = (
        f"save_directory {str(folder)!r} is not empty (it holds adapter_config.json, notes.txt); choose another "
        "folder, or pass overwrite=True to replace it whole."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        export(model, folder)
    assert contents(folder) == {"adapter_config.json": b"{}", "notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


@pytest.mark.parametrize("export", [sub_adapter, compressed])
def test_overwrite_replaces_the_folder_whole(tmp_path, model, export):
    folder = tmp_path / "out"
    (folder / "nested").mkdir(parents=True)
    (folder / "nested" / "old.bin").write_bytes(b"old")
    (folder / "model.safetensors").write_bytes(b"not a model")
    assert export(model, folder, overwrite=True) == folder
    assert not (folder / "nested").exists()
    loads(export, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("export", [sub_adapter, compressed])
def test_a_new_or_empty_folder_is_written(tmp_path, model, export):
    export(model, tmp_path / "new" / "out")  # parents are created
    loads(export, tmp_path / "new" / "out")
    (tmp_path / "empty").mkdir()
    export(model, tmp_path / "empty")
    loads(export, tmp_path / "empty")
    made = tmp_path / "made"
    made.mkdir()
    assert os.stat(tmp_path / "empty").st_mode == os.stat(made).st_mode  # not a temporary folder's owner-only mode


def test_a_compressed_model_over_a_super_adapter(tmp_path, model):
    """The issue: a compressed model exported into the super-adapter's folder kept `adapter_config.json`, which
    `AutoModelForCausalLM` then read as an adapter."""
    model.save_pretrained(tmp_path / "super")
    with pytest.raises(ValueError, match=r"is not empty .* pass overwrite=True"):
        compressed(model, tmp_path / "super")
    assert (tmp_path / "super" / "adapter_model.safetensors").is_file()
    compressed(model, tmp_path / "super", overwrite=True)
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "super")
    assert sorted(p.name for p in (tmp_path / "super").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny_llama().parameters())


def test_a_failed_overwrite_keeps_the_old_folder(tmp_path, model, monkeypatch):
    folder = tmp_path / "out"
    compressed(model, folder)
    before = contents(folder)

    def broken(*args, **kwargs):  # the new folder is written, then fails to read back
        raise OSError("disk full")

    monkeypatch.setattr(peft_elastic.compressed, "load_compressed_model", broken)
    with pytest.raises(OSError, match="disk full"):
        compressed(model, folder, overwrite=True)
    assert contents(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
