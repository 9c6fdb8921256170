"""SQFT + QA-SparsePEFT: fine-tune a sparse INT4 model quantization-aware and merge the adapter into its INT4 weights.

The recipe (SQFT's third pipeline, with NLS): prune the base to 50 % with Wanda (`peft_elastic.sparsify`); quantize it
to 4 bits with GPTQ (`peft_elastic.quantize_gptq`, which keeps every zero and stores the sparsity mask next to the
checkpoint); load the GPTQ checkpoint with transformers on CPU; fine-tune rank-elastic QA-SparsePEFT adapters
(`SparsePEFTConfig(quantization_aware=True)`: the forward uses the merged weight fake-quantized on the base's frozen
INT4 grid, masked with the sparsity mask) with `ElasticSFTTrainer` and a subnetwork sampler; activate the heuristic
subnetwork; `merge_and_unload()` writes the new codes into the GPTQ layers (scales, zero-points and `g_idx`
unchanged), and `save_pretrained` writes a standard GPTQ checkpoint. The script reloads it with plain
`AutoModelForCausalLM.from_pretrained`, checks that it computes what the unmerged QA model did and that every pruned
weight still dequantizes to 0, prints the eval losses, sparsities and how many INT4 codes the merge changed, and
writes them to `figures.json` in the output folder.

By default everything is offline: a tiny Llama built from a config (randomly initialised: its losses only show that the
adapters learn), a tokenizer trained here and a toy arithmetic dataset. With `--model` it prunes, quantizes and
fine-tunes a real causal LM (with its tokenizer; adapters on q/k/v/up/down, Llama/Mistral/Qwen names) on the same kind
of data; bring your own data by replacing `make_texts`. GPTQ layers are loaded with gptqmodel's `gptq_torch` kernel in
float32 (it trains, keeps the standard packed layout and computes the merged model exactly as the QA forward did); on a
machine with few cores set `GPTQMODEL_CPU_WORKERS` to the number of cores.

    python examples/sqft_qa_sparse_peft.py [--model MODEL_ID_OR_PATH] [--sparsity 0.5] [--group-size 32] [--rank 8]
        [--strategy random|sandwich|random_linear|grid_params] [--steps 40] [--learning-rate LR]
        [--output-dir out/sqft-qa-sparse-peft] [--seed 0]

Writes to the output directory: `sparse` (the Wanda-pruned float model), `int4` (its GPTQ checkpoint with
`sparsity_mask.safetensors` and `quantization_report.json`), `merged-int4` (the merged GPTQ checkpoint with its
tokenizer and a copy of the mask, to fine-tune it again with SparsePEFT) and `figures.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, GPTQConfig
from trl import SFTConfig

import peft_elastic
from peft_elastic import SparsePEFTConfig
from peft_elastic.choices import SAMPLERS
from peft_elastic.quantization import MASK_FILE, dequantize, load_sparsity_mask
from peft_elastic.quantization.layers import codes, zero_format
from peft_elastic.search import LossEvaluator
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback
from peft_elastic.tuners.sparse_peft.monitor import QA_LEARNING_RATE

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # Shears/SQFT's (Llama names)
BITS = 4
#: The reloaded merged model computes with exactly the weights of the QA forward (float32, the same kernel): its
#: logits are expected to be equal; this bound only leaves room for other kernels' float rounding.
TOLERANCE = 1e-5


def make_texts(n: int, seed: int) -> list[str]:
    """Toy problems as plain texts ("Q:12+7=?A:19"); the adapters learn them with the causal-LM loss."""
    return [p["prompt"] + p["completion"] for p in arithmetic_problems(n, seed=seed)]


def calibration_texts(texts: list[str], per_sample: int = 8) -> list[str]:
    """Calibration samples for Wanda and GPTQ: a few texts joined into each (gptqmodel drops samples of 10 tokens or
    fewer)."""
    return [" ".join(texts[i : i + per_sample]) for i in range(0, len(texts), per_sample)]


def load_int4(path: Path):
    """A GPTQ checkpoint on CPU with gptqmodel's trainable `gptq_torch` kernel, computing in float32."""
    config = GPTQConfig(bits=BITS, backend="gptq_torch")
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )


def int4_codes(model, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The INT4 codes (in × out) of the GPTQ layers `masks` names."""
    return {name: codes(model.get_submodule(name)).clone() for name in masks}


def int4_sparsity(model, masks: dict[str, torch.Tensor]) -> float:
    """The fraction of the GPTQ layers' weights that were pruned (`mask` False) and dequantize to exactly 0: the float
    model's sparsity if every pruned weight is still zero."""
    zeros = 0
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        weight = dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, zero_format(layer))
        zeros += int((weight[~mask] == 0).sum())
    return zeros / sum(mask.numel() for mask in masks.values())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument("--sparsity", type=float, default=0.5, help="Wanda sparsity of every row (default: 0.5)")
    parser.add_argument(
        "--group-size", type=int, default=32, help="GPTQ group size, -1 or a power of two (default: 32)"
    )
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r; choices r, 3r/4, r/2 (default: 8)")
    parser.add_argument("--strategy", default="random", choices=SAMPLERS, help="subnetwork sampler")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="(default: 1e-2 for the tiny model, 2e-3 with --model)"
    )
    parser.add_argument(
        "--output-dir", default="out/sqft-qa-sparse-peft", help="where to write (default: out/sqft-qa-sparse-peft)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.rank < 2:
        parser.error(f"--rank must be at least 2 (so that r/2 >= 1), got {args.rank}")
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity must be between 0 and 1 (exclusive), got {args.sparsity}")
    if args.group_size != -1 and (args.group_size < 1 or args.group_size & (args.group_size - 1)):
        parser.error(f"--group-size must be -1 or a power of two, got {args.group_size}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.learning_rate is None:
        # QA-SparsePEFT's rate: its update must reach half a quantization step to change a code (docs/quantization.md)
        args.learning_rate = QA_LEARNING_RATE if args.model else 1e-2
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

    # 1. Prune with Wanda, save the sparse model, quantize it to INT4 with GPTQ (every zero kept, the mask stored).
    calibration = calibration_texts(make_texts(128, args.seed + 2))
    sparse = peft_elastic.sparsify(base, calibration, "wanda", args.sparsity, tokenizer=tokenizer, progress=False)
    peft_elastic.save_sparsified(base, out / "sparse", sparse, tokenizer, overwrite=True)  # a re-run replaces it
    quantized = peft_elastic.quantize_gptq(
        out / "sparse", out / "int4", calibration, bits=BITS, group_size=args.group_size, overwrite=True
    )
    print(quantized)
    masks = load_sparsity_mask(out / "int4")
    qmodel = load_int4(out / "int4")
    base_loss, base_int4_sparsity = evaluate(qmodel), int4_sparsity(qmodel, masks)
    base_codes = int4_codes(qmodel, masks)  # the merge will rewrite them in place

    # 2. Fine-tune rank-elastic QA-SparsePEFT adapters against the frozen INT4 grid (one subnetwork per step).
    r = args.rank
    config = SparsePEFTConfig(
        r=r,
        lora_alpha=2 * r,
        rank_choices=sorted({r, 3 * r // 4, r // 2}, reverse=True),
        target_modules=TARGET_MODULES,
        quantization_aware=True,  # the mask: sparsity_mask.safetensors in the folder the base was loaded from
    )
    trainer = ElasticSFTTrainer(
        model=qmodel,
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
            bf16=False,
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

    # 3. The heuristic subnetwork (the middle rank of every group), merged into the INT4 codes and saved as GPTQ.
    subnetwork = peft_elastic.heuristic_subnetwork(model)
    peft_elastic.set_subnetwork(model, subnetwork)
    adapter_params = peft_elastic.num_adapter_parameters(model, subnetwork)
    tuned_loss = evaluate(model)
    model.eval()
    with torch.no_grad():
        qa_logits = model(**probe).logits
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged-int4")
    tokenizer.save_pretrained(out / "merged-int4")
    shutil.copyfile(out / "int4" / MASK_FILE, out / "merged-int4" / MASK_FILE)  # to fine-tune it again with SparsePEFT

    # 4. Reload it as a plain GPTQ checkpoint and check it.
    reloaded = load_int4(out / "merged-int4")
    with torch.no_grad():
        max_logit_diff = float((reloaded(**probe).logits - qa_logits).abs().max())
    new_codes = int4_codes(reloaded, masks)
    figures = {
        "base_loss": base_loss,
        "tuned_loss": tuned_loss,
        "merged_loss": evaluate(reloaded),
        "sparsity": sparse.sparsity,
        "int4_sparsity": base_int4_sparsity,
        "merged_int4_sparsity": int4_sparsity(reloaded, masks),
        "changed_codes": sum(int((new_codes[n] != base_codes[n]).sum()) for n in masks),
        "max_logit_diff": max_logit_diff,
        "adapter_params": adapter_params,
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=2))

    print(f"\n{'model':<36} {'eval loss':>9} {'INT4 sparsity':>13}")
    print(f"{'sparse INT4 base':<36} {figures['base_loss']:>9.4f} {figures['int4_sparsity']:>13.2%}")
    row = "QA-SparsePEFT, heuristic, unmerged"
    print(f"{row:<36} {figures['tuned_loss']:>9.4f} {figures['int4_sparsity']:>13.2%}")
    row = "merged into INT4, reloaded"
    print(f"{row:<36} {figures['merged_loss']:>9.4f} {figures['merged_int4_sparsity']:>13.2%}")
    total = sum(mask.numel() for mask in masks.values())
    print(
        f"\nSparsity of the float model: {figures['sparsity']:.2%}; the merge changed {figures['changed_codes']:,} of "
        f"{total:,} INT4 codes"
    )
    print(f"Heuristic subnetwork: {adapter_params:,} adapter parameters; merged model: {out / 'merged-int4'}")
    print(f"Largest logit difference, reloaded merged model vs unmerged QA model: {max_logit_diff:.2e}")
    if figures["merged_int4_sparsity"] != figures["sparsity"]:
        raise RuntimeError("Pruned weights of the merged INT4 model do not dequantize to 0.")
    if max_logit_diff > TOLERANCE:
        raise RuntimeError(f"The reloaded merged model differs from the QA model (logits by up to {max_logit_diff}).")
    return figures


if __name__ == "__main__":
    main()
