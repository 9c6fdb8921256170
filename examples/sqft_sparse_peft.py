"""SQFT + SparsePEFT: fine-tune a sparse base with masked elastic adapters and merge them into a sparse model.

The recipe (SQFT's first pipeline, with NLS): prune the base to 50 % with Wanda (`peft_elastic.sparsify`, calibrated
on a few texts); fine-tune rank-elastic SparsePEFT adapters (`SparsePEFTConfig`, ranks [r, 3r/4, r/2] on q/k/v/up/down)
as a super-network with `ElasticSFTTrainer` and a subnetwork sampler; activate the heuristic subnetwork (the middle
rank of every group); `merge_and_unload()` — the adapter's update is masked with the base's nonzero pattern, so the
merged weights keep every zero — and save the merged model, which plain `AutoModelForCausalLM.from_pretrained` loads.
The script checks that the reloaded model has exactly the sparse base's zeros and computes what the unmerged adapter
did, prints the eval losses and sparsities, and writes them to `figures.json` in the output folder.

By default everything is offline: a tiny Llama built from a config (randomly initialised: its losses only show that the
adapters learn), a tokenizer trained here and a toy arithmetic dataset. With `--model` it prunes and fine-tunes a real
causal LM (with its tokenizer; adapters on q/k/v/up/down, Llama/Mistral/Qwen names) on the same kind of data; bring
your own data by replacing `make_texts`.

    python examples/sqft_sparse_peft.py [--model MODEL_ID_OR_PATH] [--sparsity 0.5] [--rank 8]
        [--strategy random|sandwich|random_linear|grid_params] [--steps 40] [--learning-rate LR]
        [--output-dir out/sqft-sparse-peft] [--seed 0]

Writes to the output directory: `merged` (the merged sparse model with its tokenizer and `sparsity_report.json`: a
plain transformers checkpoint) and `figures.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.choices import SAMPLERS
from peft_elastic.search import LossEvaluator
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # Shears/SQFT's (Llama names)
#: The merged weight `W + s · (B A) ⊙ M` is what the unmerged adapter computes with, up to float rounding.
TOLERANCE = 1e-4


def make_texts(n: int, seed: int) -> list[str]:
    """Toy problems as plain texts ("Q:12+7=?A:19"); the adapters learn them with the causal-LM loss."""
    return [p["prompt"] + p["completion"] for p in arithmetic_problems(n, seed=seed)]


def calibration_texts(texts: list[str], per_sample: int = 8) -> list[str]:
    """Calibration samples for Wanda: a few texts joined into each sample."""
    return [" ".join(texts[i : i + per_sample]) for i in range(0, len(texts), per_sample)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument("--sparsity", type=float, default=0.5, help="Wanda sparsity of every row (default: 0.5)")
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r; choices r, 3r/4, r/2 (default: 8)")
    parser.add_argument("--strategy", default="random", choices=SAMPLERS, help="subnetwork sampler")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="(default: 1e-2 for the tiny model, 3e-4 with --model)"
    )
    parser.add_argument(
        "--output-dir", default="out/sqft-sparse-peft", help="where to write (default: out/sqft-sparse-peft)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.rank < 2:
        parser.error(f"--rank must be at least 2 (so that r/2 >= 1), got {args.rank}")
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity must be between 0 and 1 (exclusive), got {args.sparsity}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.learning_rate is None:
        args.learning_rate = 3e-4 if args.model else 1e-2
    return args


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_texts(512, args.seed), make_texts(64, args.seed + 1)
    if args.model:
        base, tokenizer = peft_elastic.load_causal_lm(args.model)  # float32
        if tokenizer.pad_token is None:  # e.g. Llama's: batches are padded
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = train_tokenizer(train, vocab_size=96)
        base = tiny_llama(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, seed=args.seed)
    evaluate = LossEvaluator(test, tokenizer, max_length=64, batch_size=32)  # mean loss per token, held-out texts
    probe = tokenizer(test[:8], return_tensors="pt", padding=True)  # for comparing logits

    # 1. Prune the base with Wanda, calibrated on texts of the task (in place).
    calibration = calibration_texts(make_texts(128, args.seed + 2))
    sparse = peft_elastic.sparsify(base, calibration, "wanda", args.sparsity, tokenizer=tokenizer, progress=False)
    base_loss = evaluate(base)

    # 2. Fine-tune rank-elastic SparsePEFT adapters as a super-network (one subnetwork per optimizer step).
    r = args.rank
    choices = sorted({r, 3 * r // 4, r // 2}, reverse=True)
    config = SparsePEFTConfig(r=r, lora_alpha=2 * r, rank_choices=choices, target_modules=TARGET_MODULES)
    trainer = ElasticSFTTrainer(
        model=base,
        args=SFTConfig(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to=[],
            max_length=32,
            bf16=False,  # exact float32 on CPU; use bf16=True on GPUs that support it
            seed=args.seed,
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list([{"text": text} for text in train]),
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SubnetworkSamplingCallback(strategy=args.strategy, seed=args.seed)],
    )
    trainer.train()
    model = trainer.model

    # 3. The heuristic subnetwork (the middle rank of every group), then merge it: the zeros stay zeros.
    subnetwork = peft_elastic.heuristic_subnetwork(model)
    peft_elastic.set_subnetwork(model, subnetwork)
    adapter_params = peft_elastic.num_adapter_parameters(model, subnetwork)
    tuned_loss = evaluate(model)
    model.eval()
    with torch.no_grad():
        tuned_logits = model(**probe).logits
    merged = model.merge_and_unload()
    peft_elastic.save_sparsified(merged, out / "merged", tokenizer=tokenizer, overwrite=True)  # checks its zeros

    # 4. A plain transformers model: reload it without peft_elastic's help and check it.
    reloaded = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    reloaded_zeros = peft_elastic.measure_sparsity(reloaded)
    with torch.no_grad():
        max_logit_diff = float((reloaded(**probe).logits - tuned_logits).abs().max())
    figures = {
        "base_loss": base_loss,
        "tuned_loss": tuned_loss,
        "merged_loss": evaluate(reloaded),
        "sparsity": sparse.sparsity,
        "merged_sparsity": reloaded_zeros.sparsity,
        "max_logit_diff": max_logit_diff,
        "adapter_params": adapter_params,
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=2))

    print(f"\n{'model':<32} {'eval loss':>9} {'sparsity':>9}")
    print(f"{'sparse base (Wanda)':<32} {figures['base_loss']:>9.4f} {figures['sparsity']:>9.2%}")
    print(f"{'SparsePEFT, heuristic, unmerged':<32} {figures['tuned_loss']:>9.4f} {figures['sparsity']:>9.2%}")
    print(f"{'merged, reloaded':<32} {figures['merged_loss']:>9.4f} {figures['merged_sparsity']:>9.2%}")
    print(f"\nHeuristic subnetwork: {adapter_params:,} adapter parameters; merged model: {out / 'merged'}")
    print(f"Largest logit difference, reloaded merged model vs unmerged adapter: {max_logit_diff:.2e}")
    if reloaded_zeros.modules != sparse.modules:  # {layer: (zeros, weights)}
        raise RuntimeError("The merged model does not have the zeros of the sparse base, layer for layer.")
    if max_logit_diff > TOLERANCE:
        raise RuntimeError(f"The reloaded merged model differs from the unmerged one (logits by {max_logit_diff}).")
    return figures


if __name__ == "__main__":
    main()
