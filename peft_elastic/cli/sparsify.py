"""`peft-elastic sparsify`: `peft_elastic.sparsify` and `save_sparsified`."""

from __future__ import annotations

import argparse

from ..choices import PRUNING_METHODS
from . import inputs
from .arguments import add_dataset, add_io, fraction
from .inputs import CommandError, check_output, load_texts


def run(args: argparse.Namespace) -> None:
    from ..sparsity import save_sparsified, sparsify
    from ..sparsity.patterns import parse_pattern

    parse_pattern(args.pattern, None if ":" in args.pattern else args.sparsity)  # before anything is loaded
    if args.method == "wanda" and args.dataset is None:
        raise CommandError(
            "--method wanda needs calibration texts: --dataset FILE_OR_NAME (or use --method magnitude)"
        )
    texts = load_texts(args.dataset, args.text_column, args.split) if args.dataset is not None else None
    check_output(args.output, args.overwrite)  # before the model is loaded
    model, tokenizer = inputs.load_model(args.model)
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
    # the library's saver: atomic, and it checks that the saved weights hold the zeros
    save_sparsified(model, args.output, report, tokenizer, overwrite=args.overwrite)
    print(
        f"{args.output}: {report.method} {report.pattern} sparsity {report.sparsity:.4f} over {len(report.modules)} "
        "linear layers (sparsity_report.json)"
    )


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "sparsify",
        help="prune a model's decoder layers (Wanda or magnitude; unstructured or N:M)",
        description="Prune the linear layers of MODEL's decoder blocks and save the sparse model to OUTPUT, with "
        "sparsity_report.json (zeros per layer).",
    )
    add_io(parser)
    parser.add_argument("--method", choices=PRUNING_METHODS, default="wanda", help="default: wanda")
    parser.add_argument("--sparsity", type=fraction, default=0.5, help="fraction of weights to zero per row")
    parser.add_argument("--pattern", default="unstructured", help='"unstructured" (default) or N:M, e.g. 2:4')
    parser.add_argument("--skip-modules", nargs="*", default=[], metavar="NAME", help="layers to keep dense")
    add_dataset(parser, "calibration texts for Wanda")
    parser.set_defaults(run=run)
