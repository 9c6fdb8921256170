"""Subnetwork search strategies compared on a small trained super-network: hypervolume of random search, NSGA-II,
multi-objective TPE and hill-climbing at equal budget, the subnetwork switch time and the search overhead.

A tiny Llama gets a Mode B super-adapter (`ElasticLoraConfig`, rank choices [8, 6, 4] on the seven projections,
width and head choices [1.0, 0.75, 0.5]), trained for a few hundred steps on arithmetic word problems with one random
subnetwork per step. Each strategy then searches validation loss (`LossEvaluator`) against the deployed parameter
count, `--trials` evaluations per run, for `--seeds` seeds; the hypervolume of every run is computed against one
reference point (1.01 x the worst loss and the largest cost seen in any run). Switch time: `set_subnetwork` per
trial; overhead: the search's time outside evaluation, as a fraction of evaluation time (goals: < 1 ms, < 5 %).

    python benchmarks/search_strategies.py                       # updates benchmarks/RESULTS.md
    python benchmarks/search_strategies.py --quick --results /tmp/R.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch
from datasets import Dataset
from peft import get_peft_model
from step_time import RESULTS, TARGET_MODULES, THREADS, cpu_model, write_section
from trl import SFTConfig, SFTTrainer

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.search import LossEvaluator, run_search
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import SubnetworkSamplingCallback

STRATEGIES = ("random", "nsga2", "tpe", "hill_climb")
GOALS = {"switch_ms": 1.0, "overhead": 0.05}
FULL = {"hidden": 128, "layers": 4, "steps": 300, "trials": 40, "seeds": 3, "val": 512}
QUICK = {"hidden": 64, "layers": 2, "steps": 4, "trials": 8, "seeds": 1, "val": 8}


def markers(quick: bool) -> tuple[str, str]:
    name = "search_strategies_quick" if quick else "search_strategies"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def trained_super_network(setup: dict, tokenizer, train_texts, folder: Path):
    model = tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=setup["hidden"],
        intermediate_size=2 * setup["hidden"],
        num_hidden_layers=setup["layers"],
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    config = ElasticLoraConfig(
        r=8,
        lora_alpha=16,
        rank_choices=[8, 6, 4],
        target_modules=TARGET_MODULES,
        width_choices=[1.0, 0.75, 0.5],
        head_choices=[1.0, 0.75, 0.5],
    )
    torch.manual_seed(0)
    network = get_peft_model(model, config)
    args = SFTConfig(
        output_dir=str(folder),
        max_steps=setup["steps"],
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        max_length=64,
        disable_tqdm=True,
        logging_steps=max(1, setup["steps"] // 4),
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=network,
        args=args,
        train_dataset=Dataset.from_list([{"text": t} for t in train_texts]),
        processing_class=tokenizer,
        callbacks=[SubnetworkSamplingCallback(strategy="random", seed=0)],
    )
    trainer.train()
    return trainer.model.eval()


def hypervolumes(results, reference_point) -> dict[str, list[float]]:
    return {s: [r.hypervolume(reference_point) for r in runs] for s, runs in results.items()}


def section(quick, setup, space_size, groups, results, volumes, reference_point, seconds) -> str:
    start, end = markers(quick)
    lines = [
        "| strategy | hypervolume, mean | per seed | Pareto points (mean) | switch ms / trial |"
        " evaluation ms / trial | overhead ms / trial | overhead |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for strategy, runs in results.items():
        evaluations = sum(r.timing["evaluations"] for r in runs)
        switch_ms = 1000 * sum(r.timing["switch_seconds"] for r in runs) / max(evaluations, 1)
        evaluate = sum(r.timing["evaluate_seconds"] for r in runs)
        overhead = (sum(r.timing["total_seconds"] for r in runs) - evaluate) / evaluate
        front = statistics.mean(len(r.pareto_front()) for r in runs)
        per_seed = ", ".join(f"{v:.4g}" for v in volumes[strategy])
        evaluate_ms = 1000 * evaluate / max(evaluations, 1)
        overhead_ms = overhead * evaluate_ms
        lines.append(
            f"| {strategy} | {statistics.mean(volumes[strategy]):.4g} | {per_seed} | {front:.1f} | {switch_ms:.3f} | "
            f"{evaluate_ms:.1f} | {overhead_ms:.1f} | {overhead:.1%} |"
        )
        verdicts.append((strategy, switch_ms, overhead))
    worst_switch = max(v[1] for v in verdicts)
    worst_overhead = max(v[2] for v in verdicts)
    mean = {s: statistics.mean(v) for s, v in volumes.items()}
    ranking = " > ".join(sorted(mean, key=mean.get, reverse=True))
    switch_verdict = "meets" if worst_switch < GOALS["switch_ms"] else "misses"
    overhead_verdict = "meets" if worst_overhead < GOALS["overhead"] else "misses"
    command = " ".join(["python", "benchmarks/search_strategies.py", *sys.argv[1:]])
    return f"""{start}
## Subnetwork search strategies (`benchmarks/search_strategies.py`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command (from the repository root): `{command}`
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} ({torch.get_num_threads()}
  threads); optuna {optuna.__version__}, peft_elastic {peft_elastic.__version__}, Python {platform.python_version()}
- Super-network: `tiny_llama` (hidden {setup["hidden"]}, {setup["layers"]} layers, 8 heads over 4 KV heads),
  `ElasticLoraConfig` rank choices [8, 6, 4] on q/k/v/o/gate/up/down, width and head choices [1.0, 0.75, 0.5]:
  {groups} groups, {space_size:.3g} subnetworks; trained {setup["steps"]} steps (SFTTrainer, one random subnetwork per
  step) on arithmetic problems
- Search: validation loss (`LossEvaluator`, {setup["val"]} held-out problems) vs deployed parameters (`cost="params"`),
  {setup["trials"]} trials per run (the first three are the maximal, heuristic and minimal subnetworks), seeds
  0..{setup["seeds"] - 1}; hypervolume against the reference point (loss {reference_point[0]:.4f}, params
  {reference_point[1]:,.0f}); {seconds:.0f} s in all

{chr(10).join(lines)}

"overhead" is the search's time outside evaluation (the sampler's ask/tell, the cost model, switching) per trial and
as a fraction of evaluation time; the fraction falls as evaluation grows (an LLM evaluation takes seconds to minutes).
Mean hypervolume: {ranking}.
Subnetwork switch: at most {worst_switch:.3f} ms per trial (goal < {GOALS["switch_ms"]} ms: {switch_verdict}); search
overhead at most {worst_overhead:.1%} of evaluation time (goal < {GOALS["overhead"]:.0%}: {overhead_verdict}).
{end}
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps and trials: a smoke run")
    parser.add_argument("--results", type=Path, default=None, help="Markdown file to write the section to")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup = QUICK if args.quick else FULL
    results_file = args.results if args.results is not None or args.quick else RESULTS
    torch.set_num_threads(THREADS)
    problems = arithmetic_problems(2000 if not args.quick else 64, seed=0)
    texts = [p["prompt"] + p["completion"] for p in problems]
    tokenizer = train_tokenizer(texts, vocab_size=96)
    validation = [p["prompt"] + p["completion"] for p in arithmetic_problems(setup["val"], seed=99)]
    started = time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="search_strategies_") as tmp:
        model = trained_super_network(setup, tokenizer, texts, Path(tmp))
    torch.set_num_threads(THREADS)
    evaluator = LossEvaluator(validation, tokenizer, batch_size=16)
    space = peft_elastic.search_space(model)
    results = {
        strategy: [
            run_search(model, evaluator, strategy, "params", n_trials=setup["trials"], seed=seed, progress=False)
            for seed in range(setup["seeds"])
        ]
        for strategy in STRATEGIES
    }
    trials = [t for runs in results.values() for r in runs for t in r.complete()]
    reference_point = (1.01 * max(t["metric"] for t in trials), 1.01 * max(t["cost"] for t in trials))
    volumes = hypervolumes(results, reference_point)
    size = 1.0
    for choices in space.values():
        size *= len(choices)
    text = section(
        args.quick, setup, size, len(space), results, volumes, reference_point, time.perf_counter() - started
    )
    print(text.split("\n", 1)[1].rsplit(markers(args.quick)[1], 1)[0].strip())
    if results_file is not None:
        write_section(results_file, text, markers(args.quick))


if __name__ == "__main__":
    main()
