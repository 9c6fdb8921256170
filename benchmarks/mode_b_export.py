"""Mode B (LoNAS table 1 in shape): parameters, MACs and CPU latency of the exported maximal, heuristic and minimal
subnetworks of an elastic super-network, against the base model.

A Llama of the chosen shape gets an `ElasticLoraConfig` with elastic MLP widths and attention heads
(`width_choices=[1.0, 0.75, 0.5]`, `head_choices=[1.0, 0.75, 0.5]`, rank choices [8, 6, 4] on the seven
projections, random B so that every merge changes the weights). Each subnetwork is written with
`export_compressed_model`, loaded back with `load_compressed_model` (a standard checkpoint when transformers' config
accepts its sizes), checked against the subnetwork inside the super-network, then timed: one forward pass (prefill)
of batch 1 over `--seq-len` tokens, all models side by side in one process, interleaved round by round in a rotating
order. The goal (issue 6) is a latency speedup of at least 0.9 x (1 / the parameter ratio of the decoder layers).

    python benchmarks/mode_b_export.py                    # two TinyLlama-1.1B-shaped blocks; updates RESULTS.md
    python benchmarks/mode_b_export.py --model tiny
    python benchmarks/mode_b_export.py --quick --results /tmp/R.md
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import get_peft_model
from sparse_peft_step import MODELS, base_parser, resolved_shape
from step_time import QUICK, RESULTS, TARGET_MODULES, THREADS, base_model, cpu_model, write_section

import peft_elastic
from peft_elastic import ElasticLoraConfig

GOAL = 0.9  # speedup >= GOAL / (decoder parameter ratio)
WIDTHS = [1.0, 0.75, 0.5]
HEADS = {"quick": [1.0, 0.5]}  # the quick model has 4 heads in pairs: 0.75 would round to 4
ROUNDS = {"quick": 3, "tiny": 60, "1b-block": 40}
SUBNETWORKS = ("maximal", "heuristic", "minimal")


def markers(model: str, seq_len: int) -> tuple[str, str]:
    name = f"mode_b_export_{model}_seq{seq_len}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def super_network(setup, model: str):
    torch.manual_seed(1)
    config = ElasticLoraConfig(
        r=8,
        lora_alpha=16,
        rank_choices=[8, 6, 4],
        target_modules=TARGET_MODULES,
        width_choices=WIDTHS,
        head_choices=HEADS.get(model, WIDTHS),
    )
    network = get_peft_model(base_model(setup), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return network.eval()


def decoder_parameters(model) -> int:
    """Parameters of the decoder blocks (`model.model.layers`): what Mode B slices."""
    return sum(p.numel() for p in model.model.layers.parameters())


def export_all(network, folder: Path, input_ids) -> tuple[dict, float]:
    """`{name: (subnetwork, loaded exported model)}` and the largest |logits| difference to the super-network."""
    exported, worst = {}, 0.0
    for name in SUBNETWORKS:
        subnetwork = getattr(peft_elastic, f"{name}_subnetwork")(network)
        peft_elastic.set_subnetwork(network, subnetwork)
        peft_elastic.export_compressed_model(network, folder / name)
        small = peft_elastic.load_compressed_model(folder / name).eval()
        with torch.no_grad():
            worst = max(worst, float((small(input_ids).logits - network(input_ids).logits).abs().max()))
        exported[name] = (subnetwork, small)
    peft_elastic.set_subnetwork(network, peft_elastic.maximal_subnetwork(network))
    return exported, worst


def time_interleaved(models: dict, input_ids, rounds: int) -> dict[str, list[float]]:
    """Seconds of one forward pass of each model, `rounds` times, in an order rotated from round to round."""
    names = list(models)
    for model in models.values():
        peft_elastic.measure_latency(model, input_ids, warmup=2, repeats=1)
    times = {name: [] for name in names}
    with torch.no_grad():
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                models[name](input_ids)
                times[name].append(time.perf_counter() - start)
    return times


def rows_of(setup, base, exported, times, seq_len) -> list[dict]:
    base_decoder = decoder_parameters(base)
    base_median = statistics.median(times["base"])
    rows = []
    for name in ("base", *SUBNETWORKS):
        model = base if name == "base" else exported[name][1]
        block = model.model.layers[0]
        attention = block.self_attn
        q_heads, kv_heads = (
            attention.get_submodule(n).out_features // attention.head_dim for n in ("q_proj", "k_proj")
        )
        ratio = decoder_parameters(model) / base_decoder
        speedup = base_median / statistics.median(times[name])
        rows.append(
            {
                "name": name,
                "mlp": block.mlp.up_proj.out_features,
                "heads": f"{q_heads}/{kv_heads}",
                "params": peft_elastic.count_parameters(model),
                "decoder": decoder_parameters(model),
                "ratio": ratio,
                "macs": peft_elastic.count_macs(model, seq_len=seq_len),
                "median_ms": 1000 * statistics.median(times[name]),
                "min_ms": 1000 * min(times[name]),
                "speedup": speedup,
                "target": GOAL / ratio,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | MLP width (layer 0) | heads q/kv (layer 0) | params | decoder params | decoder ratio |"
        " MACs / sequence | median ms | min ms | speedup vs base | goal (0.9 / ratio) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['mlp']} | {r['heads']} | {r['params']:,} | {r['decoder']:,} | {r['ratio']:.3f} | "
            f"{r['macs'] / 1e9:.2f} G | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup']:.2f} | "
            f"{r['target']:.2f} |"
        )
    return "\n".join(lines)


def section(model: str, setup, rows, worst: float, cost_checks: bool, rounds: int, seq_len: int, seconds: float):
    start, end = markers(model, seq_len)
    s = setup
    verdicts = []
    for r in rows[1:]:
        verdict = "meets" if r["speedup"] >= r["target"] else "misses"
        verdicts.append(f"{r['name']}: speedup {r['speedup']:.2f} vs goal {r['target']:.2f} ({verdict})")
    command = " ".join(["python", "benchmarks/mode_b_export.py", *sys.argv[1:]])
    return f"""{start}
## Mode B: exported subnetworks vs the base, {model} model, batch 1 x {seq_len} tokens (`benchmarks/mode_b_export.py`)

- Date: {datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
- Command (from the repository root): `{command}`
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} ({torch.get_num_threads()}
  threads); peft {peft.__version__}, transformers {transformers.__version__}, peft_elastic {peft_elastic.__version__},
  Python {platform.python_version()}
- Model: Llama (`tiny_llama`), hidden {s.hidden_size}, intermediate {s.intermediate_size}, {s.num_hidden_layers}
  layers, {s.num_attention_heads} heads ({s.num_key_value_heads} KV heads), vocab {s.vocab_size}, float32
- Super-network: `ElasticLoraConfig(width_choices={WIDTHS}, head_choices={HEADS.get(model, WIDTHS)}, r=8,
  rank_choices=[8, 6, 4])` on q/k/v/o/gate/up/down; each subnetwork exported with `export_compressed_model` and loaded
  with `load_compressed_model`; max |logits(exported) - logits(subnetwork in the super-network)| =
  {worst:.2e}; the cost model's parameter count equals the exported model's: {"yes" if cost_checks else "NO"}
- Timing: forward (prefill) of batch 1 x {seq_len} random tokens, no grad; 2 warm-up calls per model, then {rounds}
  rounds of one call per model in a rotating order; {seconds:.0f} s in all

{table(rows)}

"decoder ratio" is the parameters of the decoder blocks (what Mode B slices) relative to the base; the goal is a
speedup (ratio of median times) of at least 0.9 / that ratio. {"; ".join(verdicts)}.
{end}
"""


def parse_args(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.set_defaults(model="1b-block")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 40 for 1b-block, 60 tiny)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 128
    model, seq_len = resolved_shape(args)
    rounds = args.rounds if args.rounds is not None else ROUNDS[model]
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")
    setup = QUICK if args.quick else MODELS[model]
    results = args.results if args.results is not None or args.quick else RESULTS
    torch.set_num_threads(THREADS)
    input_ids = torch.randint(3, setup.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    network = super_network(setup, model)
    base = base_model(setup).eval()
    with tempfile.TemporaryDirectory(prefix="mode_b_export_") as tmp:
        exported, worst = export_all(network, Path(tmp), input_ids)
        cost_checks = all(
            peft_elastic.count_parameters(network, subnetwork) == peft_elastic.count_parameters(small)
            for subnetwork, small in exported.values()
        )
        models = {"base": base} | {name: small for name, (_, small) in exported.items()}
        del network
        print(f"timing {len(models)} models: {rounds} rounds ...", flush=True)
        start = time.perf_counter()
        times = time_interleaved(models, input_ids, rounds)
        seconds = time.perf_counter() - start
        rows = rows_of(setup, base, exported, times, seq_len)
    text = section(model, setup, rows, worst, cost_checks, rounds, seq_len, seconds)
    print(text.split("\n", 1)[1].rsplit(markers(model, seq_len)[1], 1)[0].strip())
    if results is not None:
        write_section(results, text, markers(model, seq_len))


if __name__ == "__main__":
    main()
