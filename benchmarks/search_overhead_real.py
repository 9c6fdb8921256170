"""The search's own time on a real LLM (SmolLM2-135M-Instruct, 30 layers, by default): what `run_search` spends outside
the evaluations — the sampler, the subnetwork switches and the cost — per trial and as a fraction of the evaluation
time, for NSGA-II and TPE with the analytic MACs cost and with the measured latency cost (`RelativeLatency`).

    python benchmarks/search_overhead_real.py                          # SmolLM2; updates RESULTS.md
    python benchmarks/search_overhead_real.py --model FOLDER --trials 4 --results /tmp/R.md   # smoke run

The super-network is a Mode B adapter on the model (ranks 8/6/4 on the seven projections, widths and heads 1.0 /
0.75 / 0.5); its training does not change what the search costs, so it is not trained. The evaluator is the loss of
8 held-out pydoc texts of 64 tokens (about a second here): a real search's evaluation (accuracy of generated answers)
takes 10-20 times longer, so the fractions below are upper bounds for it.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from step_time import RESULTS, cpu_model, write_section
from transformers import AutoTokenizer

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.demo import default_cache_dir
from peft_elastic.demo.base import load_base
from peft_elastic.demo.finetune import TARGETS
from peft_elastic.demo.lonas import mode_b_choices
from peft_elastic.search import LossEvaluator, run_search
from peft_elastic.text import pydoc_texts

MARKERS = ("<!-- search_overhead_real:start -->", "<!-- search_overhead_real:end -->")
RUNS = [("nsga2", "macs"), ("tpe", "macs"), ("nsga2", "latency")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a hub id, a folder, a .gguf file or smollm2 (default)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folder = Path(peft_elastic.resolve_model(args.model, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = load_base(folder)[0]
    config = ElasticLoraConfig(
        r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=TARGETS, **mode_b_choices(base.config, heads=True)
    )
    torch.manual_seed(0)
    model = get_peft_model(base, config).eval()
    groups = len(peft_elastic.search_space(model))
    evaluate = LossEvaluator(pydoc_texts("heldout"), tokenizer, max_length=64, num_samples=8, batch_size=8)
    rows = []
    for strategy, cost in RUNS:
        result = run_search(model, evaluate, strategy, cost, n_trials=args.trials, seq_len=64, progress=False)
        timing = result.timing
        evaluations = timing["evaluations"]
        own = timing["total_seconds"] - timing["evaluate_seconds"]
        rows.append(
            f"| {strategy} | {cost} | {evaluations} | {timing['evaluate_seconds'] / evaluations:.2f} | "
            f"{1000 * timing['switch_seconds'] / evaluations:.1f} | "
            f"{1000 * timing['cost_seconds'] / evaluations:.1f} | "
            f"{1000 * own / evaluations:.0f} | {timing['overhead_fraction']:.1%} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| strategy | cost | trials | evaluation s / trial | switch ms / trial | cost ms / trial | "
            "search's own ms / trial | own time / evaluation time |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    config_of = base.config
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""{MARKERS[0]}
## Search overhead on a real LLM (`benchmarks/search_overhead_real.py`)

- Date: {date}; command: `{shlex.join(["python", "benchmarks/search_overhead_real.py", *sys.argv[1:]])}`;
  {time.perf_counter() - start:.0f} s; {cpu_model()}; torch {torch.__version__} ({torch.get_num_threads()} threads)
- Model: {args.model} ({config_of.num_hidden_layers} layers, hidden {config_of.hidden_size}); Mode B super-network
  with {groups} elastic groups (ranks 8/6/4, widths and heads 1.0/0.75/0.5), not trained; evaluator: the loss of 8
  held-out pydoc texts of 64 tokens; "search's own": total time minus evaluation time (sampler, switches, cost)

{table}
{MARKERS[1]}
"""
    print("\n" + table)
    write_section(args.results, text, MARKERS)


if __name__ == "__main__":
    main()
