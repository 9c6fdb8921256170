"""`peft-elastic quantize`: `peft_elastic.quantize_gptq`."""

from __future__ import annotations

import argparse

from ..choices import GPTQ_BITS
from . import inputs
from .arguments import add_dataset, add_io
from .inputs import CommandError, load_texts, output_folder


def run(args: argparse.Namespace) -> None:
    from ..quantization import quantize_gptq

    if args.dataset is None:
        raise CommandError("GPTQ needs calibration texts: --dataset FILE_OR_NAME")
    texts = load_texts(args.dataset, args.text_column, args.split)
    model = inputs.check_model(args.model)  # a clear error for an unreachable id before gptqmodel tries it
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


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "quantize",
        help="GPTQ-quantize a (sparse) model to INT2/4/8, keeping every zero (gptqmodel)",
        description="Quantize MODEL with GPTQ (gptqmodel) into OUTPUT: a checkpoint transformers loads, with "
        "sparsity_mask.safetensors (the pruned positions, for SparsePEFT) and quantization_report.json. Pruned "
        "weights stay exactly zero.",
    )
    add_io(parser)
    parser.add_argument("--bits", type=int, choices=GPTQ_BITS, default=4, help="default: 4")
    parser.add_argument("--group-size", type=int, default=128, help="-1 (one group per row) or a power of two")
    parser.add_argument("--sym", action="store_true", help="symmetric quantization (default: asymmetric)")
    parser.add_argument("--desc-act", action="store_true", help="act-order (permutes g_idx)")
    parser.add_argument("--damp-percent", type=float, default=0.05, help="GPTQ dampening (default 0.05)")
    parser.add_argument("--verbose", action="store_true", help="show gptqmodel's banner, logs and progress bars")
    add_dataset(parser, "calibration texts (required)")
    parser.set_defaults(run=run)
