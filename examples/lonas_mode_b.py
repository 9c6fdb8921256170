"""LoNAS (Mode B): train a super-network whose MLP widths and attention heads are elastic, export a smaller model.

The recipe: order every block's MLP channels and attention heads by importance on calibration data
(`reorder_by_importance`, the model computes exactly what it did), then wrap the base with `ElasticLoraConfig` in
Mode B: rank choices [r, 3r/4, r/2] on the seven projections, MLP width and head choices [1.0, 0.75, 0.5] per layer
(where those fractions do not land on whole channels or whole key/value groups, the sizes at most them: SmolLM2-135M's
9 query heads over 3 key/value heads take [9, 6, 3]; checked before the ordering).
The super-network is fine-tuned with `ElasticSFTTrainer` (a new subnetwork per optimizer step), its maximal, heuristic
and minimal subnetworks are compared (eval loss, deployed parameters and MACs from `subnetwork_cost`), and the
heuristic one is exported as a physically smaller model (`export_compressed_model`), reloaded with
`load_compressed_model` and `AutoModelForCausalLM`, and checked against the super-network: same logits. By default
everything is offline (a tiny Llama built from a config, a tokenizer trained here, toy arithmetic data); `--model`
fine-tunes a real causal LM (with its tokenizer) instead.

    python examples/lonas_mode_b.py [--model MODEL_ID_OR_PATH] [--strategy random|sandwich|random_linear]
        [--steps 60] [--rank 8] [--output-dir out/lonas] [--seed 0]

Writes to the output directory: `reordered-base` (the importance-ordered base and its tokenizer: the super-adapter
belongs to it, not to the original order), `super-adapter`, `heuristic-model` (the compressed model, with its
tokenizer) and `figures.json`.
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
from peft_elastic import ElasticLoraConfig
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback
from peft_elastic.tuners.elastic_lora.space import resolve_width_choices, sizes_at_most

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WIDTHS = [1.0, 0.75, 0.5]  # fractions of each layer's MLP intermediate size (see mode_b_choices)
HEADS = [1.0, 0.75, 0.5]  # fractions of each attention block's query heads (whole key/value groups)
SUBNETWORKS = {
    "maximal": peft_elastic.maximal_subnetwork,
    "heuristic": peft_elastic.heuristic_subnetwork,
    "minimal": peft_elastic.minimal_subnetwork,
}
# Mode B slices the frozen base: "grid_params" (which bins adapter sizes) and "fixed" are not super-network recipes
STRATEGIES = ("random", "sandwich", "random_linear")


def make_dataset(n: int, seed: int) -> Dataset:
    """Prompt-completion pairs ("Q:12+7=?A:" -> "19"); SFTTrainer trains on the completions only."""
    return Dataset.from_list(arithmetic_problems(n, seed=seed))


def texts(dataset: Dataset) -> list[str]:
    return [row["prompt"] + row["completion"] for row in dataset]


def mode_b_choices(config) -> dict[str, list]:
    """`width_choices` and `head_choices` for a base of this `config`: WIDTHS and HEADS where they land on whole MLP
    channels and whole key/value groups of heads, else the sizes at most them (SmolLM2-135M's 9 query heads over 3
    key/value heads: 0.75 and 0.5 of them are 6.75 and 4.5 heads, so [9, 6, 3])."""
    heads = config.num_attention_heads
    per_kv = heads // (getattr(config, "num_key_value_heads", None) or heads)
    choices = {}
    for option, fractions, full, unit in (
        ("width_choices", WIDTHS, config.intermediate_size, 1),
        ("head_choices", HEADS, heads, per_kv),
    ):
        sizes = sizes_at_most(fractions, full, multiple_of=unit)
        choices[option] = fractions if sizes == [f * full for f in fractions] else sizes
    return choices


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument("--strategy", default="random", choices=STRATEGIES, help="subnetwork sampler")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r; choices r, 3r/4, r/2 (default: 8)")
    parser.add_argument("--output-dir", default="out/lonas", help="where to write (default: out/lonas)")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.rank < 2:
        parser.error(f"--rank must be at least 2 (so that r/2 >= 1), got {args.rank}")
    return args


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train, test = make_dataset(512, args.seed), make_dataset(64, args.seed + 1)
    calibration = texts(make_dataset(32, args.seed + 2))
    if args.model:
        base, tokenizer = peft_elastic.load_causal_lm(args.model)  # float32
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    else:
        # learned on prompts and completions apart, so that no token spans the boundary (SFTTrainer wants the
        # tokenized prompt to be a prefix of the tokenized prompt + completion)
        tokenizer = train_tokenizer([*train["prompt"], *train["completion"]], vocab_size=96)
        # 8 query heads over 4 key/value heads of 12 channels: head choices 8, 6, 4
        base = tiny_llama(
            vocab_size=len(tokenizer),
            hidden_size=96,
            intermediate_size=192,
            num_attention_heads=8,
            num_key_value_heads=4,
            seed=args.seed,
        )
    probe = tokenizer(texts(test)[:8], return_tensors="pt", padding=True)
    r = args.rank
    config = ElasticLoraConfig(
        r=r,
        lora_alpha=2 * r,
        rank_choices=sorted({r, 3 * r // 4, r // 2}, reverse=True),
        target_modules=TARGETS,
        **mode_b_choices(base.config),
    )
    # the sizes every layer will take, checked now (in milliseconds), not after the ordering (minutes on a real model)
    resolved = resolve_width_choices(base, config)
    for kind, label in (("width", "MLP width"), ("heads", "head")):
        choices = {c for group, c in resolved.items() if group.endswith(f":{kind}")}  # one per distinct layer size
        print(f"{label} choices per layer: {' / '.join(str(list(c)) for c in sorted(choices, reverse=True))}")

    # 1. importance ordering: the channels and heads every narrower subnetwork keeps are the most important ones
    before = logits(base, probe)
    peft_elastic.reorder_by_importance(base, calibration, tokenizer=tokenizer)
    reorder_diff = float((logits(base, probe) - before).abs().max())
    base.save_pretrained(out / "reordered-base")  # the super-adapter is trained on (and belongs to) this order
    tokenizer.save_pretrained(out / "reordered-base")

    # 2. the super-network, trained with a new subnetwork per optimizer step
    torch.manual_seed(args.seed)
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
            SubnetworkSamplingCallback(strategy=args.strategy, seed=args.seed, eval_subnetworks=tuple(SUBNETWORKS))
        ],
    )
    trainer.train()
    after = trainer.evaluate()
    model = trainer.model.eval()
    with model.disable_adapter():  # the full base (what the untrained super-network computes at its maximal widths)
        base_metrics = trainer.evaluate(metric_key_prefix="base")
    trainer.save_model(str(out / "super-adapter"))  # the maximal subnetwork active; width choices in its config

    # 3. the subnetworks: validation loss and the cost of the model each deploys as
    space = peft_elastic.search_space(model)
    figures: dict = {"groups": len(space), "reorder_max_logit_diff": reorder_diff}
    base_cost = peft_elastic.subnetwork_cost(model, SUBNETWORKS["maximal"](model))  # the maximal one is base-sized
    figures["base"] = {"loss": base_metrics["base_loss"], "params": base_cost.params, "macs": base_cost.macs}
    print(f"\n{len(space)} groups (rank, MLP width and heads per layer); importance ordering moved the logits by")
    print(f"{reorder_diff:.1e} (a permutation: the model computes what it did)\n")
    header = f"{'subnetwork':<11} {'eval loss':>9} {'MLP width':>9} {'heads':>5} {'params':>10} {'MACs (128 tok)':>15}"
    print(header + f" {'adapter params':>15}")
    print(f"{'base':<11} {figures['base']['loss']:>9.4f} {'':>9} {'':>5} {figures['base']['params']:>10,}")
    for name, pick in SUBNETWORKS.items():
        subnetwork = pick(model)
        cost = peft_elastic.subnetwork_cost(model, subnetwork)
        width = sorted({v for g, v in subnetwork.items() if g.endswith(":width")})
        heads = sorted({v for g, v in subnetwork.items() if g.endswith(":heads")})
        figures[name] = {
            "loss": after[f"eval_{name}_loss"],
            "params": cost.params,
            "macs": cost.macs,
            "adapter_params": peft_elastic.num_adapter_parameters(model, subnetwork),
            "mlp_width": width,
            "heads": heads,
        }
        row = figures[name]
        print(
            f"{name:<11} {row['loss']:>9.4f} {'/'.join(map(str, width)):>9} {'/'.join(map(str, heads)):>5} "
            f"{cost.params:>10,} {cost.macs:>15,} {row['adapter_params']:>15,}"
        )

    # 4. the heuristic subnetwork as a physically smaller model, checked against the super-network
    heuristic = SUBNETWORKS["heuristic"](model)
    peft_elastic.set_subnetwork(model, heuristic)
    expected = logits(model, probe)
    peft_elastic.export_compressed_model(
        model, out / "heuristic-model", heuristic, tokenizer=tokenizer, overwrite=True
    )
    small = peft_elastic.load_compressed_model(out / "heuristic-model")
    saved = json.loads((out / "heuristic-model" / "config.json").read_text())
    compressed = {
        "params": sum(p.numel() for p in small.parameters()),
        "max_logit_diff": float((logits(small, probe) - expected).abs().max()),
        "intermediate_size": saved["intermediate_size"],
        "num_attention_heads": saved["num_attention_heads"],
        "num_key_value_heads": saved["num_key_value_heads"],
        "per_module_shapes": "peft_elastic_shapes" in saved,
    }
    if not compressed["per_module_shapes"]:  # every layer at the same sizes: a standard checkpoint
        plain = AutoModelForCausalLM.from_pretrained(out / "heuristic-model")
        compressed["auto_max_logit_diff"] = float((logits(plain, probe) - expected).abs().max())
    del trainer, model  # the super-network is done with: time the base (as saved, a plain model) against the export
    reference = AutoModelForCausalLM.from_pretrained(out / "reordered-base")
    latency = {"base": [], "small": []}
    for _ in range(3):  # interleaved, the fastest calls: a tiny model's forward takes milliseconds, easily disturbed
        for name, timed in (("base", reference), ("small", small)):
            latency[name].append(peft_elastic.measure_latency(timed, seq_len=128).min)
    compressed["latency_ms"] = {name: 1000 * min(times) for name, times in latency.items()}
    compressed["speedup"] = min(latency["base"]) / min(latency["small"])
    figures["compressed"] = compressed

    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(
        f"\nHeuristic subnetwork exported as a smaller model: {out / 'heuristic-model'} "
        f"({compressed['params']:,} parameters, {compressed['params'] / figures['base']['params']:.1%} of the base; "
        f"intermediate size {compressed['intermediate_size']}, {compressed['num_attention_heads']} heads over "
        f"{compressed['num_key_value_heads']} key/value heads)"
    )
    print(
        f"Reloaded: max logit difference to the super-network {compressed['max_logit_diff']:.1e}; one forward pass "
        f"of 128 tokens {compressed['latency_ms']['small']:.1f} ms, the base's {compressed['latency_ms']['base']:.1f} "
        f"ms ({compressed['speedup']:.2f}x)"
    )
    print(f"Super-adapter: {out / 'super-adapter'} (on the ordered base {out / 'reordered-base'})")
    return figures


if __name__ == "__main__":
    main()
