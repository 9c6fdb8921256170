"""Shears (NLS) fine-tuning with TRL's SFTTrainer: train a super-adapter, compare its subnetworks, export one.

The recipe: rank-elastic adapters (`NLSConfig`, ranks [r, 3r/4, r/2] on q/k/v/up/down) on a frozen base, trained as a
super-network (a new subnetwork per optimizer step), then evaluated at its maximal, heuristic and minimal subnetworks;
the heuristic one is exported as a stock LoRA checkpoint. By default everything is offline: a tiny Llama built from a
config, a tokenizer trained here and a toy arithmetic dataset. With `--model` it fine-tunes a real causal LM (with its
tokenizer) on the same kind of data; bring your own dataset by replacing `make_dataset`.

    python examples/shears_sft.py [--model MODEL_ID_OR_PATH] [--strategy random|sandwich|random_linear|grid_params]
        [--steps 60] [--rank 8] [--output-dir out/shears]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig

import peft_elastic
from peft_elastic import NLSConfig
from peft_elastic.choices import SAMPLERS
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback


def make_dataset(n: int, seed: int) -> Dataset:
    """Prompt-completion pairs ("12+7=" -> "19"); SFTTrainer trains on the completions only."""
    return Dataset.from_list(arithmetic_problems(n, seed=seed))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument("--strategy", default="random", choices=SAMPLERS, help="subnetwork sampler")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r; choices r, 3r/4, r/2 (default: 8)")
    parser.add_argument("--output-dir", default="out/shears", help="where to write the adapters (default: out/shears)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.rank < 2:
        parser.error(f"--rank must be at least 2 (so that r/2 >= 1), got {args.rank}")
    return args


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train, test = make_dataset(512, args.seed), make_dataset(64, args.seed + 1)
    if args.model:
        base, tokenizer = peft_elastic.load_causal_lm(args.model)  # float32
    else:
        tokenizer = train_tokenizer([p["prompt"] + p["completion"] for p in train], vocab_size=96)
        base = tiny_llama(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, seed=args.seed)

    r = args.rank
    config = NLSConfig(r=r, lora_alpha=2 * r, rank_choices=sorted({r, 3 * r // 4, r // 2}, reverse=True))
    trainer = ElasticSFTTrainer(
        model=base,
        args=SFTConfig(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=32,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to=[],
            max_length=32,
            bf16=False,  # exact float32 on CPU; use bf16=True on GPUs that support it
            seed=args.seed,
            disable_tqdm=True,
        ),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[
            SubnetworkSamplingCallback(
                strategy=args.strategy, seed=args.seed, eval_subnetworks=("maximal", "heuristic", "minimal")
            )
        ],
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    model = trainer.model

    figures = {"base": before["eval_loss"]}
    print(f"\n{'subnetwork':<11} {'eval loss':>9} {'adapter params':>15}")
    print(f"{'before':<11} {before['eval_loss']:>9.4f} {'':>15}")
    for name, pick in (
        ("maximal", peft_elastic.maximal_subnetwork),
        ("heuristic", peft_elastic.heuristic_subnetwork),
        ("minimal", peft_elastic.minimal_subnetwork),
    ):
        figures[name] = after[f"eval_{name}_loss"]
        params = peft_elastic.num_adapter_parameters(model, pick(model))
        print(f"{name:<11} {figures[name]:>9.4f} {params:>15,}")

    trainer.save_model(str(out / "super-adapter"))  # peft_type "NLS", the maximal subnetwork active
    peft_elastic.export_sub_adapter(
        model, out / "heuristic-lora", peft_elastic.heuristic_subnetwork(model), overwrite=True
    )
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(f"\nSuper-adapter: {out / 'super-adapter'}; heuristic subnetwork as stock LoRA: {out / 'heuristic-lora'}")
    return figures


if __name__ == "__main__":
    main()
