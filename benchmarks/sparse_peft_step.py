"""SparsePEFT training-step time and memory against stock LoRA and against the reference formulation, on CPU.

Three variants train the same 50 %-sparse tiny Llama (magnitude pruning) with the same adapter weights:

- `lora`: stock PEFT LoRA (its merge would destroy the sparsity);
- `sparse_peft`: `SparsePEFTConfig`, the masked update folded into the base matmul by a custom autograd function;
- `reference`: the same adapter computed as the reference code does, `x Wᵀ + x ((B A) s ⊙ M)ᵀ` with autograd and the
  mask rebuilt from `W` at every forward.

Two model shapes: `tiny` (`step_time`'s Llama, hidden 512, 4 blocks) and `1b-block`, two decoder blocks of the
shape of TinyLlama-1.1B (hidden 2048, intermediate 5632, 32 heads, 4 KV heads) with a 4096-token vocabulary, so
that the adapted matmuls take the share of a step that they take in a real LLM (in the tiny model, attention, norms,
the optimizer and the unadapted layers are a larger part of the step, and dilute every ratio towards 1).

Step times are measured side by side in one process, interleaved (see `step_time.py`). Memory is measured twice:
the bytes autograd saves for backward in one step (excluding the parameters), in this process; and the peak
resident memory of a training step, each variant in a fresh process (Linux `VmHWM`, reset before the steps).

    python benchmarks/sparse_peft_step.py                       # full run, updates benchmarks/RESULTS.md
    python benchmarks/sparse_peft_step.py --model 1b-block      # LLM-shaped blocks (about 10 minutes)
    python benchmarks/sparse_peft_step.py --quick --results /tmp/R.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from step_time import (
    FULL,
    QUICK,
    RESULTS,
    THREADS,
    Setup,
    Variant,
    base_model,
    cpu_model,
    run,
    summarize,
    table,
    write_section,
)

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.tuners.sparse_peft import is_sparse_peft_layer

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SPARSITY = 0.5
MAX_SEQ_LEN = 256  # max_position_embeddings of peft_elastic.toy.tiny_llama
SEQ_LEN = 256  # 4 x 256 = 1024 tokens per step: with fewer tokens the rank-k products weigh more (k / tokens)


# Model shapes (the adapters are r=32 on q/k/v/up/down in both; batch 4).
MODELS = {
    "tiny": FULL,
    "1b-block": dataclasses.replace(
        FULL,
        vocab_size=4096,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
}
ROUNDS = {"tiny": 30, "1b-block": 12}


def markers(model: str, seq_len: int) -> tuple[str, str]:
    """This run's section markers in RESULTS.md: one section per model shape and sequence length."""
    name = f"sparse_peft_step_{model}_seq{seq_len}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


GOALS = {"sparse_peft / lora": 1.5, "sparse_peft / reference": 0.7, "peak memory sparse_peft / lora": 1.3}
VARIANTS = ("lora", "sparse_peft", "reference")


def sparse_base(setup: Setup):
    """`step_time`'s tiny Llama, magnitude-pruned to `SPARSITY` in every row."""
    model = base_model(setup)
    peft_elastic.sparsify(model, None, "magnitude", SPARSITY, progress=False)
    return model


def reference_forward(self, x, *args, **kwargs):
    """The reference formulation: dense `B A`, mask rebuilt from the base weight, autograd through both."""
    base = self.get_base_layer()
    weight_a, weight_b = self.active_factors("default")
    mask = base.weight != 0
    return F.linear(x, base.weight, base.bias) + F.linear(x, (weight_b @ weight_a) * self.scaling["default"] * mask)


def build(name: str, setup: Setup):
    """The model of variant `name`, with the same base and adapter weights as the others."""
    torch.manual_seed(1)
    kwargs = dict(r=setup.r, lora_alpha=2 * setup.r, target_modules=TARGETS)
    if name == "lora":
        model = get_peft_model(sparse_base(setup), LoraConfig(**kwargs))
    else:
        model = get_peft_model(sparse_base(setup), SparsePEFTConfig(**kwargs))
        if name == "reference":
            for module in model.modules():
                if is_sparse_peft_layer(module):
                    module.forward = types.MethodType(reference_forward, module)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:  # B = 0 would make the adapters trivial
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    model.train()
    return model


def make_variant(name: str, setup: Setup) -> Variant:
    model = build(name, setup)
    params = [p for p in model.parameters() if p.requires_grad]
    return Variant(name, model, torch.optim.AdamW(params, lr=1e-4), str(setup.r), sum(p.numel() for p in params), [])


def batch(setup: Setup) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, setup.vocab_size, (setup.batch_size, setup.seq_len), generator=generator)


def saved_bytes(model, input_ids) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one step, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def check_same_outputs(variants: list[Variant], input_ids) -> float:
    """The three variants compute the same loss: SparsePEFT and the reference exactly, LoRA differs (no mask)."""
    with torch.no_grad():
        losses = {v.name: v.model(input_ids=input_ids, labels=input_ids).loss.item() for v in variants}
    if abs(losses["sparse_peft"] - losses["reference"]) > 1e-4:
        raise RuntimeError(f"SparsePEFT and the reference formulation disagree: {losses}")
    return losses["sparse_peft"]


# ------------------------------------------------------------------------------------------------ peak memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def child(name: str, setup: Setup) -> None:
    """In a fresh process: build variant `name`, warm up, reset the peak RSS, train 3 steps, print the figures."""
    torch.set_num_threads(THREADS)
    # Stock LoRA's layer dispatch imports gptqmodel when it is installed; import it in every child so that the
    # resident memory of the variants differs by their training step only.
    if importlib.util.find_spec("gptqmodel") is not None:
        importlib.import_module("gptqmodel")
    variant = make_variant(name, setup)
    input_ids = batch(setup)
    run([variant], dataclasses.replace(setup, rounds=1, steps=1, warmup=1), input_ids)
    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(3):
        loss = variant.model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"rss_before_mib": before / 1024, "peak_mib": _rss_kib("VmHWM") / 1024}))


def peak_memory(name: str, setup: Setup, model: str, quick: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", name, "--seq-len", str(setup.seq_len), "--model", model]
    command += ["--quick"] if quick else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child for {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- report


def section(model: str, setup: Setup, rows, memory, saved, seconds: float, loss: float) -> str:
    start_marker, end_marker = markers(model, setup.seq_len)
    by_name = {row["variant"]: row for row in rows}
    ratios = {
        "sparse_peft / lora": by_name["sparse_peft"]["ratio"],
        "sparse_peft / reference": by_name["sparse_peft"]["median"] / by_name["reference"]["median"],
        "peak memory sparse_peft / lora": memory["sparse_peft"]["peak_mib"] / memory["lora"]["peak_mib"],
    }
    verdicts = "; ".join(
        f"{key} = {value:.3f} ({'meets' if value <= GOALS[key] else 'misses'} <= {GOALS[key]})"
        for key, value in ratios.items()
    )
    memory_rows = "\n".join(
        f"| {name} | {saved[name] / 2**20:.1f} | {memory[name]['rss_before_mib']:.0f} "
        f"| {memory[name]['peak_mib']:.0f} | {memory[name]['peak_mib'] - memory[name]['rss_before_mib']:.0f} "
        f"| {memory[name]['peak_mib'] / memory['lora']['peak_mib']:.3f} |"
        for name in VARIANTS
    )
    s = setup
    return f"""{start_marker}
## SparsePEFT training step, {model} model, {s.batch_size} x {s.seq_len} tokens (`benchmarks/sparse_peft_step.py`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command (from the repository root): `{shlex.join(["python", "benchmarks/sparse_peft_step.py", *sys.argv[1:]])}`
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} ({THREADS} threads); peft
  {peft.__version__}, transformers {transformers.__version__}, peft_elastic {peft_elastic.__version__}, Python
  {platform.python_version()}
- Model: Llama (`tiny_llama`), hidden {s.hidden_size}, intermediate {s.intermediate_size}, {s.num_hidden_layers}
  layers, {s.num_attention_heads} heads ({s.num_key_value_heads} KV heads), vocab {s.vocab_size}, float32,
  {SPARSITY:.0%} magnitude-sparse; adapters r={s.r} on q/k/v/up/down, same
  weights in all variants (SparsePEFT and reference loss {loss:.5f}, equal)
- Step: forward + causal LM loss (batch {s.batch_size} x {s.seq_len}), backward, AdamW, zero_grad; interleaved,
  {s.warmup} warm-up step(s), {s.rounds} rounds x {s.steps} step(s) per variant; {seconds:.0f} s

{table(rows)}

| variant | saved for backward (MiB) | RSS before (MiB) | peak RSS in steps (MiB) | peak - before | peak vs LoRA |
|---|---:|---:|---:|---:|---:|
{memory_rows}

{verdicts}.
{end_marker}
"""


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options this benchmark shares with the others built on its model shapes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny model and few rounds: a smoke run")
    parser.add_argument("--results", type=Path, default=None, help="Markdown file to write the section to")
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default: {SEQ_LEN}; batch 4)")
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="tiny", help="model shape (default: tiny; ignored with --quick)"
    )
    return parser


def resolved_shape(args: argparse.Namespace) -> tuple[str, int]:
    """The model shape ("quick" with --quick) and the checked sequence length of parsed `base_parser` options."""
    seq_len = args.seq_len if args.seq_len is not None else (QUICK.seq_len if args.quick else SEQ_LEN)
    if not 2 <= seq_len <= MAX_SEQ_LEN:
        raise SystemExit(f"--seq-len must be in [2, {MAX_SEQ_LEN}] (the toy models' positions), got {seq_len}")
    return ("quick" if args.quick else args.model), seq_len


def parse_args(argv=None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, seq_len = resolved_shape(args)
    setup = dataclasses.replace(
        QUICK if args.quick else MODELS[model], rounds=4 if args.quick else ROUNDS[model], steps=1, seq_len=seq_len
    )
    if args.child:
        child(args.child, setup)
        return
    results = args.results if args.results is not None or args.quick else RESULTS
    torch.set_num_threads(THREADS)
    variants = [make_variant(name, setup) for name in VARIANTS]
    torch.set_num_threads(THREADS)
    input_ids = batch(setup)
    loss = check_same_outputs(variants, input_ids)
    saved = {v.name: saved_bytes(v.model, input_ids) for v in variants}
    print(f"timing {len(variants)} variants: {setup.rounds} rounds ...", flush=True)
    start = time.perf_counter()
    rows = summarize(variants, run(variants, setup, input_ids))
    seconds = time.perf_counter() - start
    del variants
    gc.collect()
    memory = {name: peak_memory(name, setup, args.model, args.quick) for name in VARIANTS}
    text = section(model, setup, rows, memory, saved, seconds, loss)
    print(text.split("\n", 1)[1].rsplit(markers(model, setup.seq_len)[1], 1)[0].strip())
    if results is not None:
        write_section(results, text, markers(model, setup.seq_len))
        print(f"\nwrote the sparse_peft_step section of {results}")


if __name__ == "__main__":
    main()
