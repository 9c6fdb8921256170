"""`peft-elastic demo`: the offline demo (`peft_elastic.demo.run`)."""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from . import inputs
from .inputs import output_folder
from .quiet import quiet_libraries


def run(args: argparse.Namespace) -> None:
    from ..demo import FULL, QUICK, REAL, REAL_QUICK, default_cache_dir
    from ..demo import run as run_demo

    if args.model is None:
        settings = QUICK if args.quick else FULL
    else:
        inputs.resolved(args.model)  # a missing package or file: one line before any work
        settings = REAL_QUICK if args.quick else REAL
    cache_dir = args.cache_dir or default_cache_dir()
    if not args.verbose:
        quiet_libraries()
    with warnings.catch_warnings():  # deprecation notices of the libraries, not the user's to act on
        warnings.simplefilter("ignore", FutureWarning)
        if args.output is None:
            folder = Path(tempfile.mkdtemp(prefix="peft_elastic_demo_"))
            run_demo(settings, folder, cache_dir, model=args.model)
        else:
            with output_folder(args.output, args.overwrite) as staging:
                run_demo(settings, staging, cache_dir, model=args.model)
            folder = Path(args.output)
    print(f"Models, adapters and the tables (tables.md, results.json) are in {folder}")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="the offline demo: the papers' two tables, in shape, on a small model pre-trained here",
        description="Pre-train (once; cached) a small Llama on synthetic arithmetic, then reproduce the shape of the "
        "papers' tables on GSM8K-like word problems: Table 2 (50% Wanda sparsity: LoRA, Shears, SQFT + SparsePEFT, "
        "SQFT on INT4, SQFT + QA-SparsePEFT) and Table 1 (Mode B / LoNAS against LoRA: accuracy, parameters, MACs, "
        "CPU speedup). About 8 minutes on 2 CPU cores (about 4 once the base is cached); nothing is downloaded.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run (its accuracies mean nothing)")
    parser.add_argument(
        "--model",
        help="run the pipelines on this pretrained model instead (a hub id, a folder, a .gguf file or 'smollm2'; "
        "real-text calibration and perplexity; 50 minutes on 2 CPU cores for SmolLM2-135M)",
    )
    parser.add_argument("--output", help="keep the models, adapters and tables here (default: a new temporary folder)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists (once the run succeeds)"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' banners, logs and warnings (gptqmodel, transformers)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="where the pre-trained base is cached (default: $PEFT_ELASTIC_CACHE, else ~/.cache/peft_elastic)",
    )
    parser.set_defaults(run=run, quiet=True)  # the demo prints its own progress, one line per step
