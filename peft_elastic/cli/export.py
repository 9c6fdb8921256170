"""`peft-elastic export`: `export_sub_adapter`, `export_merged_model`, `export_compressed_model`."""

from __future__ import annotations

import argparse
import json

from . import inputs
from .arguments import add_adapter_io, add_verbose, positive_int
from .inputs import CommandError, output_folder
from .subnetworks import (
    SUBNETWORK_FILE,
    SUBNETWORKS,
    choose_subnetwork,
    subnetwork_label,
    subnetwork_summary,
    subnetwork_table,
)

EXPORTS = ("sub-adapter", "merged", "compressed")


def run(args: argparse.Namespace) -> None:
    from ..compressed import export_compressed_model
    from ..export import export_sub_adapter
    from ..merged import export_merged_model
    from ..subnetwork import search_space

    if args.uniform_rank is not False and args.kind != "sub-adapter":
        raise CommandError(f"--uniform-rank writes a LoRA adapter's ranks; it does not apply to --as {args.kind}")
    model, tokenizer = inputs.load_adapter(args.base, args.adapter, verbose=args.verbose)
    subnetwork = choose_subnetwork(model, args.subnetwork)
    if subnetwork is None and args.kind != "merged":
        raise CommandError(f"--as {args.kind} needs an elastic adapter (ElasticLoraConfig or NLSConfig)")
    space = None if subnetwork is None else search_space(model)  # before a merge unloads the adapter
    with output_folder(args.output, args.overwrite) as folder:
        if args.kind == "sub-adapter":
            export_sub_adapter(model, folder, subnetwork, uniform_rank=args.uniform_rank)
        elif args.kind == "compressed":
            export_compressed_model(model, folder, subnetwork, tokenizer=tokenizer)
        else:  # at the subnetwork choose_subnetwork activated; a GPTQ base's mask file goes with it
            export_merged_model(model, folder, tokenizer=tokenizer)
        if subnetwork is not None:
            (folder / SUBNETWORK_FILE).write_text(json.dumps(subnetwork, indent=1) + "\n")
    what = {"sub-adapter": "a stock LoRA adapter", "merged": "the merged model", "compressed": "the compressed model"}
    if subnetwork is None:
        print(f"{args.output}: {what[args.kind]}")
        return
    print(f"{args.output}: {what[args.kind]} ({SUBNETWORK_FILE})")
    print(f"{subnetwork_label(args.subnetwork)}: {subnetwork_summary(subnetwork)}")
    print("\n".join(subnetwork_table(subnetwork, space)))


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="export a subnetwork: a stock LoRA adapter, a merged model, or a compressed (Mode B) model",
        description="Export ADAPTER (saved with save_pretrained, on BASE) to OUTPUT: 'sub-adapter' writes the "
        "subnetwork as a stock LoRA adapter that plain PEFT loads; 'merged' merges the adapter into the base (a "
        "sparse base stays sparse with SparsePEFT, a GPTQ base stays INT4 with QA-SparsePEFT); 'compressed' writes "
        "the physically smaller model of a Mode B subnetwork. The subnetwork is written to OUTPUT/subnetwork.json "
        "and summarized on stdout.",
    )
    add_adapter_io(parser, "the adapter folder (save_pretrained)")
    parser.add_argument("--as", dest="kind", choices=EXPORTS, default="sub-adapter", help="default: sub-adapter")
    parser.add_argument(
        "--subnetwork",
        default="active",
        help=f"one of {', '.join(SUBNETWORKS)} (default: active, as saved) or a JSON file {{group: choice}}, e.g. "
        "an entry of a search's Pareto front",
    )
    parser.add_argument(
        "--uniform-rank",
        nargs="?",
        const=True,
        default=False,
        type=positive_int,
        metavar="R",
        help="sub-adapter: write every module at one rank, zero-padded (R, default the subnetwork's largest), for "
        "servers that want uniform ranks; the outputs are the same",
    )
    add_verbose(parser)
    parser.set_defaults(run=run)
