"""Memory per rank under FSDP2 (issue 18, point 5): decoder blocks of TinyLlama-1.1B's shape (hidden 2048, MLP 5632,
32 heads over 4 key/value heads, vocabulary 32000) with NLS adapters (r=16, ranks [16, 12, 8] on q/k/v/up/down),
trained one AdamW step, as one process (no sharding) and sharded by `peft_elastic.fsdp.shard_model` over 2 and more
gloo ranks on CPU. The model is built on the meta device and each rank materialises only its shards (`to_empty`), as
a base too large for one device must be; every rank reports the bytes it holds of the frozen base, the adapters,
their gradients and AdamW's state, and its peak resident memory.

    python benchmarks/fsdp_memory.py                       # 4 blocks; worlds 1 and 2; updates benchmarks/RESULTS.md
    python benchmarks/fsdp_memory.py --layers 2 --worlds 1 2 4
    python benchmarks/fsdp_memory.py --quick --results /tmp/R.md   # a narrow model, for the tests

The figures per block extrapolate to TinyLlama's 22 blocks: what a rank holds is (embeddings + head + blocks) /
world, plus the gathered block being computed. Measured bytes, not timings: the machine's noise does not enter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from step_time import RESULTS, cpu_model, write_section

MARKERS = ("<!-- fsdp_memory:start -->", "<!-- fsdp_memory:end -->")
TINYLLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
QUICK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
TINYLLAMA_BLOCKS = 22


def build(shape: dict, layers: int):
    """The PEFT model on the meta device: no memory yet."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_elastic import NLSConfig

    config = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=512, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        model = get_peft_model(model, NLSConfig(r=16, lora_alpha=32, rank_choices=[16, 12, 8], target_modules=TARGETS))
    return model


def materialise(model) -> None:
    """Allocate this rank's tensors (its shards, once sharded) and fill them: random frozen weights, the adapters'
    own initialisation (lora_B = 0), the rotary embedding's inverse frequencies (a buffer no checkpoint holds)."""
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if "lora_B" in name:
                local.zero_()
            elif "norm" in name:
                local.fill_(1.0)
            else:
                local.copy_(torch.randn(local.shape, generator=generator) * 0.02)
        for module in model.modules():
            if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):  # rotary: rebuilt on CPU
                fresh = type(module)(config=module.config)
                module.inv_freq.copy_(fresh.inv_freq)
                module.original_inv_freq.copy_(fresh.original_inv_freq)


def _bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> dict:
    """One rank: build on meta, shard (world > 1), materialise, one AdamW step; the bytes this rank holds."""
    import torch.distributed as dist

    import peft_elastic
    from peft_elastic.fsdp import shard_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    shape = QUICK if args.quick else TINYLLAMA
    model = build(shape, args.layers)
    if world > 1:
        dist.init_process_group("gloo")
        shard_model(model)
    materialise(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    peft_elastic.set_subnetwork(model, peft_elastic.maximal_subnetwork(model))
    ids = torch.randint(0, shape["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(1))
    local = ids  # every rank the same sequence: memory, not data parallelism, is measured
    loss = model(input_ids=local, labels=local).loss
    loss.backward()
    grads = _bytes(p.grad for p in trainable if p.grad is not None)
    optimizer.step()
    state = _bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    record = {
        "rank": rank,
        "world": world,
        "frozen_bytes": _bytes(frozen),
        "adapter_bytes": _bytes(trainable),
        "grad_bytes": grads,
        "adamw_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss": loss.item(),
        "frozen_params": sum(p.numel() for p in frozen),
        "adapter_params": sum(p.numel() for p in trainable),
    }
    Path(args.worker).joinpath(f"world{world}-rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return record


def launch(args: argparse.Namespace, world: int, work: Path) -> list[dict]:
    me = [
        str(Path(__file__).resolve()),
        "--worker",
        str(work),
        "--layers",
        str(args.layers),
        "--tokens",
        str(args.tokens),
    ]
    me += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
    if world == 1:
        command = [sys.executable, *me]
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(port), *me]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((work / f"world{world}-rank{rank}.json").read_text()) for rank in range(world)]


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def section(args: argparse.Namespace, runs: dict[int, list[dict]], command: str) -> str:
    shape = QUICK if args.quick else TINYLLAMA
    one = runs[1][0]
    lines = [
        "| ranks | rank | frozen base MiB | adapters MiB | gradients MiB | AdamW state MiB | held, all MiB | "
        "vs one process | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    held = lambda r: r["frozen_bytes"] + r["adapter_bytes"] + r["grad_bytes"] + r["adamw_bytes"]  # noqa: E731
    for world, records in sorted(runs.items()):
        for r in records:
            lines.append(
                f"| {world} | {r['rank']} | {_mib(r['frozen_bytes'])} | {_mib(r['adapter_bytes'])} | "
                f"{_mib(r['grad_bytes'])} | {_mib(r['adamw_bytes'])} | {_mib(held(r))} | {held(r) / held(one):.3f} | "
                f"{_mib(r['peak_rss_bytes'])} |"
            )
    # the per-block share, from the parameter counts, to project TinyLlama's 22 blocks
    hidden, mlp = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden
    outside = 2 * shape["vocab_size"] * hidden + hidden
    if outside + args.layers * block != one["frozen_params"]:  # the projection's formula, checked on the model
        expected = f"{outside} + {args.layers} x {block}"
        raise RuntimeError(f"{expected} frozen parameters expected, {one['frozen_params']} built")
    full = (outside + TINYLLAMA_BLOCKS * block) * 4
    worlds = sorted(w for w in runs if w > 1)
    projection = "; ".join(f"{w} ranks: {_mib(full / w)} MiB each" for w in worlds)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{MARKERS[0]}
## Memory per rank under FSDP2 (`benchmarks/fsdp_memory.py`)

- Date: {when}
- Command (from the repository root): `{command}`
- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, Python {platform.python_version()};
  gloo ranks on CPU, each its own process
- Model: Llama blocks of {"a narrow shape (quick run)" if args.quick else "TinyLlama-1.1B's shape"} (hidden {hidden},
  MLP {mlp}, {shape["num_attention_heads"]} heads over {shape["num_key_value_heads"]} key/value heads, vocabulary
  {shape["vocab_size"]}, untied head), {args.layers} blocks, float32, built on the meta device and materialised per
  rank after `shard_model`; NLS adapters r=16 (ranks [16, 12, 8]) on q/k/v/up/down: {one["adapter_params"]:,} adapter
  and {one["frozen_params"]:,} frozen parameters
- Step: one sequence of {args.tokens} tokens, forward, backward, one AdamW step at the maximal subnetwork

{chr(10).join(lines)}

"held, all" is the parameters, gradients and optimizer state the rank holds after the step (its shards; the one
process holds them whole); "vs one process" divides it by the one process's. Peak RSS adds what the step
allocates and frees (a gathered block and its activations, the gloo buffers) and the Python/torch runtime. With
{TINYLLAMA_BLOCKS} blocks of this shape the frozen base alone is {_mib(full)} MiB in float32; sharded, {projection}.
{MARKERS[1]}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks (default: 4)")
    parser.add_argument("--tokens", type=int, default=64, help="sequence length of the step (default: 64)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="numbers of ranks (default: 1 2)")
    parser.add_argument("--quick", action="store_true", help="a narrow model (smoke run)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file to update")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.tokens < 1:
        parser.error(f"--layers and --tokens must be at least 1, got {args.layers} and {args.tokens}")
    if 1 not in args.worlds or any(w < 1 for w in args.worlds):
        parser.error(f"--worlds must include 1 (the reference) and only counts >= 1, got {args.worlds}")
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as work:
        runs = {world: launch(args, world, Path(work)) for world in sorted(set(args.worlds))}
    shown = [a for a in (argv if argv is not None else sys.argv[1:])]
    command = " ".join(["python benchmarks/fsdp_memory.py", *shown])
    text = section(args, runs, command)
    write_section(args.results, text, MARKERS)
    print(text)


if __name__ == "__main__":
    main()
