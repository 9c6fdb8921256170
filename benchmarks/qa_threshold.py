"""QA-SparsePEFT's threshold: how many INT4 codes an adapter changes, and whether the loss falls, against the
learning rate and the number of steps — on SmolLM2-135M-Instruct (50% Wanda, GPTQ INT4) and on the demo's toy base.

    python benchmarks/qa_threshold.py                       # SmolLM2 and the toy; updates RESULTS.md
    python benchmarks/qa_threshold.py --model toy --lrs 1e-3 4e-3 --steps 10
    python benchmarks/qa_threshold.py --quick --model FOLDER --results /tmp/R.md    # smoke run

A code moves only when `|ΔW / S| ≥ ½` (half a quantization step of its group), so an adapter whose update stays
below that is rounded away: the QA forward, and the merge, are the base. For each learning rate the same QA-SparsePEFT
adapter (rank 8, alpha 16, q/k/v/o/gate/up/down, AdamW, cosine with warm-up) is trained with TRL's SFTTrainer on the
demo's word problems; at a few steps the script records the fraction of codes the merge would write
(`codes_changed`), and at the end the loss of 24 validation problems; each learning rate starts from the same INT4
base and seed. `--work` keeps the INT4 bases and each run's figures, so that a later invocation (other learning rates,
`--skip`) reuses them. The figures go to RESULTS.md and docs/quantization.md quotes them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from step_time import RESULTS, cpu_model, write_section
from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from peft_elastic import SparsePEFTConfig, quantize_gptq, resolve_model, save_sparsified, sparsify
from peft_elastic.demo import FULL, REAL, default_cache_dir
from peft_elastic.demo.base import load_base, pretrained_base
from peft_elastic.demo.finetune import TARGETS
from peft_elastic.demo.sqft import load_gptq
from peft_elastic.demo.task import splits
from peft_elastic.search.evaluators import LossEvaluator
from peft_elastic.text import pydoc_texts
from peft_elastic.tuners.sparse_peft.monitor import codes_changed

MARKERS = ("<!-- qa_threshold:start -->", "<!-- qa_threshold:end -->")


class Recorder(TrainerCallback):
    """Codes changed at the chosen optimizer steps, and the validation loss at the last of them."""

    def __init__(self, model, at: set[int], evaluate) -> None:
        self.model, self.at, self.evaluate, self.points = model, at, evaluate, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at:
            changes = codes_changed(self.model)
            loss = self.evaluate(self.model) if state.global_step == max(self.at) else None
            self.points.append((state.global_step, changes.fraction, changes.changed, loss))
            print(f"  step {state.global_step}: {changes}, validation loss {loss}", flush=True)
            self.model.train()


def int4_base(model: str, work: Path, log=print) -> tuple[Path, int, list[dict]]:
    """(the sparse INT4 checkpoint, its group size, the task's data) of `model` ("toy": the demo's pre-trained base),
    built once under `work`."""
    settings = FULL if model == "toy" else REAL
    data = splits(settings.n_train, settings.n_validation, settings.n_test, seed=0)
    if model == "toy":  # the base the demo pre-trains (and caches), with the demo's held-out problems
        held_out = {p["prompt"] for split in ("validation", "test") for p in data[split]}
        folder, group_size = pretrained_base(FULL.base, held_out, default_cache_dir(), log), 32
        calibration = [p["prompt"] + p["completion"] for p in data["train"][:128]]
    else:
        folder, group_size = Path(resolve_model(model, default_cache_dir())), 64
        calibration = pydoc_texts("calibration")[:32]
    name = Path(str(folder)).name
    int4 = work / f"{name}-sparse-int4-g{group_size}"
    if not (int4 / "config.json").is_file():
        base, tokenizer = load_base(folder)
        report = sparsify(base, calibration, "wanda", 0.5, tokenizer=tokenizer, max_length=128, progress=False)
        save_sparsified(base, work / f"{name}-sparse", report, tokenizer, overwrite=True)  # a half-built run
        options = {"bits": 4, "group_size": group_size, "tokenizer": tokenizer, "max_length": 128}
        quantize_gptq(work / f"{name}-sparse", int4, calibration, overwrite=True, **options)
    return int4, group_size, data


def train_one(int4: Path, data: dict, lr: float, steps: int, batch: int, at: set[int], evaluate) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(int4)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = SparsePEFTConfig(r=8, lora_alpha=16, target_modules=TARGETS, quantization_aware=True)
    torch.manual_seed(0)
    model = get_peft_model(load_gptq(int4), config)
    recorder = Recorder(model, at, evaluate)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, steps // 20),
            weight_decay=0.0,
            max_length=128,
            seed=0,
            use_cpu=True,
            bf16=False,  # TRL's default turns bf16 autocast on, also on CPUs (slow without bfloat16 units)
            gradient_checkpointing=False,  # as the demo trains (SFTConfig's default recomputes every forward)
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(data["train"]), processing_class=tokenizer
        )
        trainer.add_callback(recorder)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "lr": lr,
        "points": recorder.points,
        "first": losses[0],
        "last": sum(losses[-5:]) / len(losses[-5:]),
        "seconds": time.perf_counter() - start,
    }


def table(name: str, group_size: int, untuned: float, runs: list[dict], steps: int, batch: int) -> str:
    at = [step for step, *_ in runs[0]["points"]]
    head = " | ".join(f"codes changed @ {s}" for s in at)
    lines = [
        f"**{name}** (50% Wanda, GPTQ INT4 groups of {group_size}; {steps} steps of {batch}; validation loss of the "
        f"untuned INT4 base {untuned:.3f})",
        "",
        f"| learning rate | {head} | validation loss @ {at[-1]} | training loss (first -> mean of last 5) | s |",
        "|---:|" + "---:|" * len(at) + "---:|---|---:|",
    ]
    for run in runs:
        cells = " | ".join(f"{fraction:.4%}" for _, fraction, _, _ in run["points"])
        lines.append(
            f"| {run['lr']:g} | {cells} | {run['points'][-1][3]:.3f} | {run['first']:.3f} -> {run['last']:.3f} | "
            f"{run['seconds']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["smollm2", "toy"], help="models (default: smollm2 toy)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 2e-3, 4e-3], help="learning rates")
    parser.add_argument(
        "--skip", nargs="*", default=[], metavar="MODEL:LR", help="pairs not to run, e.g. smollm2:0.0003 (time)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 learning rate: a smoke run")
    parser.add_argument("--work", type=Path, help="where the INT4 bases go (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    steps, lrs = (2, args.lrs[:1]) if args.quick else (args.steps, args.lrs)
    at = {1, steps} if args.quick else {steps // 3, 2 * steps // 3, steps}
    work = args.work or Path(tempfile.mkdtemp(prefix="peft_elastic_qa_threshold_"))
    start = time.perf_counter()
    parts = []
    for model in args.model:
        int4, group_size, data = int4_base(model, work)
        tokenizer = AutoTokenizer.from_pretrained(int4)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        texts = [p["prompt"] + p["completion"] for p in data["validation"][:24]]
        evaluate = LossEvaluator(texts, tokenizer, max_length=128, num_samples=4 if args.quick else 24)
        untuned_record = work / f"untuned-{Path(str(int4)).name}-{len(evaluate.batches)}.json"
        if untuned_record.is_file():
            untuned = json.loads(untuned_record.read_text())
        else:
            untuned = evaluate(load_gptq(int4))
            untuned_record.write_text(json.dumps(untuned) + "\n")
        runs = []
        for lr in lrs:
            if f"{model}:{lr:g}" in args.skip:
                continue
            record = work / f"run-{Path(str(int4)).name}-lr{lr:g}-{steps}x{args.batch_size}.json"
            if record.is_file():  # measured by an earlier invocation with the same --work
                runs.append(json.loads(record.read_text()))
            else:
                runs.append(train_one(int4, data, lr, steps, args.batch_size, at, evaluate))
                record.write_text(json.dumps(runs[-1]) + "\n")
            print(f"{model} lr {lr:g}: {runs[-1]['points']}", flush=True)
        name = "SmolLM2-135M-Instruct" if model == "smollm2" else ("the demo's toy base" if model == "toy" else model)
        parts.append(table(name, group_size, untuned, runs, steps, args.batch_size))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n\n".join(parts)
    text = f"""{MARKERS[0]}
## QA-SparsePEFT's threshold: codes changed vs learning rate (`benchmarks/qa_threshold.py`)

- Date: {date}; command: `{shlex.join(["python", "benchmarks/qa_threshold.py", *sys.argv[1:]])}`;
  {time.perf_counter() - start:.0f} s; {cpu_model()}; torch {torch.__version__}
- QA-SparsePEFT rank 8, alpha 16 on q/k/v/o/gate/up/down, TRL SFTTrainer (completion loss), AdamW, cosine with
  warm-up, seed 0; "codes changed": the fraction of the INT4 weights of the adapted layers that the merge would
  write differently (`peft_elastic.tuners.sparse_peft.monitor.codes_changed`); validation loss: the mean token loss of
  24 validation problems (prompt and answer)

{body}
{MARKERS[1]}
"""
    print("\n" + body)
    write_section(args.results, text, MARKERS)


if __name__ == "__main__":
    main()
