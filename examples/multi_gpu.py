"""Shears (NLS) super-network training with several processes (DDP): the same recipe as `shears_sft.py`, launched
with `accelerate` or `torchrun`, or run as one process with plain `python`.

The recipe: rank-elastic adapters (`NLSConfig`, ranks [r, 3r/4, r/2] on q/k/v/up/down) on a frozen base, trained as a
super-network with `ElasticSFTTrainer` (a new subnetwork per optimizer step), then evaluated at its maximal, heuristic
and minimal subnetworks; rank 0 saves the super-adapter and exports the heuristic sub-adapter as a stock LoRA
checkpoint. Nothing in the script is specific to DDP: every rank draws the same subnetwork from (seed, step) without
communicating, the Trainer shards the data and all-reduces the gradients, so the ranks keep identical adapters —
each rank writes `ranks/rank<R>.json` with the world size and a SHA-256 of its adapter weights to show it. By default
everything is offline (a tiny Llama built from a config, a tokenizer trained here, toy arithmetic data); `--model`
fine-tunes a real causal LM.

    accelerate launch --multi_gpu --num_processes 2 examples/multi_gpu.py [--model MODEL_ID_OR_PATH] [--steps 60]
    torchrun --nproc_per_node 2 examples/multi_gpu.py [--strategy random|sandwich|...] [--output-dir out/multi_gpu]
    python examples/multi_gpu.py [--rank 8] [--batch-size 8] [--seed 0]

Without GPUs the ranks run on CPU with the gloo backend: use `torchrun` or `accelerate launch --multi_gpu` (with
`--cpu`, accelerate starts one process only). `--batch-size` is per process: the global batch is that times the
number of processes. The script ends with `torch.distributed.destroy_process_group()`: with gloo, a process that
exits with its group alive can abort at interpreter shutdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import get_peft_model_state_dict
from trl import SFTConfig

import peft_elastic
from peft_elastic import NLSConfig
from peft_elastic.choices import SAMPLERS
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback

SUBNETWORKS = ("maximal", "heuristic", "minimal")


def make_dataset(n: int, seed: int) -> Dataset:
    """Prompt-completion pairs ("Q:12+7=?A:" -> "19"); SFTTrainer trains on the completions only."""
    return Dataset.from_list(arithmetic_problems(n, seed=seed))


def adapter_checksum(model) -> str:
    """SHA-256 of the adapter weights as `save_pretrained` writes them (names sorted, float bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(get_peft_model_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument("--strategy", default="random", choices=SAMPLERS, help="subnetwork sampler")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r; choices r, 3r/4, r/2 (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="per process and micro-batch (default: 8)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--output-dir", default="out/multi_gpu", help="where to write (default: out/multi_gpu)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed (default: 0)")
    args = parser.parse_args(argv)
    for flag, value in (
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--gradient-accumulation-steps", args.gradient_accumulation_steps),
    ):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.rank < 2:
        parser.error(f"--rank must be at least 2 (so that r/2 >= 1), got {args.rank}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace) -> dict:
    out = Path(args.output_dir)
    train_set, test = make_dataset(512, args.seed), make_dataset(64, args.seed + 1)
    if args.model:
        base, tokenizer = peft_elastic.load_causal_lm(args.model)  # float32
    else:
        # every rank builds the same tokenizer and model (deterministic); learned on prompts and completions apart,
        # so that no token spans the boundary
        tokenizer = train_tokenizer([*train_set["prompt"], *train_set["completion"]], vocab_size=96)
        base = tiny_llama(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, seed=args.seed)

    r = args.rank
    config = NLSConfig(r=r, lora_alpha=2 * r, rank_choices=sorted({r, 3 * r // 4, r // 2}, reverse=True))
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank (DDP also broadcasts rank 0's)
    trainer = ElasticSFTTrainer(
        model=base,
        args=SFTConfig(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=32,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to=[],
            max_length=32,
            bf16=False,  # exact float32 (CPU); use bf16=True on GPUs that support it
            # without an accelerator, say so: else each process trains alone (world size 1) on the CPU
            use_cpu=not torch.accelerator.is_available(),
            ddp_find_unused_parameters=False,  # a sub-rank slices its parameter: every parameter is used every step
            seed=args.seed,
            disable_tqdm=True,
        ),
        train_dataset=train_set,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SubnetworkSamplingCallback(strategy=args.strategy, seed=args.seed, eval_subnetworks=SUBNETWORKS)],
    )
    state = trainer.accelerator.state
    # No evaluate() before train(): under DDP it would leave the model prepared for evaluation only, and train()
    # would then not wrap it in DistributedDataParallel (each rank would train alone, the gradients never averaged).
    trainer.train()
    after = trainer.evaluate()  # every rank evaluates its shard of the test set; the metrics are gathered
    model = trainer.model
    with model.disable_adapter():  # the base model, which the untrained super-network (B = 0) computes
        before = trainer.evaluate(metric_key_prefix="base")

    # every rank: its world size and a checksum of its adapter weights (DDP keeps them identical)
    checksum = adapter_checksum(model)
    record = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": str(state.device),
        "adapter_sha256": checksum,
    }
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    (out / "ranks" / f"rank{state.process_index}.json").write_text(json.dumps(record, indent=2))
    checksums = [checksum] * state.num_processes
    if dist.is_initialized():
        dist.all_gather_object(checksums, checksum)

    trainer.save_model(str(out / "super-adapter"))  # called on every rank; only rank 0 writes
    figures = {
        "world_size": state.num_processes,
        "global_batch_size": args.batch_size * args.gradient_accumulation_steps * state.num_processes,
        "base": before["base_loss"],
        **{name: after[f"eval_{name}_loss"] for name in SUBNETWORKS},
        "adapter_sha256": checksums,
        "ranks_agree": len(set(checksums)) == 1,
    }
    if trainer.is_world_process_zero():
        peft_elastic.export_sub_adapter(
            model, out / "heuristic-lora", peft_elastic.heuristic_subnetwork(model), overwrite=True
        )
        (out / "figures.json").write_text(json.dumps(figures, indent=2))
        print(
            f"\n{state.num_processes} process(es) ({state.distributed_type.value}, {state.device}), global batch "
            f"{figures['global_batch_size']}; adapters identical on every rank: {figures['ranks_agree']}\n"
        )
        print(f"{'subnetwork':<11} {'eval loss':>9} {'adapter params':>15}")
        print(f"{'before':<11} {figures['base']:>9.4f} {'':>15}")
        for name in SUBNETWORKS:
            subnetwork = getattr(peft_elastic, f"{name}_subnetwork")(model)
            params = peft_elastic.num_adapter_parameters(model, subnetwork)
            print(f"{name:<11} {figures[name]:>9.4f} {params:>15,}")
        print(
            f"\nSuper-adapter: {out / 'super-adapter'}; heuristic subnetwork as stock LoRA: {out / 'heuristic-lora'}"
        )
    trainer.accelerator.wait_for_everyone()  # rank 0 has written everything before any process leaves
    return figures


if __name__ == "__main__":
    main()
