"""argparse types and the argument groups several commands share (model/output, adapter/base, dataset)."""

from __future__ import annotations

import argparse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def ints(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def names(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of names")
    return names


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the folder to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (once the run succeeds)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_io(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a model id on the hub, a local folder (save_pretrained), a .gguf file or 'smollm2'"
    )
    add_output(parser)


def add_adapter_io(parser: argparse.ArgumentParser, adapter_help: str) -> None:
    parser.add_argument("adapter", help=adapter_help)
    add_output(parser)
    parser.add_argument(
        "--base", required=True, help="the base model: a model id, a local folder, a .gguf file or 'smollm2'"
    )


def add_bf16(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--bf16", action="store_true", help=f"load the model in bfloat16 and {what} (default: "
                        "float32, whatever dtype the checkpoint was saved in)")  # fmt: skip


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="GPTQ models: show gptqmodel's banner and logs")


def add_dataset(
    parser: argparse.ArgumentParser,
    help_text: str,
    *,
    required: bool = False,
    split: str = "train",
    text_help: str = "the column holding the texts",
    num_samples: int | None = 128,
) -> None:
    """--dataset, --text-column, --split, --max-length and (unless `num_samples` is None) --num-samples."""
    parser.add_argument("--dataset", required=required, help=f"{help_text}: a .jsonl/.json/.csv/.parquet file, a "
                        "saved dataset or a hub dataset name")  # fmt: skip
    parser.add_argument("--text-column", default="text", help=f"{text_help} (default: text)")
    parser.add_argument("--split", default=split, help=f"the split of a hub dataset (default: {split})")
    parser.add_argument("--max-length", type=positive_int, default=512, help="truncate texts to this many tokens")
    if num_samples is not None:
        help_samples = f"examples used (default {num_samples})"
        parser.add_argument("--num-samples", type=positive_int, default=num_samples, help=help_samples)
