"""`peft-elastic train`: an elastic adapter trained with `ElasticSFTTrainer` (TRL's `SFTTrainer`)."""

from __future__ import annotations

import argparse
import tempfile

from ..choices import SAMPLERS, TUNERS
from . import inputs
from .arguments import add_bf16, add_dataset, add_io, add_verbose, floats, ints, names, positive_float, positive_int
from .inputs import CommandError, compute_dtype, first_line, load_columns, output_folder


def adapter_config(args: argparse.Namespace):
    """The tuner config the `train` arguments describe (its own checks raise clear ValueErrors)."""
    from ..tuners import ElasticLoraConfig, NLSConfig, SparsePEFTConfig

    config_class = {"nls": NLSConfig, "elastic-lora": ElasticLoraConfig, "sparse-peft": SparsePEFTConfig}[args.method]
    if args.quantization_aware and args.method != "sparse-peft":
        raise CommandError(
            f"--quantization-aware is QA-SparsePEFT: use it with --method sparse-peft, not {args.method}"
        )
    if args.width_choices is not None and args.method != "elastic-lora":
        raise CommandError(f"--width-choices is Mode B: use it with --method elastic-lora, not {args.method}")
    options = {"r": args.r, "lora_alpha": args.lora_alpha if args.lora_alpha is not None else 2 * args.r}
    if args.rank_choices is not None:
        options["rank_choices"] = args.rank_choices
    if args.target_modules is not None:
        options["target_modules"] = args.target_modules
    if args.width_choices is not None:
        options["width_choices"] = args.width_choices
    if args.quantization_aware:
        options["quantization_aware"] = True
    try:
        return config_class(**options)
    except TypeError as error:  # an option this tuner does not have
        raise CommandError(f"--method {args.method}: {first_line(error)}") from None


#: `train`'s default learning rate for float adapters (QA-SparsePEFT: `QA_LEARNING_RATE`).
LEARNING_RATE = 3e-4


def learning_rate(args: argparse.Namespace) -> float:
    """--learning-rate, or its default: 3e-4, and for --quantization-aware the QA-SparsePEFT rate (an update must
    reach half a quantization step to change a code; docs/quantization.md)."""
    from ..tuners.sparse_peft.monitor import QA_LEARNING_RATE

    if args.learning_rate is not None:
        return args.learning_rate
    return QA_LEARNING_RATE if args.quantization_aware else LEARNING_RATE


def run(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from ..training import ElasticSFTTrainer, SubnetworkSamplingCallback

    config = adapter_config(args)
    if args.completion_column is None:
        data = load_columns(args.dataset, [(args.text_column, "--text-column")], args.split)
        rows = [{"text": str(text)} for text in data[args.text_column]]
    else:
        columns = [(args.text_column, "--text-column"), (args.completion_column, "--completion-column")]
        data = load_columns(args.dataset, columns, args.split)
        rows = [{"prompt": str(row[args.text_column]), "completion": str(row[args.completion_column])} for row in data]
    model, tokenizer = inputs.load_model(args.model, dtype=compute_dtype(args), verbose=args.verbose)
    with output_folder(args.output, args.overwrite) as folder, tempfile.TemporaryDirectory() as scratch:
        trainer = ElasticSFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=scratch,  # checkpoints are not kept: OUTPUT gets the trained adapter
                max_steps=args.max_steps,
                per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                learning_rate=learning_rate(args),
                max_length=args.max_length,
                seed=args.seed,
                bf16=args.bf16,
                use_cpu=args.bf16 and not torch.cuda.is_available(),  # transformers refuses bf16 on CPU otherwise
                report_to=[],
                save_strategy="no",
                logging_steps=max(1, args.max_steps // 10),
                disable_tqdm=args.quiet,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=config,
            callbacks=[SubnetworkSamplingCallback(strategy=args.sampler, seed=args.seed)],
        )
        output = trainer.train()
        trainer.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    print(
        f"{args.output}: {type(config).__name__} adapter trained {output.global_step} steps ({args.sampler} "
        f"subnetworks), mean training loss {output.training_loss:.4f}"
    )


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="fine-tune an elastic adapter (NLS, ElasticLoRA, SparsePEFT) with TRL's SFTTrainer",
        description="Train a super-adapter on MODEL with TRL's SFTTrainer, a different subnetwork per optimizer "
        "step (--sampler), and save the adapter (and tokenizer) to OUTPUT. Texts come from --text-column, or "
        "prompt/completion pairs from --text-column and --completion-column (the loss on completions only).",
    )
    add_io(parser)
    add_dataset(parser, "the training data", required=True, text_help="the texts, or the prompts",
                 num_samples=None)  # fmt: skip
    parser.add_argument("--completion-column", help="the completions: train on prompt/completion pairs")
    parser.add_argument("--method", choices=TUNERS, default="nls", help="the tuner (default: nls, Shears)")
    parser.add_argument("--r", type=positive_int, default=32, help="the maximal rank (default 32)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 r)")
    parser.add_argument(
        "--rank-choices", type=ints, help="comma-separated ranks, e.g. 32,24,16 (default: the tuner's)"
    )
    parser.add_argument("--target-modules", type=names, help="comma-separated module names (default: the tuner's)")
    parser.add_argument("--width-choices", type=floats, help="Mode B, elastic-lora only: e.g. 1.0,0.75,0.5")
    parser.add_argument("--quantization-aware", action="store_true", help="sparse-peft on a GPTQ model: QA-SparsePEFT")
    parser.add_argument("--sampler", choices=SAMPLERS, default="random", help="default: random")
    parser.add_argument("--max-steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    parser.add_argument(
        "--learning-rate", type=positive_float, help="default: 3e-4; 2e-3 with --quantization-aware (QA-SparsePEFT)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="per device (default 8)")
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, help="default: 1")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    add_bf16(parser, "train with bfloat16 mixed precision")
    add_verbose(parser)
    parser.set_defaults(run=run)
