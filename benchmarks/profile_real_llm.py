"""Where the time goes on a real LLM (SmolLM2-135M-Instruct by default): the Mode B sandwich step against LoRA, pass by
pass, with the operators that take the time; the importance ordering against a plain forward over the same
calibration texts; one search evaluation (validation exact match) of a subnetwork on the super-network against the
same subnetwork exported as a smaller model.

    python benchmarks/profile_real_llm.py                    # SmolLM2; updates RESULTS.md
    python benchmarks/profile_real_llm.py --model FOLDER --results /tmp/R.md --rounds 1   # another model / smoke

Every comparison is timed side by side in one process, interleaved, and reported as the median of `--rounds`
rounds with the spread (min, max) of the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from real_llm import Method
from step_time import RESULTS, cpu_model, write_section
from transformers import AutoTokenizer

import peft_elastic
from peft_elastic import ElasticLoraConfig, export_compressed_model, load_compressed_model, reorder_by_importance
from peft_elastic.calibration import calibration_batches
from peft_elastic.demo import REAL, default_cache_dir
from peft_elastic.demo.base import load_base
from peft_elastic.demo.finetune import TARGETS, accuracy_of, lora_config
from peft_elastic.demo.lonas import mode_b_choices
from peft_elastic.demo.task import splits
from peft_elastic.text import pydoc_texts

MARKERS = ("<!-- profile_real_llm:start -->", "<!-- profile_real_llm:end -->")
BATCH, TOKENS = 4, 128


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(functions: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds of each function per round, one warm-up call each, the order rotated from round to round."""
    names = list(functions)
    for name in names:
        functions[name]()
    times = {name: [] for name in names}
    for i in range(rounds):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(timed(functions[name]))
    return times


def ratio_cell(times: dict[str, list[float]], name: str, reference: str) -> str:
    ratios = [a / b for a, b in zip(times[name], times[reference], strict=True)]
    median = statistics.median(times[name])
    return f"{median:.2f} | {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]"


def top_ops(function, count: int = 8) -> str:
    """The operators of one call of `function` with the most self CPU time, as a Markdown table."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        function()
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operator | calls | self CPU ms | share |", "|---|---:|---:|---:|"]
    for event in events[:count]:
        share = event.self_cpu_time_total / total
        lines.append(f"| `{event.key}` | {event.count} | {event.self_cpu_time_total / 1000:.0f} | {share:.0%} |")
    return "\n".join(lines)


def step(model, batch, subnetworks=None):
    """One optimizer step of `model` on `batch` as `real_llm.py` times it (a pass per subnetwork, then AdamW)."""
    method = Method("", model, subnetworks)
    return lambda: method.step(batch)


def training_section(base_dir: Path, batch: dict, rounds: int) -> str:
    torch.manual_seed(0)
    lora = get_peft_model(load_base(base_dir)[0], lora_config(REAL.finetune)).train()
    base = load_base(base_dir)[0]
    choices = mode_b_choices(base.config, heads=True)
    config = ElasticLoraConfig(r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=TARGETS, **choices)
    mode_b = get_peft_model(base, config).train()
    maximal, minimal = peft_elastic.maximal_subnetwork(mode_b), peft_elastic.minimal_subnetwork(mode_b)
    middle = peft_elastic.heuristic_subnetwork(mode_b)
    functions = {
        "LoRA step": step(lora, batch),
        "Mode B pass at the maximal subnetwork": step(mode_b, batch, [maximal]),
        "Mode B pass at the heuristic subnetwork": step(mode_b, batch, [middle]),
        "Mode B pass at the minimal subnetwork": step(mode_b, batch, [minimal]),
        "Mode B sandwich step (max, 2 random, min)": step(
            mode_b,
            batch,
            [maximal, peft_elastic.sample_subnetwork(mode_b, seed=1), peft_elastic.sample_subnetwork(mode_b, seed=2),
             minimal],
        ),
    }  # fmt: skip
    times = interleaved(functions, rounds)
    rows = [f"| {name} | {ratio_cell(times, name, 'LoRA step')} |" for name in functions]
    table = "\n".join(["| step | median s | / LoRA step [min, max] |", "|---|---:|---|", *rows])
    lora_ops = top_ops(functions["LoRA step"])
    mode_b_ops = top_ops(functions["Mode B pass at the maximal subnetwork"])
    return (
        f"Choices: widths {choices['width_choices']}, heads {choices['head_choices']}, ranks 8/6/4 on "
        f"q/k/v/o/gate/up/down; batch {BATCH} x {TOKENS} tokens of pydoc text; AdamW.\n\n{table}\n\n"
        f"Operators of one LoRA step:\n\n{lora_ops}\n\nOperators of one Mode B pass at the maximal subnetwork:\n\n"
        f"{mode_b_ops}"
    )


def qa_section(int4: Path, batch: dict, rounds: int) -> str:
    """A QA-SparsePEFT step against LoRA and an FP SparsePEFT-on-INT4 (SQFT) step, all on the same GPTQ base
    (`gptq_torch`, float32)."""
    from peft import LoraConfig

    from peft_elastic import SparsePEFTConfig
    from peft_elastic.demo.sqft import load_gptq

    torch.manual_seed(0)
    models = {
        "LoRA step (INT4 base)": get_peft_model(
            load_gptq(int4), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
        ),
        "SQFT step (SparsePEFT FP adapter, INT4 base)": get_peft_model(
            load_gptq(int4), SparsePEFTConfig(r=8, lora_alpha=16, target_modules=TARGETS)
        ),
        "QA-SparsePEFT step (INT4 base)": get_peft_model(
            load_gptq(int4), SparsePEFTConfig(r=8, lora_alpha=16, target_modules=TARGETS, quantization_aware=True)
        ),
    }
    functions = {name: step(model, batch) for name, model in models.items()}
    times = interleaved(functions, rounds)
    rows = [f"| {name} | {ratio_cell(times, name, 'LoRA step (INT4 base)')} |" for name in functions]
    table = "\n".join(["| step | median s | / LoRA step [min, max] |", "|---|---:|---|", *rows])
    ops = top_ops(functions["QA-SparsePEFT step (INT4 base)"], count=10)
    return f"{table}\n\nOperators of one QA-SparsePEFT step:\n\n{ops}"


def ordering_section(base_dir: Path, tokenizer, rounds: int) -> str:
    texts = pydoc_texts("calibration")[: REAL.calibration_samples]
    batches = calibration_batches(texts, tokenizer, max_length=128, num_samples=len(texts))
    model = load_base(base_dir)[0]

    def forward():
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    def ordering():
        reorder_by_importance(model, texts, tokenizer=tokenizer, max_length=128, progress=False)

    times = interleaved({"forward": forward, "reorder_by_importance": ordering}, rounds)
    rows = [
        f"| plain forward over the texts | {ratio_cell(times, 'forward', 'forward')} |",
        f"| reorder_by_importance (activation) | {ratio_cell(times, 'reorder_by_importance', 'forward')} |",
    ]
    head = f"{len(texts)} calibration texts of at most 128 tokens, one at a time."
    return "\n".join([head, "", "| | median s | / forward [min, max] |", "|---|---:|---|", *rows])


def search_section(base_dir: Path, tokenizer, rounds: int, n_validation: int) -> str:
    data = splits(REAL.n_train, REAL.n_validation, REAL.n_test, seed=0)
    evaluate = accuracy_of(data["validation"][:n_validation], tokenizer)
    base = load_base(base_dir)[0]
    config = ElasticLoraConfig(
        r=8, lora_alpha=16, rank_choices=[8, 6, 4], target_modules=TARGETS, **mode_b_choices(base.config, heads=True)
    )
    supernet = get_peft_model(base, config).eval()
    subnetwork = peft_elastic.heuristic_subnetwork(supernet)
    with tempfile.TemporaryDirectory() as scratch:
        folder = export_compressed_model(supernet, Path(scratch) / "small", subnetwork, tokenizer=tokenizer)
        small = load_compressed_model(folder, dtype=torch.float32).eval()
    plain = load_base(base_dir)[0]

    def on_supernet():
        peft_elastic.set_subnetwork(supernet, subnetwork)
        evaluate(supernet)

    functions = {"base model (full size)": lambda: evaluate(plain), "heuristic subnetwork on the super-network":
                 on_supernet, "heuristic subnetwork exported (smaller model)": lambda: evaluate(small)}  # fmt: skip
    times = interleaved(functions, rounds)
    rows = [f"| {name} | {ratio_cell(times, name, 'base model (full size)')} |" for name in functions]
    return (
        f"One search evaluation: greedy answers (at most 32 new tokens, batches of 64) to {n_validation} validation "
        "problems.\n\n| evaluation | median s | / base model [min, max] |\n|---|---:|---|\n" + "\n".join(rows)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a hub id, a folder, a .gguf file or smollm2 (default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-validation", type=int, default=REAL.n_validation)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--int4", type=Path, help="a sparse GPTQ INT4 checkpoint of the model: also profile QA steps")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    base_dir = Path(peft_elastic.resolve_model(args.model, default_cache_dir()))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = pydoc_texts("train")[:BATCH]
    batch = dict(tokenizer(texts, return_tensors="pt", truncation=True, max_length=TOKENS, padding="max_length"))
    parts = [
        ("Training steps", training_section(base_dir, batch, args.rounds)),
        *([("QA-SparsePEFT on INT4", qa_section(args.int4, batch, args.rounds))] if args.int4 else []),
        ("Importance ordering", ordering_section(base_dir, tokenizer, args.rounds)),
        ("Search evaluation", search_section(base_dir, tokenizer, args.rounds, args.n_validation)),
    ]
    body = "\n\n".join(f"### {title}\n\n{text}" for title, text in parts)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"""{MARKERS[0]}
## Where the time goes on a real LLM (`benchmarks/profile_real_llm.py`)

- Date: {date}; command: `{shlex.join(["python", "benchmarks/profile_real_llm.py", *sys.argv[1:]])}`;
  {time.perf_counter() - start:.0f} s; model {args.model}; {cpu_model()}; torch {torch.__version__}
  ({torch.get_num_threads()} threads); {args.rounds} interleaved rounds after one warm-up call each

{body}
{MARKERS[1]}
"""
    print(body)
    write_section(args.results, text, MARKERS)


if __name__ == "__main__":
    main()
