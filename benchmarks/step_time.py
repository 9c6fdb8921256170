"""Training-step time of ElasticLoRA against stock PEFT LoRA of the same rank, on CPU.

Four variants train the same tiny Llama (same base weights, same adapter initialisation) on the same random batch:
stock LoRA of rank r, and ElasticLoRA at its maximal, heuristic and minimal subnetworks. A step is forward (causal LM
loss), backward, AdamW step and zero_grad. The variants are timed side by side in one process and interleaved: each
round runs a few steps of every variant, in an order rotated from round to round, after warm-up steps that are
discarded. The report gives the median step time of each variant, its spread (quartiles) and the ratios to LoRA.

    python benchmarks/step_time.py                                  # full run, updates benchmarks/RESULTS.md
    python benchmarks/step_time.py --quick --results /tmp/RESULTS.md  # tiny smoke run (< 20 s)

The script replaces only its own section of RESULTS.md (between the markers below) and writes the file atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
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
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_elastic
from peft_elastic import (
    ElasticLoraConfig,
    heuristic_subnetwork,
    maximal_subnetwork,
    minimal_subnetwork,
    num_adapter_parameters,
    set_subnetwork,
)
from peft_elastic.search.latency import quartiles
from peft_elastic.toy import tiny_llama

THREADS = 2
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
START, END = "<!-- step_time:start -->", "<!-- step_time:end -->"
GOAL = 1.05  # elastic (max rank) / LoRA


@dataclasses.dataclass
class Setup:
    """Model, adapter, batch and timing sizes of one run."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    batch_size: int
    seq_len: int
    r: int
    rank_choices: tuple[int, ...]
    rounds: int
    steps: int  # timed steps per variant per round
    warmup: int  # discarded steps per variant, before the first round


FULL = Setup(
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    batch_size=4,
    seq_len=64,
    r=32,
    rank_choices=(32, 24, 16),
    rounds=60,
    steps=1,
    warmup=3,
)
QUICK = Setup(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    batch_size=2,
    seq_len=32,
    r=8,
    rank_choices=(8, 6, 4),
    rounds=4,
    steps=2,
    warmup=1,
)


@dataclasses.dataclass
class Variant:
    """One model under test with its optimizer and the step times measured so far (seconds)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rank: str
    adapter_params: int
    times: list[float]


# -----------------------------------------------------------------------------
# models


def base_model(setup: Setup) -> nn.Module:
    """A fresh tiny Llama; every call returns the same weights."""
    return tiny_llama(
        vocab_size=setup.vocab_size,
        hidden_size=setup.hidden_size,
        intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_hidden_layers,
        num_attention_heads=setup.num_attention_heads,
        num_key_value_heads=setup.num_key_value_heads,
        seed=0,
    )


def adapted(setup: Setup, config: LoraConfig, seed: int = 1) -> nn.Module:
    """The base model with the adapter `config`, initialised from `seed` (same init for LoRA and ElasticLoRA)."""
    torch.manual_seed(seed)
    model = get_peft_model(base_model(setup), config)
    model.train()
    return model


def make_variant(name: str, model: nn.Module, rank: str) -> Variant:
    """Wrap `model` with an AdamW over its trainable (adapter) parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if isinstance(model.peft_config["default"], ElasticLoraConfig):
        n_params = num_adapter_parameters(model)
    else:
        n_params = sum(p.numel() for p in params)
    return Variant(name, model, optimizer, rank, n_params, [])


def make_variants(setup: Setup) -> list[Variant]:
    """Stock LoRA of rank r, and ElasticLoRA at its maximal, heuristic and minimal subnetworks."""
    lora_kwargs = dict(r=setup.r, lora_alpha=2 * setup.r, target_modules=TARGET_MODULES)
    variants = [make_variant("lora", adapted(setup, LoraConfig(**lora_kwargs)), str(setup.r))]
    pick = {
        "elastic max": maximal_subnetwork,
        "elastic heuristic": heuristic_subnetwork,
        "elastic min": minimal_subnetwork,
    }
    for name, subnetwork in pick.items():
        model = adapted(setup, ElasticLoraConfig(rank_choices=list(setup.rank_choices), **lora_kwargs))
        ranks = subnetwork(model)
        set_subnetwork(model, ranks)
        variants.append(make_variant(name, model, "/".join(str(k) for k in sorted(set(ranks.values()), reverse=True))))
    check_same_weights(variants[0].model, variants[1].model)
    return variants


def check_same_weights(lora: nn.Module, elastic: nn.Module) -> None:
    """Assert that both models hold the same parameters (base and adapter), so they do the same work."""
    elastic_params = dict(elastic.named_parameters())
    for name, param in lora.named_parameters():
        if not torch.equal(param, elastic_params[name]):
            raise RuntimeError(f"LoRA and ElasticLoRA differ at {name}; the comparison would not be like for like.")


# -----------------------------------------------------------------------------
# timing


def train_step(variant: Variant, input_ids: torch.Tensor) -> float:
    """One training step (forward, backward, optimizer step, zero_grad); returns its wall time in seconds."""
    start = time.perf_counter()
    loss = variant.model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(variants: list[Variant], setup: Setup, input_ids: torch.Tensor) -> list[list[float]]:
    """Warm up, then time `setup.rounds` rounds of `setup.steps` steps per variant, rotating the order each round.

    Returns the per-round median step time of each variant, `[round][variant]`, for paired ratios."""
    for _ in range(setup.warmup):
        for variant in variants:
            train_step(variant, input_ids)
    gc.collect()
    per_round = []
    for i in range(setup.rounds):
        medians = [0.0] * len(variants)
        for j in range(len(variants)):
            v = (i + j) % len(variants)
            times = [train_step(variants[v], input_ids) for _ in range(setup.steps)]
            variants[v].times.extend(times)
            medians[v] = statistics.median(times)
        per_round.append(medians)
    return per_round


# -----------------------------------------------------------------------------
# statistics and report


def summarize(variants: list[Variant], per_round: list[list[float]]) -> list[dict]:
    """One row per variant: step-time quartiles (ms), ratio of medians to LoRA, quartiles of the per-round ratio."""
    lora_median = statistics.median(variants[0].times)
    rows = []
    for v, variant in enumerate(variants):
        q1, med, q3 = quartiles(variant.times)
        r1, rmed, r3 = quartiles([r[v] / r[0] for r in per_round])
        rows.append(
            dict(
                variant=variant.name,
                rank=variant.rank,
                params=variant.adapter_params,
                steps=len(variant.times),
                best=1e3 * min(variant.times),
                median=1e3 * med,
                q1=1e3 * q1,
                q3=1e3 * q3,
                iqr_pct=100 * (q3 - q1) / med,
                ratio=med / lora_median,
                best_ratio=min(variant.times) / min(variants[0].times),
                paired=(r1, rmed, r3),
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| variant | rank | adapter params | steps | min ms | median ms | IQR ms (q1-q3) | IQR % | ratio vs LoRA "
        "(medians) | ratio vs LoRA (minima) | per-round ratio median [q1, q3] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        r1, rmed, r3 = r["paired"]
        lines.append(
            f"| {r['variant']} | {r['rank']} | {r['params']:,} | {r['steps']} | {r['best']:.1f} | {r['median']:.1f} "
            f"| {r['q1']:.1f}-{r['q3']:.1f} | {r['iqr_pct']:.1f} | {r['ratio']:.3f} | {r['best_ratio']:.3f} "
            f"| {rmed:.3f} [{r1:.3f}, {r3:.3f}] |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command() -> str:
    """The command line that reproduces this run, from the repository root."""
    return shlex.join(["python", "benchmarks/step_time.py", *sys.argv[1:]])


def section(setup: Setup, rows: list[dict], seconds: float) -> str:
    """This benchmark's section of RESULTS.md, markers included."""
    elastic, elastic_best = rows[1]["ratio"], rows[1]["best_ratio"]
    verdict = "meets" if max(elastic, elastic_best) <= GOAL else "misses"
    s = setup
    return f"""{START}
## Training-step time: ElasticLoRA vs LoRA (`benchmarks/step_time.py`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command (from the repository root): `{command()}`
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} with {torch.get_num_threads()}
  threads; peft {peft.__version__}, transformers {transformers.__version__}, peft_elastic {peft_elastic.__version__},
  Python {platform.python_version()}
- Model: Llama (`peft_elastic.toy.tiny_llama`), hidden {s.hidden_size}, intermediate {s.intermediate_size},
  {s.num_hidden_layers} layers, {s.num_attention_heads} heads ({s.num_key_value_heads} KV heads), vocab {s.vocab_size},
  float32
- Adapters: r={s.r}, lora_alpha={2 * s.r}, rank_choices={list(s.rank_choices)}, target_modules q/k/v/o/gate/up/down;
  all variants start from the same base and adapter weights
- Step: forward with causal LM loss on random token ids (batch {s.batch_size} x {s.seq_len} tokens), backward,
  AdamW step on the adapter parameters, zero_grad
- Timing: one process; {s.warmup} warm-up step(s) per variant, discarded; then {s.rounds} rounds, each running
  {s.steps} step(s) of every variant, in an order rotated from round to round; {seconds:.0f} s in all

{table(rows)}

"ratio vs LoRA (medians)" is the ratio of medians over all timed steps; "(minima)" the ratio of the fastest steps,
which noise from other processes can only lengthen; "per-round ratio" pairs each variant's median with LoRA's in the
same round, which cancels slow drifts of the machine's load. Elastic (max rank) / LoRA = {elastic:.3f} (medians),
{elastic_best:.3f} (minima): {verdict} the goal of <= {GOAL}.
{END}
"""


def write_section(path: Path, text: str, markers: tuple[str, str] = (START, END)) -> None:
    """Replace the section between `markers` of `path` (or append it, or create the file), atomically."""
    first, last = markers
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = old.find(first), old.find(last)
    if (start < 0) != (end < 0) or end < start:
        raise RuntimeError(f"{path} has a broken {first} ... {last} section; fix it by hand first.")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        new = old[:start] + text.rstrip("\n") + old[end + len(last) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few rounds: a smoke run of < 20 s")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"Markdown file whose step_time section to write (default: {RESULTS.name} next to this script; "
        "with --quick, nothing is written unless this is given)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 60, or 4 with --quick)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant per round (default: 1, or 2 with --quick)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="discarded steps per variant (default: 3, or 1 with --quick)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {key: getattr(args, key) for key in ("rounds", "steps", "warmup") if getattr(args, key) is not None}
    setup = dataclasses.replace(QUICK if args.quick else FULL, **overrides)
    if setup.rounds < 1 or setup.steps < 1 or setup.warmup < 0:
        raise SystemExit("--rounds and --steps must be >= 1, --warmup >= 0")
    results = args.results if args.results is not None or args.quick else RESULTS

    torch.set_num_threads(THREADS)
    variants = make_variants(setup)
    torch.set_num_threads(THREADS)  # building PEFT models may import libraries that touch threading
    input_ids = torch.randint(
        0, setup.vocab_size, (setup.batch_size, setup.seq_len), generator=torch.Generator().manual_seed(0)
    )

    print(f"timing {len(variants)} variants: {setup.rounds} rounds x {setup.steps} steps each ...", flush=True)
    start = time.perf_counter()
    per_round = run(variants, setup, input_ids)
    rows = summarize(variants, per_round)
    text = section(setup, rows, time.perf_counter() - start)
    print(text.split("\n", 1)[1].rsplit(END, 1)[0].strip())
    if results is not None:
        write_section(results, text)
        print(f"\nwrote the step_time section of {results}")


if __name__ == "__main__":
    main()
