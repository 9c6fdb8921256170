"""Why the Mode B super-network's maximal subnetwork ends below LoRA in the demo (issue 17, point 2): the demo's
LoNAS pipeline with one factor changed at a time, each scored at the maximal, heuristic and minimal subnetworks on
the demo's test split (95 % bootstrap intervals over the problems), next to stock LoRA with the same budget.

    python benchmarks/mode_b_training.py                              # every variant, seed 0; updates RESULTS.md
    python benchmarks/mode_b_training.py --seeds 0 1 2 --variants lora demo "fixed maximal"
    python benchmarks/mode_b_training.py --quick --results /tmp/R.md  # smoke run of the code paths

The factors (each variant changes one thing from "demo", the demo's own LoNAS super-network):
- "fixed maximal": the same Mode B adapter and reordered base, trained only at its maximal subnetwork — LoRA through
  the Mode B machinery. Equal to LoRA within noise unless the machinery itself (slicing, reordering) costs accuracy.
- "rank only": sandwich sampling of ranks alone (Mode A): is it the widths, or the sandwich?
- "widths and heads" / "heads only": attention heads elastic too (Sukthanker et al.'s extension of LoNAS; the demo's
  super-network before 2026-12-01): what elastic heads cost.
- "no reordering": the channels in the pre-trained order (the importance ordering's share).
- "2x steps": twice the sandwich steps (is it the budget?).
- "sandwich lr/2": half the learning rate (the three summed passes per step: maximal, random, minimal).
- "random sampling": one uniformly random subnetwork per step (one pass per step, as LoRA's; no minimal subnetwork
  in every step: the sandwich's gradient conflicts, Xu et al. 2022).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from step_time import RESULTS, cpu_model, write_section

import peft_elastic
from peft_elastic import ElasticLoraConfig, reorder_by_importance, set_subnetwork
from peft_elastic.demo import FULL, QUICK, default_cache_dir
from peft_elastic.demo.base import load_base, pretrained_base
from peft_elastic.demo.finetune import TARGETS, Scoring, finetune, lora_config
from peft_elastic.demo.lonas import mode_b_choices
from peft_elastic.demo.stats import accuracy_interval, ratio_interval, verdict
from peft_elastic.demo.task import splits

MARKERS = ("<!-- mode_b_training:start -->", "<!-- mode_b_training:end -->")
SUBNETWORKS = {
    "maximal": peft_elastic.maximal_subnetwork,
    "heuristic": peft_elastic.heuristic_subnetwork,
    "minimal": peft_elastic.minimal_subnetwork,
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of training: stock LoRA (`lora`), or a Mode B super-network with these elastic dimensions."""

    name: str
    lora: bool = False
    strategy: str = "sandwich"
    widths: bool = True
    heads: bool = False
    reorder: bool = True
    step_factor: float = 1.0
    lr_factor: float = 1.0


VARIANTS = [
    Variant("lora", lora=True),
    Variant("demo"),
    Variant("fixed maximal", strategy="fixed"),
    Variant("rank only", widths=False),
    Variant("widths and heads", heads=True),
    Variant("heads only", widths=False, heads=True),
    Variant("no reordering", reorder=False),
    Variant("2x steps", step_factor=2.0),
    Variant("sandwich lr/2", lr_factor=0.5),
    Variant("random sampling", strategy="random"),
]


def train(variant: Variant, base_dir: Path, data: dict, settings, calibration: list[str], seed: int):
    """The trained PeftModel of `variant` and its wall time."""
    start = time.perf_counter()
    model, tokenizer = load_base(base_dir)
    finetune_settings = dataclasses.replace(settings.finetune, seed=seed)
    if variant.lora:
        trained = finetune(
            model, lora_config(finetune_settings), tokenizer, data["train"], finetune_settings, log=_quiet
        )
        return trained, tokenizer, time.perf_counter() - start
    choices = mode_b_choices(model.config, heads=True)
    config = ElasticLoraConfig(
        r=finetune_settings.r,
        lora_alpha=2 * finetune_settings.r,
        rank_choices=finetune_settings.rank_choices,
        target_modules=TARGETS,
        width_choices=choices["width_choices"] if variant.widths else None,
        head_choices=choices["head_choices"] if variant.heads else None,
    )
    if variant.reorder and (variant.widths or variant.heads):
        reorder_by_importance(model, calibration, tokenizer=tokenizer, max_length=128, progress=False)
    budget = dataclasses.replace(
        finetune_settings,
        steps=round(settings.search.steps * variant.step_factor),
        learning_rate=finetune_settings.learning_rate * variant.lr_factor,
    )
    trained = finetune(model, config, tokenizer, data["train"], budget, variant.strategy, log=_quiet)
    return trained, tokenizer, time.perf_counter() - start


def _quiet(*_args, **_kwargs) -> None:
    pass


def score(model, variant: Variant, scoring: Scoring) -> dict[str, list[bool]]:
    """Per-problem test hits at each subnetwork (LoRA: one row, its only network)."""
    if variant.lora:
        return {"maximal": scoring.score(model).hits}
    hits = {}
    for name, subnetwork in SUBNETWORKS.items():
        set_subnetwork(model, subnetwork(model))
        hits[name] = scoring.score(model).hits
    return hits


def measure(variants: list[Variant], seeds: list[int], settings, log=print) -> list[dict]:
    """Train and score every variant for every seed; one record per (variant, seed)."""
    data = splits(settings.n_train, settings.n_validation, settings.n_test, seed=settings.base.seed)
    held_out = {p["prompt"] for split in ("validation", "test") for p in data[split]}
    base_dir = pretrained_base(settings.base, held_out, default_cache_dir(), log)
    _, tokenizer = load_base(base_dir)
    scoring = Scoring(data, tokenizer)
    calibration = [p["prompt"] + p["completion"] for p in data["train"][: settings.calibration_samples]]
    records = []
    for seed in seeds:
        for variant in variants:
            model, _, seconds = train(variant, base_dir, data, settings, calibration, seed)
            hits = score(model.eval(), variant, scoring)
            records.append({"variant": variant.name, "seed": seed, "seconds": round(seconds, 1), "hits": hits})
            summary = ", ".join(f"{name} {sum(h) / len(h):.1%}" for name, h in hits.items())
            log(f"  seed {seed} {variant.name}: {summary} ({seconds:.0f} s)")
    return records


def table(records: list[dict]) -> str:
    """Markdown: per variant and seed, each subnetwork's test accuracy with its interval, and the maximal
    subnetwork's ratio to LoRA of the same seed with its paired interval and verdict (>= 0.95 of LoRA)."""
    lines = [
        "| variant | seed | maximal | maximal / LoRA | vs LoRA (>= 95%) | heuristic | minimal | seconds |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    lora = {r["seed"]: r["hits"]["maximal"] for r in records if r["variant"] == "lora"}

    def cell(hits):
        if hits is None:
            return "-"
        low, high = accuracy_interval(hits)
        return f"{sum(hits) / len(hits):.1%} [{low:.1%}, {high:.1%}]"

    for r in records:
        hits, reference = r["hits"], lora.get(r["seed"])
        ratio = judged = "-"
        if r["variant"] != "lora" and reference is not None and sum(reference):
            low, high = ratio_interval(hits["maximal"], reference)
            ratio = f"{sum(hits['maximal']) / sum(reference):.1%} [{low:.1%}, {high:.1%}]"
            judged = verdict(low, high, 0.95)
        lines.append(
            f"| {r['variant']} | {r['seed']} | {cell(hits['maximal'])} | {ratio} | {judged} | "
            f"{cell(hits.get('heuristic'))} | {cell(hits.get('minimal'))} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def section(records: list[dict], settings, command: str, seconds: float) -> str:
    f, s = settings.finetune, settings.search
    return f"""{MARKERS[0]}
## Mode B super-network training: what costs the maximal subnetwork (`benchmarks/mode_b_training.py`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}; the run took {seconds:.0f} s
- Command (from the repository root): `{command}`
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} ({torch.get_num_threads()} threads);
  peft {peft.__version__}, transformers {transformers.__version__}, peft_elastic {peft_elastic.__version__}, Python
  {platform.python_version()}
- The demo's base, task and splits ({settings.n_test} test problems); LoRA: {f.steps} steps of {f.batch_size} at
  learning rate {f.learning_rate:g}; Mode B (rank {f.rank_choices}, the demo's widths; heads where the variant
  says): {s.steps} steps of {f.batch_size} unless the variant says otherwise. Accuracy with 95 % bootstrap
  intervals over the test problems; "vs LoRA" judges the maximal subnetwork's paired ratio to the LoRA of the same
  seed against 95 %.

{table(records)}
{MARKERS[1]}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (default 0)")
    names = [v.name for v in VARIANTS]
    parser.add_argument("--variants", nargs="+", choices=names, default=names, metavar="NAME", help=f"of {names}")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick budgets (a smoke run)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="the results file (default benchmarks/RESULTS.md)"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    variants = [v for v in VARIANTS if v.name in args.variants]
    if not any(v.lora for v in variants):
        variants.insert(0, VARIANTS[0])  # the reference of every ratio
    start = time.perf_counter()
    records = measure(variants, args.seeds, settings)
    command = shlex.join(["python", "benchmarks/mode_b_training.py", *sys.argv[1:]])
    text = section(records, settings, command, time.perf_counter() - start)
    print("\n" + table(records))
    write_section(args.results, text, MARKERS)
    print(f"\nWrote the section to {args.results}")


if __name__ == "__main__":
    main()
