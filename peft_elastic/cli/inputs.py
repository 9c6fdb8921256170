"""What every command reads and writes: models (a hub id, a folder, a `.gguf` file or `smollm2`), adapters,
datasets and the output folder, each checked with a one-line `CommandError` before anything heavy is loaded.

Commands call the loaders through this module (`inputs.load_model(...)`, `inputs.check_model`, `inputs.resolved`), so
that one patch of it reaches every command (the argument checks' tests forbid any model load this way)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..atomic_folders import replaced_directory


class CommandError(Exception):
    """A bad argument or input, reported as one line."""


def compute_dtype(args: argparse.Namespace):
    """The dtype of commands that compute with a model (train, eval, search): float32 unless --bf16, whatever the
    checkpoint's config says (an INT4 checkpoint may say bfloat16, which CPUs without bfloat16 units run several
    times slower). Commands that write a model (sparsify, export) keep the checkpoint's dtype ("auto")."""
    import torch

    return torch.bfloat16 if args.bf16 else torch.float32


def load_model(name_or_path: str, dtype="auto", verbose: bool = False):
    """A causal LM and its tokenizer from a hub id, a local folder, a `.gguf` file or `smollm2`
    (`peft_elastic.resolve_model`), in `dtype` (default "auto": the dtype its checkpoint was saved in, for commands
    that write a model; the others pass `compute_dtype(args)`). For a GPTQ checkpoint, gptqmodel is imported
    with the environment variables it sets restored, and its banner and logs are hidden for the rest of the command
    unless `verbose` (as is deepspeed's "Setting accelerator to CPU" line, where accelerate imports it on a save)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .._import_noise import drop_later_import_noise
    from ..quantization.gptqmodel_env import import_gptqmodel, quiet_gptqmodel_logs

    if not verbose:
        drop_later_import_noise()
    path = resolved(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        quantization = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)  # a dict, as stored
        if isinstance(quantization, dict) and quantization.get("quant_method") == "gptq":
            import_gptqmodel(verbose)
            if not verbose:
                quiet_gptqmodel_logs()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as error:
        raise _unloadable(name_or_path, error) from None
    return model, tokenizer


def resolved(name_or_path: str) -> str:
    """`peft_elastic.resolve_model(name_or_path)` (a GGUF file or `smollm2` converted once and cached), its errors
    as one line."""
    from ..models import resolve_model

    try:
        return resolve_model(name_or_path)
    except ValueError as error:
        raise CommandError(f"cannot load model {name_or_path!r}: {error}") from None


def check_model(name_or_path: str) -> str:
    """The `resolved` path of `name_or_path`; raise the `load_model` error if it has no readable model config
    (without loading any weights)."""
    from transformers import AutoConfig

    path = resolved(name_or_path)
    try:
        AutoConfig.from_pretrained(path)
    except OSError as error:
        raise _unloadable(name_or_path, error) from None
    return path


def _unloadable(name_or_path: str, error: OSError) -> CommandError:
    if Path(name_or_path).is_file():
        reason = "a file that is not a model: give a model folder, a hub id, a .gguf file or 'smollm2'"
    elif Path(name_or_path).exists():
        reason = "the folder holds no loadable model and tokenizer"
    else:
        reason = "not a local folder, and not a model id reachable from here (offline?)"
    return CommandError(f"cannot load model {name_or_path!r}: {reason} ({first_line(error)})")


def load_adapter(base: str, adapter: str, dtype="auto", verbose: bool = False):
    """A PeftModel: the adapter folder (any of this package's tuner types, or stock PEFT) on the base model, loaded
    as `load_model` does."""
    from peft import PeftModel

    check_adapter(adapter)
    model, tokenizer = load_model(base, dtype=dtype, verbose=verbose)
    return PeftModel.from_pretrained(model, adapter), tokenizer


#: The local dataset files `load_data` reads, by suffix: the `datasets` builder of each.
DATA_FILES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


#: A hub id: `name` or `org/name` (letters, digits, `-`, `_`, `.`). Anything else is a local path.
HUB_ID = re.compile(r"(\w[\w.-]*/)?\w[\w.-]*")


MODEL_KINDS = "give a model folder, a hub id, a .gguf file or 'smollm2'"


def hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None and ".." not in text


def check_dataset(dataset: str) -> None:
    """Refuse a `dataset` that names a local file or folder (a data-file suffix, or not a hub id) that is not
    there, or a file of another kind; hub names are left to `load_data`."""
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix.lower() not in DATA_FILES:
        raise CommandError(f"dataset file {dataset!r}: use a .jsonl, .json, .csv or .parquet file")
    if not path.exists() and (path.suffix.lower() in DATA_FILES or not hub_id(dataset)):
        raise CommandError(
            f"dataset {dataset!r}: no such file or folder (--dataset takes a .jsonl, .json, .csv or .parquet file, a "
            "folder saved with Dataset.save_to_disk, or a hub dataset name such as 'org/name')"
        )


def check_adapter(adapter: str) -> None:
    """Refuse an `adapter` that is not a folder holding `adapter_config.json` (saying what it is instead)."""
    path = Path(adapter).expanduser()
    if not path.exists():
        raise CommandError(
            f"adapter {adapter!r}: no such folder (give the folder an adapter was saved to with save_pretrained)"
        )
    if (path / "adapter_config.json").is_file():
        return
    if (path / "config.json").is_file():
        raise CommandError(
            f"adapter {adapter!r} is a model folder (config.json), not an adapter folder (adapter_config.json): pass "
            "it as the model (--base for export and search)"
        )
    inside = sorted(p.parent.name for p in path.glob("*/adapter_config.json")) if path.is_dir() else []
    hint = f"; it holds the adapter folders {inside}: give one of them" if inside else ""
    raise CommandError(f"adapter {adapter!r} is not an adapter folder (no adapter_config.json in it){hint}")


def check_model_path(name_or_path: str) -> None:
    """Refuse a model that names a local path which is not a model: a missing path that is not a hub id, a missing
    or non-GGUF file, a folder without config.json (an adapter folder said so). Hub ids and 'smollm2' pass."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if name_or_path.lower().endswith(".gguf"):
            raise CommandError(f"cannot load model {name_or_path!r}: GGUF file {name_or_path!r} does not exist.")
        if not hub_id(name_or_path):
            raise CommandError(
                f"cannot load model {name_or_path!r}: no such folder or file, and not a hub id ('name' or "
                f"'org/name'); {MODEL_KINDS}"
            )
        return
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CommandError(f"cannot load model {name_or_path!r}: a file that is not a model: {MODEL_KINDS}")
        return
    if (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        raise CommandError(
            f"cannot load model {name_or_path!r}: it is an adapter folder (adapter_config.json), not a model; pass "
            "it as the adapter (export/search ADAPTER, eval --adapter) and its base model as --base/MODEL"
        )
    raise CommandError(
        f"cannot load model {name_or_path!r}: the folder holds no config.json, so it is not a model folder "
        "(save_pretrained writes one)"
    )


def load_data(dataset: str, split: str = "train"):
    """A `datasets.Dataset` from a local .jsonl/.json/.csv/.parquet file, a folder saved with
    `Dataset.save_to_disk`, or a dataset on the hub (its `split`)."""
    check_dataset(dataset)
    import datasets

    path = Path(dataset).expanduser()
    try:
        if path.is_file():
            kind = DATA_FILES[path.suffix.lower()]
            data = datasets.load_dataset(kind, data_files=str(path), split="train")
        elif path.is_dir() and (path / "dataset_info.json").exists():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(dataset, split=split)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise CommandError(f"cannot load dataset {dataset!r}: {first_line(error)}") from None
    if isinstance(data, datasets.DatasetDict):
        raise CommandError(f"dataset {dataset!r} has several splits {list(data)}; give one")
    return data


def load_columns(dataset: str, columns: list[str], split: str = "train"):
    """`load_data`, checked to hold every column of `columns` (the option that names each is in the message)."""
    data = load_data(dataset, split)
    for column, option in columns:
        if column not in data.column_names:
            raise CommandError(
                f"dataset {dataset!r} has no column {column!r}; its columns: {data.column_names} (use {option})"
            )
    return data


def load_texts(dataset: str, text_column: str, split: str = "train") -> list[str]:
    """The `text_column` of `load_data(dataset, split)`."""
    return [str(text) for text in load_columns(dataset, [(text_column, "--text-column")], split)[text_column]]


def dataset_evaluator(args: argparse.Namespace, tokenizer, num_samples: int | None):
    """The evaluator of --dataset (search, eval): the loss of its --text-column texts, or with --answer-column the
    exact-match accuracy of the answers generated for its prompts; `num_samples` examples at most."""
    from ..search import ExactMatchEvaluator, LossEvaluator

    if args.answer_column is None:
        texts = load_texts(args.dataset, args.text_column, args.split)
        return LossEvaluator(texts, tokenizer, max_length=args.max_length, num_samples=num_samples)
    columns = [(args.text_column, "--text-column"), (args.answer_column, "--answer-column")]
    rows = load_columns(args.dataset, columns, args.split)
    return ExactMatchEvaluator(
        rows, tokenizer, prompt_column=args.text_column, answer_column=args.answer_column, num_samples=num_samples
    )


def output_folder(target: str, overwrite: bool):
    """`replaced_directory(target)`: written under a temporary name, renamed when complete. An existing `target` is
    refused unless `overwrite` (then replaced whole, only on success)."""
    check_output(target, overwrite)
    return replaced_directory(target)


def check_output(target: str, overwrite: bool) -> None:
    """Refuse an existing output folder `target` unless `overwrite`."""
    if Path(target).exists() and not overwrite:
        raise CommandError(f"output {target!r} exists; choose another path or pass --overwrite")


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
