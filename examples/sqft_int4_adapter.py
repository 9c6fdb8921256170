"""SQFT on an INT4 base: fine-tune a floating-point elastic adapter on a sparse GPTQ model and keep it unmerged.

The recipe (SQFT's "sparse INT4 base + FP adapter" pipeline, with NLS): prune the base to 50 % with Wanda
(`peft_elastic.sparsify`); quantize it to 4 bits with GPTQ (`peft_elastic.quantize_gptq`, which keeps every zero and
stores the sparsity mask next to the checkpoint); load the GPTQ checkpoint with transformers on CPU; fine-tune a
rank-elastic adapter on it — SparsePEFT (`SparsePEFTConfig`, whose update is masked with the stored mask, so base +
update keeps the zeros) or NLS (`NLSConfig`, a plain elastic LoRA update) — with `ElasticSFTTrainer` and a subnetwork
sampler; activate the heuristic subnetwork and save the adapter. An adapter trained without quantization-aware
training is not merged into the INT4 weights (most of its update would round away): the model is the INT4 base plus
the adapter. The script reloads the adapter with `PeftModel.from_pretrained` on a freshly loaded INT4 base, checks
that it computes what the trained model did, prints the eval losses and sparsities, and writes them to
`figures.json` in the output folder.

By default everything is offline: a tiny Llama built from a config (randomly initialised: its losses only show that the
adapters learn), a tokenizer trained here and a toy arithmetic dataset. With `--model` it prunes, quantizes and
fine-tunes a real causal LM (with its tokenizer; adapters on q/k/v/up/down, Llama/Mistral/Qwen names) on the same kind
of data; bring your own data by replacing `make_texts`. GPTQ layers are loaded with gptqmodel's `gptq_torch` kernel in
float32 (it trains, and keeps the standard packed layout); on a machine with few cores set `GPTQMODEL_CPU_WORKERS` to
the number of cores.

    python examples/sqft_int4_adapter.py [--model MODEL_ID_OR_PATH] [--adapter sparse-peft|nls] [--sparsity 0.5]
        [--group-size 32] [--rank 8] [--strategy random|sandwich|random_linear|grid_params] [--steps 40]
        [--learning-rate LR] [--output-dir out/sqft-int4-adapter] [--seed 0]

Writes to the output directory: `sparse` (the Wanda-pruned float model), `int4` (its GPTQ checkpoint with
`sparsity_mask.safetensors` and `quantization_report.json`), `adapter` (the super-adapter, all ranks, with the
tokenizer; load it on the `int4` model after `import peft_elastic`) and `figures.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, GPTQConfig
from trl import SFTConfig

import peft_elastic
from peft_elastic import NLSConfig, SparsePEFTConfig
from peft_elastic.choices import SAMPLERS
from peft_elastic.quantization import dequantize, load_sparsity_mask
from peft_elastic.quantization.layers import zero_format
from peft_elastic.search import LossEvaluator
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # Shears/SQFT's (Llama names)
BITS = 4
#: The reloaded adapter on a reloaded base computes with the same weights in the same kernel (float32): the logits are
#: expected to be equal; this bound only leaves room for other kernels' float rounding.
TOLERANCE = 1e-5


def make_texts(n: int, seed: int) -> list[str]:
    """Toy problems as plain texts ("Q:12+7=?A:19"); the adapters learn them with the causal-LM loss."""
    return [p["prompt"] + p["completion"] for p in arithmetic_problems(n, seed=seed)]


def calibration_texts(texts: list[str], per_sample: int = 8) -> list[str]:
    """Calibration samples for Wanda and GPTQ: a few texts joined into each (gptqmodel drops samples of 10 tokens or
    fewer)."""
    return [" ".join(texts[i : i + per_sample]) for i in range(0, len(texts), per_sample)]


def load_int4(path: Path):
    """The GPTQ checkpoint on CPU with gptqmodel's trainable `gptq_torch` kernel, computing in float32."""
    config = GPTQConfig(bits=BITS, backend="gptq_torch")
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )


def dequantized(layer) -> torch.Tensor:
    """The weight (out × in) of a GPTQ layer (or of the GPTQ layer an adapter wraps), dequantized from its codes."""
    layer = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
    return dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, zero_format(layer))


def int4_sparsity(model, masks: dict[str, torch.Tensor]) -> float:
    """The fraction of the GPTQ layers' weights that were pruned (`mask` False) and dequantize to exactly 0: the float
    model's sparsity if every pruned weight is still zero."""
    zeros = sum(int((dequantized(model.get_submodule(name))[~mask] == 0).sum()) for name, mask in masks.items())
    return zeros / sum(mask.numel() for mask in masks.values())


def update_on_pruned(model, masks: dict[str, torch.Tensor]) -> float:
    """The fraction of the adapted layers' pruned weights that the active adapter's update changes (0 for SparsePEFT,
    whose update is masked)."""
    changed, pruned = 0, 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
                mask = masks[name.removeprefix("base_model.model.")]
                changed += int((module.get_delta_weight("default")[~mask] != 0).sum())
                pruned += int((~mask).sum())
    return changed / pruned


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument(
        "--adapter", default="sparse-peft", choices=["sparse-peft", "nls"], help="adapter type (default: sparse-peft)"
    )
    parser.add_argument("--sparsity", type=float, default=0.5, help="Wanda sparsity of every row (default: 0.5)")
    parser.add_argument(
        "--group-size", type=int, default=32, help="GPTQ group size, -1 or a power of two (default: 32)"
    )
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r; choices r, 3r/4, r/2 (default: 8)")
    parser.add_argument("--strategy", default="random", choices=SAMPLERS, help="subnetwork sampler")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="(default: 1e-2 for the tiny model, 3e-4 with --model)"
    )
    parser.add_argument(
        "--output-dir", default="out/sqft-int4-adapter", help="where to write (default: out/sqft-int4-adapter)"
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

    # 2. Fine-tune a rank-elastic FP adapter on the INT4 base as a super-network (one subnetwork per optimizer step).
    r = args.rank
    options = dict(r=r, lora_alpha=2 * r, rank_choices=sorted({r, 3 * r // 4, r // 2}, reverse=True))
    if args.adapter == "sparse-peft":  # the mask: sparsity_mask.safetensors in the folder the base was loaded from
        config = SparsePEFTConfig(**options, target_modules=TARGET_MODULES)
    else:
        config = NLSConfig(**options, target_modules=TARGET_MODULES)
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

    # 3. The heuristic subnetwork (the middle rank of every group); save the adapter (all ranks, this one active).
    subnetwork = peft_elastic.heuristic_subnetwork(model)
    peft_elastic.set_subnetwork(model, subnetwork)
    tuned_loss = evaluate(model)
    model.eval()
    with torch.no_grad():
        tuned_logits = model(**probe).logits
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")

    # 4. Reload it on a freshly loaded INT4 base (`import peft_elastic` registers the adapter types with PEFT).
    again = PeftModel.from_pretrained(load_int4(out / "int4"), out / "adapter")
    if peft_elastic.get_subnetwork(again) != subnetwork:  # the active ranks are saved with the adapter weights
        raise RuntimeError("The adapter did not come back with the subnetwork it was saved with.")
    again.eval()
    with torch.no_grad():
        max_logit_diff = float((again(**probe).logits - tuned_logits).abs().max())
    figures = {
        "base_loss": base_loss,
        "tuned_loss": tuned_loss,
        "reloaded_loss": evaluate(again),
        "sparsity": sparse.sparsity,
        "int4_sparsity": base_int4_sparsity,
        "reloaded_int4_sparsity": int4_sparsity(again.get_base_model(), masks),
        "update_on_pruned": update_on_pruned(again, masks),
        "max_logit_diff": max_logit_diff,
        "adapter_params": peft_elastic.num_adapter_parameters(again, subnetwork),
    }

    (out / "figures.json").write_text(json.dumps(figures, indent=2))

    print(f"\n{'model':<34} {'eval loss':>9} {'INT4 sparsity':>13}")
    print(f"{'sparse INT4 base':<34} {figures['base_loss']:>9.4f} {figures['int4_sparsity']:>13.2%}")
    row = f"+ {args.adapter}, heuristic, unmerged"
    print(f"{row:<34} {figures['tuned_loss']:>9.4f} {figures['int4_sparsity']:>13.2%}")
    row = "reloaded (INT4 base + adapter)"
    print(f"{row:<34} {figures['reloaded_loss']:>9.4f} {figures['reloaded_int4_sparsity']:>13.2%}")
    print(
        f"\nSparsity of the float model: {figures['sparsity']:.2%}; pruned weights that the adapter's update changes: "
        f"{figures['update_on_pruned']:.2%}"
    )
    print(f"Heuristic subnetwork: {figures['adapter_params']:,} adapter parameters; adapter: {out / 'adapter'}")
    print(f"Largest logit difference, reloaded vs trained: {max_logit_diff:.2e}")
    if figures["reloaded_int4_sparsity"] != figures["sparsity"]:
        raise RuntimeError("Pruned weights of the INT4 base do not dequantize to 0.")
    if args.adapter == "sparse-peft" and figures["update_on_pruned"] != 0:
        raise RuntimeError("The SparsePEFT update changes pruned weights: it is not masked.")
    if max_logit_diff > TOLERANCE:
        raise RuntimeError(f"The reloaded adapter computes something else (logits differ by up to {max_logit_diff}).")
    return figures


if __name__ == "__main__":
    main()
