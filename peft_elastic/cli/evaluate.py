"""`peft-elastic eval`: a loss, exact-match or lm-evaluation-harness evaluator on a model or a subnetwork."""

from __future__ import annotations

import argparse
import json

from . import inputs
from .arguments import add_bf16, add_dataset, add_verbose, positive_int
from .inputs import CommandError, compute_dtype, dataset_evaluator
from .subnetworks import choose_subnetwork, subnetwork_summary


def run(args: argparse.Namespace) -> None:
    from ..search import LMEvalEvaluator

    if (args.dataset is None) == (args.tasks is None):
        raise CommandError("give either --dataset (loss or exact match) or --tasks (lm-evaluation-harness), not both")
    if args.adapter is not None:
        model, tokenizer = inputs.load_adapter(args.model, args.adapter, compute_dtype(args), args.verbose)
        subnetwork = choose_subnetwork(model, args.subnetwork)
    elif args.subnetwork != "active":
        raise CommandError(f"--subnetwork {args.subnetwork}: only with --adapter")
    else:
        (model, tokenizer), subnetwork = inputs.load_model(args.model, compute_dtype(args), args.verbose), None
    if args.tasks is not None:
        evaluate = LMEvalEvaluator(
            args.tasks.split(","), tokenizer, metric=args.metric, include_path=args.include_path, limit=args.limit
        )
        name = f"{args.metric} ({args.tasks})"
    else:
        evaluate = dataset_evaluator(args, tokenizer, args.limit)
        name = "loss" if args.answer_column is None else "exact-match accuracy"
    value = evaluate(model)
    print(json.dumps({
        "metric": name, "value": value, "model": args.model, "adapter": args.adapter,
        "subnetwork": None if subnetwork is None else args.subnetwork,
        "subnetwork_summary": None if subnetwork is None else subnetwork_summary(subnetwork),
    }))  # fmt: skip


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "eval",
        help="evaluate a model (or an adapter's subnetwork): loss, exact match, or lm-evaluation-harness tasks",
        description="Evaluate MODEL, or ADAPTER on it at --subnetwork, and print one JSON line {metric, value, ..., "
        "subnetwork, subnetwork_summary}: "
        "the loss of --dataset's texts, the exact-match accuracy of answers generated for its prompts "
        "(--answer-column), or --tasks of lm-evaluation-harness (the eval extra) run in memory.",
    )
    parser.add_argument(
        "model", help="a model id on the hub, a local folder (save_pretrained), a .gguf file or 'smollm2'"
    )
    parser.add_argument("--adapter", help="an adapter folder to evaluate on MODEL")
    parser.add_argument("--subnetwork", default="active", help="with --adapter: as for 'export' (default: active)")
    add_dataset(parser, "the evaluation data", split="test", text_help="texts (loss) or prompts (exact match)",
                 num_samples=None)  # fmt: skip
    parser.add_argument("--answer-column", help="reference answers: exact-match accuracy instead of the loss")
    parser.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (instead of --dataset)")
    parser.add_argument("--include-path", help="a folder of your own lm-evaluation-harness task YAMLs")
    parser.add_argument("--metric", default="acc", help="the lm-evaluation-harness metric (default: acc)")
    parser.add_argument("--limit", type=positive_int, help="evaluate at most this many examples (per task)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_bf16(parser, "evaluate")
    add_verbose(parser)
    parser.set_defaults(run=run)
