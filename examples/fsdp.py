"""Super-network training with FSDP2 (`torch.distributed.fsdp.fully_shard`): the frozen base and the adapters
sharded over the ranks, for bases that do not fit one device. A plain torch loop, because accelerate — and so the
Trainer's `fsdp` arguments — runs FSDP on GPU-type devices only (`ElasticSFTTrainer` refuses them on CPU).

The recipe: elastic adapters with ranks [r, 3r/4, r/2] on q/k/v/up/down — `--tuner nls` (Shears' NLSConfig on the
frozen base), `sparse_peft` (SQFT's SparsePEFTConfig on the base pruned to 50 % by magnitude: merged, the adapter
keeps that sparsity) or `elastic_lora` (ElasticLoraConfig, rank-elastic) — one random subnetwork per optimizer step,
drawn from (seed, step) alike on every rank, AdamW. Each step's global batch is split over the ranks and the loss is
normalised by the global batch's token count, so the sharded run trains what one process would on the same batch.
Then every rank evaluates the maximal, heuristic and minimal subnetworks on held-out problems (forward passes: FSDP
gathers each block), rank 0 saves the super-adapter (`gathered(model, all_ranks=False)`), every rank calls
`export_sub_adapter` (gathered, written once by rank 0), and for SparsePEFT rank 0 merges the saved adapter in one
process and reports the merged model's sparsity. By default everything is offline (a tiny Llama built from a config,
a tokenizer trained here, toy arithmetic data); `--model` fine-tunes a real causal LM.

    torchrun --nproc_per_node 2 examples/fsdp.py [--tuner nls|sparse_peft|elastic_lora] [--steps 60] [--model M]
    python examples/fsdp.py [--global-batch-size 16] [--rank 8] [--seed 0] [--output-dir out/fsdp]

Plain `python` runs a world of one rank (the same code; nothing to shard across). On GPUs the script uses NCCL and
one GPU per rank (`LOCAL_RANK`); on CPU gloo. Multi-node: `torchrun --nnodes 2 --node_rank R --master_addr HOST
--nproc_per_node 8 examples/fsdp.py` on each machine.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig, NLSConfig, SparsePEFTConfig
from peft_elastic.fsdp import gathered, shard_model
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import make_sampler

TUNERS = {"nls": NLSConfig, "sparse_peft": SparsePEFTConfig, "elastic_lora": ElasticLoraConfig}
SUBNETWORKS = ("maximal", "heuristic", "minimal")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuner", default="nls", choices=sorted(TUNERS), help="adapter type (default: nls)")
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r; choices r, 3r/4, r/2 (default: 8)")
    parser.add_argument(
        "--global-batch-size", type=int, default=16, help="problems per step, over all ranks (default: 16)"
    )
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    parser.add_argument("--output-dir", default="out/fsdp", help="where to write (default: out/fsdp)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed (default: 0)")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--global-batch-size", args.global_batch_size)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.rank < 2:
        parser.error(f"--rank must be at least 2 (so that r/2 >= 1), got {args.rank}")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch_size % world:
        parser.error(
            f"--global-batch-size ({args.global_batch_size}) must be a multiple of the number of processes ({world})"
        )
    return args


def init_distributed() -> torch.device:
    """The process group (under torchrun: its rank and world; under plain python: a world of one) and the device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def batches(problems: list[dict], tokenizer, size: int, device: torch.device):
    """Prompt + completion token rows padded to the longest, the labels masked outside the completion (-100)."""
    rows, labels = [], []
    for problem in problems:
        prompt = tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(problem["completion"], add_special_tokens=False)["input_ids"]
        completion = completion + [tokenizer.eos_token_id]
        rows.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    for start in range(0, len(rows), size):
        chunk = slice(start, start + size)
        width = max(len(row) for row in rows[chunk])
        pad = tokenizer.pad_token_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows[chunk]], device=device)
        target = torch.tensor([row + [-100] * (width - len(row)) for row in labels[chunk]], device=device)
        yield ids, (ids != pad).long(), target


def load(args: argparse.Namespace, problems: list[dict]):
    """The base model and tokenizer, alike on every rank (deterministic), pruned for SparsePEFT."""
    if args.model:
        base, tokenizer = peft_elastic.load_causal_lm(args.model)  # float32
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        texts = [p["prompt"] for p in problems] + [p["completion"] for p in problems]
        tokenizer = train_tokenizer(texts, vocab_size=96)
        base = tiny_llama(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, seed=args.seed)
    if args.tuner == "sparse_peft":
        peft_elastic.sparsify(base, None, "magnitude", 0.5, progress=False)
    return base, tokenizer


def evaluate(model, data: list[tuple]) -> float:
    """Mean completion-token loss over `data` (every rank runs every batch: FSDP's forward is collective)."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for ids, mask, labels in data:
            count = (labels[:, 1:] != -100).sum()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            total += torch.stack([loss.double().cpu() * count.cpu(), count.double().cpu()])
    return (total[0] / total[1]).item()


def train(args: argparse.Namespace) -> dict:
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.output_dir)
    problems = arithmetic_problems(args.steps * args.global_batch_size, args.seed)
    seen = {p["prompt"] for p in problems}
    test = [p for p in arithmetic_problems(4096, args.seed + 1) if p["prompt"] not in seen][:64]  # held out
    if not test:
        raise SystemExit(f"--steps {args.steps} x --global-batch-size {args.global_batch_size} uses every toy problem")
    base, tokenizer = load(args, problems)
    base.to(device)

    r = args.rank
    config = TUNERS[args.tuner](
        r=r, lora_alpha=2 * r, rank_choices=sorted({r, 3 * r // 4, r // 2}, reverse=True), target_modules=TARGETS
    )
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank
    model = get_peft_model(base, config)
    sampler = make_sampler("random", seed=args.seed)
    sampler.setup(model)  # before sharding (a sampler may read the adapter weights)
    shard_model(model)  # fully_shard on every decoder block, then on the model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    held_out = list(batches(test, tokenizer, 32, device))
    before = evaluate(model.eval(), held_out)

    losses = []
    model.train()
    for step, (ids, mask, labels) in enumerate(batches(problems, tokenizer, args.global_batch_size, device)):
        [subnetwork] = sampler.sample(step, args.steps)  # the same on every rank, drawn from (seed, step)
        peft_elastic.set_subnetwork(model, subnetwork)
        # this rank's share of the global batch; the loss is its summed token losses over the global token count,
        # times the world size because FSDP averages the gradients over the ranks: the global batch's mean loss
        share = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
        tokens = (labels[:, 1:] != -100).sum()
        loss = model(
            input_ids=ids[share], attention_mask=mask[share], labels=labels[share], num_items_in_batch=tokens
        ).loss
        (loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the global batch's mean loss
        losses.append(total.item())

    model.eval()
    figures = {"world_size": world, "tuner": args.tuner, "before": before, "losses": losses}
    for name in SUBNETWORKS:
        subnetwork = getattr(peft_elastic, f"{name}_subnetwork")(model)
        peft_elastic.set_subnetwork(model, subnetwork)
        figures[name] = {
            "loss": evaluate(model, held_out),
            "adapter_params": peft_elastic.num_adapter_parameters(model, subnetwork),
            "subnetwork": subnetwork,
        }
    heuristic = figures["heuristic"]["subnetwork"]
    with gathered(model, all_ranks=False):  # the whole super-adapter on rank 0 only
        if rank == 0:
            model.save_pretrained(out / "super-adapter")
            tokenizer.save_pretrained(out / "super-adapter")
    peft_elastic.export_sub_adapter(model, out / "heuristic-lora", heuristic, overwrite=True)  # on every rank
    if rank == 0:
        if args.tuner == "sparse_peft":  # merging needs the whole model: one process, from the saved adapter
            merged_base, _ = load(args, problems)
            merged = PeftModel.from_pretrained(merged_base, out / "super-adapter")
            peft_elastic.set_subnetwork(merged, heuristic)
            figures["merged_sparsity"] = sparsity(merged.merge_and_unload())
        (out / "figures.json").write_text(json.dumps(figures, indent=2))
        report(figures, out)
    dist.barrier()  # rank 0 has written everything before any process leaves
    return figures


def sparsity(model) -> float:
    """The fraction of zeros in the weights of the adapted linear layers (TARGETS) of a merged model."""
    weights = [m.weight for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def report(figures: dict, out: Path) -> None:
    print(
        f"\n{figures['world_size']} process(es), {figures['tuner']} sharded with FSDP2; training loss "
        f"{figures['losses'][0]:.4f} -> {figures['losses'][-1]:.4f}\n"
    )
    print(f"{'subnetwork':<11} {'eval loss':>9} {'adapter params':>15}")
    print(f"{'before':<11} {figures['before']:>9.4f} {'':>15}")
    for name in SUBNETWORKS:
        print(f"{name:<11} {figures[name]['loss']:>9.4f} {figures[name]['adapter_params']:>15,}")
    if "merged_sparsity" in figures:
        print(f"\nMerged (heuristic subnetwork): {figures['merged_sparsity']:.1%} of the adapted weights are zero")
    print(f"\nSuper-adapter: {out / 'super-adapter'}; heuristic subnetwork as stock LoRA: {out / 'heuristic-lora'}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
