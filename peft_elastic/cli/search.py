"""`peft-elastic search`: `peft_elastic.search.run_search`."""

from __future__ import annotations

import argparse
import json

from ..choices import SEARCH_COSTS, SEARCH_STRATEGIES
from . import inputs
from .arguments import add_adapter_io, add_bf16, add_dataset, add_verbose, fraction, positive_int
from .inputs import CommandError, compute_dtype, dataset_evaluator, output_folder
from .subnetworks import choose_subnetwork


def run(args: argparse.Namespace) -> None:
    from ..search import run_search

    model, tokenizer = inputs.load_adapter(args.base, args.adapter, compute_dtype(args), args.verbose)
    if choose_subnetwork(model, "active") is None:
        raise CommandError("search needs an elastic adapter (ElasticLoraConfig or NLSConfig)")
    evaluate = dataset_evaluator(args, tokenizer, args.num_samples)
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


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "search",
        help="search a trained super-adapter for Pareto-optimal subnetworks (validation metric vs cost)",
        description="Search the subnetworks of ADAPTER (on BASE) for the best trade-offs between a validation metric "
        "(the loss of --dataset's texts, or with --answer-column the exact-match accuracy of generated answers) and "
        "a cost. Writes result.json (every trial), pareto_front.json, best.json (the cheapest subnetwork within "
        "--max-metric-drop of the maximal one: pass it to 'export --subnetwork') and search.png to OUTPUT.",
    )
    add_adapter_io(parser, "the adapter folder (an elastic adapter saved with save_pretrained)")
    add_dataset(parser, "the validation data (never the test split)", required=True, split="validation",
                 text_help="texts (loss) or prompts (exact match)", num_samples=256)  # fmt: skip
    parser.add_argument("--answer-column", help="reference answers: score exact-match accuracy instead of the loss")
    parser.add_argument("--strategy", choices=SEARCH_STRATEGIES, default="nsga2", help="default: nsga2")
    parser.add_argument(
        "--cost", choices=SEARCH_COSTS, default="params", help="default: params (of the deployed model)"
    )
    parser.add_argument("--n-trials", type=positive_int, default=100, help="default: 100")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--max-metric-drop", type=fraction, default=0.01, help="for best.json (default 0.01)")
    parser.add_argument("--storage", help="an optuna storage URL to resume from (default: OUTPUT/search.db)")
    add_bf16(parser, "evaluate")
    add_verbose(parser)
    parser.set_defaults(run=run)
