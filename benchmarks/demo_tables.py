"""The demo's two tables (the papers' Table 2 and Table 1, in shape) written to RESULTS.md with the command, date and
machine that produced them.

    python benchmarks/demo_tables.py                          # runs `peft-elastic demo` (full) and updates RESULTS.md
    python benchmarks/demo_tables.py --from OUT/results.json  # the section of a finished run (e.g. a --quick one)
        [--results FILE]

Running the demo here is the same as `peft-elastic demo --output DIR`: the pre-trained base comes from the cache
(built first if missing, and then its pre-training time is part of the run's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from step_time import RESULTS, cpu_model, write_section

import peft_elastic
from peft_elastic import cli
from peft_elastic.demo.lonas import CostRow
from peft_elastic.demo.sqft import Row
from peft_elastic.demo.tables import anatomy_markdown, lonas_markdown, sqft_markdown

MARKERS = ("<!-- demo_tables:start -->", "<!-- demo_tables:end -->")


def section(results: dict, command: str) -> str:
    """The section of RESULTS.md for a demo run's `results` (its results.json)."""
    settings, base = results["settings"], results["base"]["pretraining"]
    b, f, s = settings["base"], settings["finetune"], settings["search"]
    quick = " (--quick: smoke-test budgets, the accuracies mean nothing)" if b["steps"] < 100 else ""
    if results.get("base_was_cached", True):
        timing = (
            f"the run took {results['seconds']:.0f} s with the base from the cache (pre-training it takes "
            f"{base['seconds']:.0f} s once)"
        )
    else:
        timing = f"the run took {results['seconds']:.0f} s, {base['seconds']:.0f} s of which pre-trained the base"
    sqft = sqft_markdown([Row(**row) for row in results["table2"]])
    lonas = lonas_markdown([CostRow(**row) for row in results["table1"]])
    anatomy = anatomy_markdown(
        [Row(**row) for row in results["table2"]] + [CostRow(**row) for row in results["table1"]]
    )
    if anatomy:  # runs before the anatomy existed have none
        anatomy = f"\n### Where the answers go wrong (test split)\n\n{anatomy}\n"
    # runs before SearchSettings.heads existed made heads elastic
    elastic, groups = (
        ("widths and heads", " (heads in whole key/value groups)") if s.get("heads", True) else ("widths", "")
    )
    worked = " or ".join(str(k) for k in sorted(set(b.get("worked_steps", (1, 2)))))  # results of older runs: (1, 2)
    return f"""{MARKERS[0]}
## The papers' tables, in shape: the offline demo (`peft-elastic demo`){quick}

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command (from the repository root): `{command}`; {timing}
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} ({torch.get_num_threads()} threads);
  peft {peft.__version__}, transformers {transformers.__version__}, peft_elastic {peft_elastic.__version__}, Python
  {platform.python_version()}
- Base: a Llama of {base["parameters"]:,} parameters (hidden {b["hidden_size"]}, intermediate {b["intermediate_size"]},
  {b["num_hidden_layers"]} layers, {b["num_attention_heads"]} heads / {b["num_key_value_heads"]} KV heads, vocabulary
  {b["vocab_size"]}) pre-trained for {b["steps"]} steps of {b["batch_size"]} documents on arithmetic drills, stories
  and {b["worked_fraction"]:.0%} worked problems of {worked} steps
  (loss {base["first_loss"]:.2f} -> {base["final_loss"]:.2f})
- Task: GSM8K-shaped word problems (two or three steps of + and -; the answer is the worked calculation and
  "#### n"); {settings["n_train"]} train, {settings["n_validation"]} validation, {settings["n_test"]} test problems.
  Accuracy: exact match of the number after "####" in greedy answers on the test split
- Fine-tuning, every method: {f["steps"]} steps of {f["batch_size"]}, learning rate {f["learning_rate"]}, cosine,
  rank {f["r"]} (elastic: {f["r"]}/{3 * f["r"] // 4}/{f["r"] // 2}, heuristic subnetwork) on q/k/v/o/gate/up/down,
  TRL SFTTrainer (loss on the answers); random subnetwork sampling
- Mode B super-network: {s["steps"]} steps, {s["strategy"]} sampling, {elastic} [1.0, 0.75, 0.5]{groups}; NSGA-II
  search, {s["trials"]} trials on the validation split, cost MACs; latency:
  batch 8 x 64 tokens, {s["latency_rounds"]} rounds side by side (each the median of 3 passes), medians; the
  speedup's interval: paired bootstrap over the rounds

### Table 2 shape (SQFT / Shears; the papers: Mistral-7B-v0.3 on GSM8K)

{sqft}

### Table 1 shape (LoNAS, Mode B; the paper: LLaMA-7B on commonsense reasoning)

{lonas}
{anatomy}
### Against the papers' findings

{chr(10).join(results["findings"])}
{MARKERS[1]}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, help="a finished demo run's results.json (no new run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file to update")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/demo_tables.py", *(argv if argv is not None else sys.argv[1:])])
    if args.source is not None:
        results = json.loads(args.source.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="demo_tables_") as tmp:
            if cli.main(["demo", "--output", str(Path(tmp) / "out")]) != 0:
                sys.exit("the demo failed")
            results = json.loads((Path(tmp) / "out" / "results.json").read_text())
    text = section(results, command)
    write_section(args.results, text, MARKERS)
    print(f"{args.results}: section demo_tables written")


if __name__ == "__main__":
    main()
