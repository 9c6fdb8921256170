"""The offline demo: train an elastic LoRA super-adapter on a tiny model, compare its subnetworks, export one as a
stock PEFT LoRA checkpoint and reload it without peft_elastic's layers.

    python -m peft_elastic.demo [--steps 150] [--output-dir DIR]

Everything is built locally: a tokenizer trained on the task's text and a small Llama from a config.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(tokenizer, problems: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Token ids of "prompt completion</s>", padded, with labels only on the completion (the answer)."""
    rows, labels = [], []
    for problem in problems:
        prompt = tokenizer(problem["prompt"]).input_ids
        answer = tokenizer(problem["completion"]).input_ids + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
    }


@torch.no_grad()
def eval_loss(model, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    loss = model(**batch).loss.item()
    model.train()
    return loss


def train(model, batches: list[dict[str, torch.Tensor]], steps: int, seed: int) -> list[float]:
    """AdamW with a random subnetwork per step (drawn from (seed, step), outside forward). Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for step in range(steps):
        peft_elastic.set_subnetwork(model, peft_elastic.sample_subnetwork(model, seed=seed * 1_000_003 + step))
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def run(steps: int, output_dir: Path, seed: int = 0) -> dict[str, float]:
    """Run the demo, print what it does, and return its figures."""
    torch.manual_seed(seed)
    problems = arithmetic_problems(2400, seed=seed)
    tokenizer = train_tokenizer([p["prompt"] + p["completion"] for p in problems], vocab_size=96)
    train_set, test_set = problems[:2048], problems[2048:]
    batches = [encode(tokenizer, train_set[i : i + 64]) for i in range(0, len(train_set), 64)]
    test_batch = encode(tokenizer, test_set)

    base = tiny_llama(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, seed=seed)
    config = ElasticLoraConfig(r=16, lora_alpha=32, rank_choices=[16, 12, 8], target_modules=TARGETS)
    model = get_peft_model(base, config)
    space = peft_elastic.search_space(model)
    print(f"Tiny Llama ({sum(p.numel() for p in base.parameters()):,} parameters), elastic LoRA r=16 on {TARGETS}")
    print(f"Search space: {len(space)} groups x {len(next(iter(space.values())))} rank choices, e.g.")
    for name in list(space)[:3]:
        print(f"  {name}: {space[name]}")

    with model.disable_adapter():
        base_loss = eval_loss(model, test_batch)
    losses = train(model, batches, steps, seed)
    print(f"\nTrained {steps} steps with a random subnetwork per step: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    figures = {"base": base_loss}
    print(f"\n{'subnetwork':<12}{'test loss':>10}{'adapter params':>16}")
    print(f"{'base only':<12}{base_loss:>10.4f}{0:>16,}")
    for label, pick in [
        ("maximal", peft_elastic.maximal_subnetwork),
        ("heuristic", peft_elastic.heuristic_subnetwork),
        ("minimal", peft_elastic.minimal_subnetwork),
    ]:
        peft_elastic.set_subnetwork(model, pick(model))
        figures[label] = eval_loss(model, test_batch)
        print(f"{label:<12}{figures[label]:>10.4f}{peft_elastic.num_adapter_parameters(model):>16,}")

    peft_elastic.set_subnetwork(model, peft_elastic.heuristic_subnetwork(model))
    export_dir = peft_elastic.export_sub_adapter(model, output_dir / "heuristic-lora")
    model.save_pretrained(output_dir / "super-adapter")
    stock = PeftModel.from_pretrained(
        tiny_llama(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, seed=seed), export_dir
    )
    if type(stock.peft_config["default"]) is not LoraConfig:
        raise RuntimeError("The export did not load as a stock LoRA adapter.")
    figures["stock_reload"] = eval_loss(stock, test_batch)
    figures["stock_max_logit_diff"] = float(
        (stock(**test_batch).logits - model(**test_batch).logits).abs().max().detach()
    )
    print(f"\nExported the heuristic subnetwork as a stock LoRA checkpoint: {export_dir}")
    print(
        f"Reloaded with plain peft.PeftModel: test loss {figures['stock_reload']:.4f} "
        f"(max logit difference {figures['stock_max_logit_diff']:.1e})"
    )
    print(f"Super-adapter (all subnetworks): {output_dir / 'super-adapter'}")
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m peft_elastic.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    parser.add_argument("--output-dir", type=Path, default=None, help="where to write (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="peft_elastic_demo_"))
    return run(args.steps, output_dir, args.seed)


if __name__ == "__main__":
    main()
