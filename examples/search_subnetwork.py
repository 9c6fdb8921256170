"""Search a trained super-adapter for Pareto-optimal subnetworks (validation metric vs cost), pick one, export it.

The recipe: train a super-adapter (or load one with `--adapter`), then `run_search` over its subnetworks — the
maximal, heuristic and minimal ones first, then `--trials` in all with NSGA-II, multi-objective TPE, random search or
hill-climbing — measuring each on a validation split (`LossEvaluator`, or `ExactMatchEvaluator` for the greedily
generated answers) against its cost: the deployed parameters or MACs (Mode B, where a subnetwork is a smaller model)
or the adapter parameters (Mode A, where every subnetwork deploys at the base's size). From the Pareto front it takes
the cheapest subnetwork within `--max-metric-drop` of the maximal one (the LoNAS rule, `SearchResult.best`), reports
it on a separate test split, and exports it: as a stock PEFT LoRA adapter (Mode A, `export_sub_adapter`) or as a
physically smaller model (Mode B, `export_compressed_model`), reloaded and checked against the super-network.

    python examples/search_subnetwork.py [--model MODEL_ID_OR_PATH] [--adapter PATH | --mode A|B --steps 40]
        [--strategy nsga2|tpe|random|hill_climb|heuristic] [--trials 30] [--metric loss|exact_match]
        [--cost params|macs|adapter_params|latency] [--max-metric-drop 0.01] [--output-dir out/search] [--seed 0]

By default everything is offline: a tiny Llama built from a config, a tokenizer trained here and toy arithmetic
data; `--model` uses a real causal LM. `--adapter` takes an elastic adapter folder (ElasticLoraConfig or NLSConfig,
with its tokenizer unless `--model` has one) of the base `--model`; the default base is the tiny Llama this script
trains. An adapter from `examples/lonas_mode_b.py` belongs to its importance-ordered base:

    python examples/search_subnetwork.py --model out/lonas/reordered-base --adapter out/lonas/super-adapter

Writes to the output directory: `result.json` (every trial; `SearchResult.load`), `pareto_front.json`, `best.json`,
`search.png`, `super-adapter` (when trained here), `best-lora` (Mode A) or `best-model` (Mode B), `figures.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoTokenizer
from trl import SFTConfig

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.search import SEARCH_COSTS, SEARCH_STRATEGIES, ExactMatchEvaluator, LossEvaluator, run_search
from peft_elastic.toy import arithmetic_problems, tiny_llama, train_tokenizer
from peft_elastic.training import ElasticSFTTrainer, SubnetworkSamplingCallback
from peft_elastic.tuners.elastic_lora.space import sizes_at_most

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WIDTHS = [1.0, 0.75, 0.5]  # Mode B: fractions of each layer's MLP intermediate size (see mode_b_choices)
HEADS = [1.0, 0.75, 0.5]  # and of each attention block's query heads (whole key/value groups)
NAMED = {
    "maximal": peft_elastic.maximal_subnetwork,
    "heuristic": peft_elastic.heuristic_subnetwork,
    "minimal": peft_elastic.minimal_subnetwork,
}


def make_dataset(n: int, seed: int) -> Dataset:
    """Prompt-completion pairs ("Q:12+7=?A:" -> "19")."""
    return Dataset.from_list(arithmetic_problems(n, seed=seed))


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


def adapter_mode(path: Path) -> str:
    """ "B" when the adapter's config makes widths, heads or blocks elastic, else "A" (ranks only)."""
    config = json.loads((path / "adapter_config.json").read_text())
    return "B" if any(config.get(k) for k in ("width_choices", "head_choices", "droppable_layers")) else "A"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="a hub id, a local folder, a .gguf file or 'smollm2' (default: a tiny Llama)"
    )
    parser.add_argument("--adapter", default=None, help="a trained elastic adapter folder (default: train one here)")
    parser.add_argument(
        "--mode", default=None, choices=["A", "B"], help="the adapter to train: A ranks, B ranks+widths (default: B)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps, without --adapter (default: 40)")
    parser.add_argument("--rank", type=int, default=8, help="maximal rank r when training (default: 8)")
    parser.add_argument(
        "--strategy", default="nsga2", choices=SEARCH_STRATEGIES, help="search strategy (default: nsga2)"
    )
    parser.add_argument("--trials", type=int, default=30, help="subnetworks to evaluate (default: 30)")
    parser.add_argument("--metric", default="loss", choices=["loss", "exact_match"], help="validation metric")
    parser.add_argument(
        "--cost", default=None, choices=SEARCH_COSTS, help="default: params (Mode B), adapter_params (A)"
    )
    parser.add_argument("--max-metric-drop", type=float, default=0.01, help="relative drop allowed (default: 0.01)")
    parser.add_argument("--storage", default=None, help="an optuna storage URL to keep (and resume) the search in")
    parser.add_argument("--output-dir", default="out/search", help="where to write (default: out/search)")
    parser.add_argument("--seed", type=int, default=0, help="data, training and search seed (default: 0)")
    args = parser.parse_args(argv)
    if args.adapter is not None:
        if not (Path(args.adapter) / "adapter_config.json").is_file():
            parser.error(f"--adapter {args.adapter!r} is not an adapter folder (no adapter_config.json)")
        if args.mode is not None or args.steps is not None:
            parser.error("--mode and --steps are for training a super-adapter; --adapter loads a trained one")
        args.mode = adapter_mode(Path(args.adapter))
    args.mode = args.mode or "B"
    args.steps = 40 if args.steps is None else args.steps
    args.cost = args.cost or ("params" if args.mode == "B" else "adapter_params")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.rank < 2:
        parser.error(f"--rank must be at least 2 (so that r/2 >= 1), got {args.rank}")
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    if not 0 <= args.max_metric_drop < 1:
        parser.error(f"--max-metric-drop is a relative drop in [0, 1), got {args.max_metric_drop}")
    if args.mode == "A" and args.cost in ("params", "macs"):
        parser.error(f"--cost {args.cost} is the same for every Mode A subnetwork (ranks only); use adapter_params")
    return args


def load_base(args, tokenizer):
    if args.model:
        return peft_elastic.load_causal_lm(args.model)[0]  # float32
    # 8 query heads over 4 key/value heads of 12 channels (head choices 8, 6, 4 in Mode B)
    return tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_attention_heads=8,
        num_key_value_heads=4,
        seed=args.seed,
    )


def train_super_adapter(args, base, tokenizer, train: Dataset, out: Path) -> PeftModel:
    """Fine-tune an elastic super-adapter (Mode A: ranks; Mode B: ranks, MLP widths and heads) and save it."""
    r = args.rank
    widths = mode_b_choices(base.config) if args.mode == "B" else {}
    config = ElasticLoraConfig(
        r=r,
        lora_alpha=2 * r,
        rank_choices=sorted({r, 3 * r // 4, r // 2}, reverse=True),
        target_modules=TARGETS,
        **widths,
    )
    torch.manual_seed(args.seed)
    trainer = ElasticSFTTrainer(
        model=base,
        args=SFTConfig(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            logging_steps=max(1, args.steps // 4),
            save_strategy="no",
            report_to=[],
            max_length=32,
            bf16=False,
            seed=args.seed,
            disable_tqdm=True,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SubnetworkSamplingCallback(strategy="random", seed=args.seed)],
    )
    trainer.train()
    trainer.save_model(str(out / "super-adapter"))
    return trainer.model


def make_evaluator(metric: str, data: Dataset, tokenizer):
    if metric == "loss":  # mean loss per predicted token of "prompt + completion"
        texts = [row["prompt"] + row["completion"] for row in data]
        return LossEvaluator(texts, tokenizer, max_length=64, batch_size=16)
    return ExactMatchEvaluator(data, tokenizer, answer_column="completion", max_new_tokens=4, batch_size=32)


def amount(cost: float) -> str:
    """A count with thousands separators ("143,328"), a latency in seconds with 4 significant digits."""
    return f"{int(cost):,}" if float(cost).is_integer() else f"{cost:.4g}"


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    train, validation, test = (make_dataset(n, args.seed + i) for i, n in enumerate((512, 64, 64)))
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(peft_elastic.resolve_model(args.model))
    elif args.adapter and (Path(args.adapter) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(args.adapter)  # the tokenizer the adapter was trained with
    else:
        # learned on prompts and completions apart: no token spans the boundary, so a prompt tokenizes as it does
        # in training (generation for exact match starts from it)
        tokenizer = train_tokenizer([*train["prompt"], *train["completion"]], vocab_size=96)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if args.adapter:
        model = PeftModel.from_pretrained(load_base(args, tokenizer), args.adapter)
    else:
        model = train_super_adapter(args, load_base(args, tokenizer), tokenizer, train, out)
    model.eval()

    # the search: on the validation split, the maximal, heuristic and minimal subnetworks first
    evaluate = make_evaluator(args.metric, validation, tokenizer)
    result = run_search(
        model, evaluate, strategy=args.strategy, cost=args.cost, n_trials=args.trials, seed=args.seed,
        storage=args.storage, progress=False,
    )  # fmt: skip
    front = result.pareto_front()
    best = result.best(max_metric_drop=args.max_metric_drop)
    result.save(out / "result.json")
    (out / "pareto_front.json").write_text(json.dumps(front, indent=1))
    (out / "best.json").write_text(json.dumps(best, indent=1))
    result.plot_progression(out / "search.png")

    named = {name: json.dumps(pick(model), sort_keys=True) for name, pick in NAMED.items()}
    labels = {}
    for trial in result.complete():
        key = json.dumps(trial["subnetwork"], sort_keys=True)
        labels[trial["number"]] = [name for name, value in named.items() if value == key]
    labels[best["number"]] = [*labels[best["number"]], "best"]
    better = "lower" if result.direction == "minimize" else "higher"
    print(
        f"\n{len(result.trials)} trials ({result.timing['evaluations']} evaluated), {args.strategy}; "
        f"{len(front)} on the Pareto front of validation {args.metric} ({better} is better) vs {args.cost}:"
    )
    print(f"{'trial':>5} {args.cost:>15} {args.metric:>11}  subnetwork")
    for trial in front:
        names = ", ".join(labels[trial["number"]])
        print(f"{trial['number']:>5} {amount(trial['cost']):>15} {trial['metric']:>11.4f}  {names}")

    # the chosen subnetwork on the test split, against the maximal and heuristic ones
    scored = make_evaluator(args.metric, test, tokenizer)
    picks = {"maximal": NAMED["maximal"](model), "heuristic": NAMED["heuristic"](model), "best": best["subnetwork"]}
    figures: dict = {
        "mode": args.mode,
        "strategy": args.strategy,
        "metric": args.metric,
        "cost": args.cost,
        "trials": len(result.trials),
        "evaluations": result.timing["evaluations"],
        "front": [{k: t[k] for k in ("number", "metric", "cost", "subnetwork")} for t in front],
        "best": {k: best[k] for k in ("number", "metric", "cost", "subnetwork")},
        "test": {},
    }
    for name, subnetwork in picks.items():
        peft_elastic.set_subnetwork(model, subnetwork)
        figures["test"][name] = scored(model)
    drop = f"within {args.max_metric_drop:.1%} of the maximal subnetwork"
    print(f"\nBest ({drop}): trial {best['number']}, {args.cost} {amount(best['cost'])}")
    print(f"test {args.metric}: " + ", ".join(f"{name} {value:.4f}" for name, value in figures["test"].items()))

    # export the chosen subnetwork, reload it and compare with the super-network at that subnetwork
    peft_elastic.set_subnetwork(model, best["subnetwork"])
    probe = tokenizer([row["prompt"] + row["completion"] for row in test][:8], return_tensors="pt", padding=True)
    expected = logits(model, probe)
    if args.mode == "A":
        target = peft_elastic.export_sub_adapter(model, out / "best-lora", best["subnetwork"], overwrite=True)
        reloaded = PeftModel.from_pretrained(load_base(args, tokenizer), target)  # stock PEFT LoRA
        kind = "a stock LoRA adapter"
    else:
        target = peft_elastic.export_compressed_model(
            model, out / "best-model", best["subnetwork"], tokenizer=tokenizer, overwrite=True
        )
        reloaded = peft_elastic.load_compressed_model(target)
        figures["export_params"] = sum(p.numel() for p in reloaded.parameters())
        kind = f"a model of {figures['export_params']:,} parameters"
    figures["export_max_logit_diff"] = float((logits(reloaded, probe) - expected).abs().max())
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(f"Exported as {kind}: {target} (max logit difference {figures['export_max_logit_diff']:.1e})")
    return figures


if __name__ == "__main__":
    main()
