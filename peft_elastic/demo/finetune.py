"""Fine-tuning and scoring for the demo: TRL's SFTTrainer on prompt/completion pairs (the loss on the completions
only), with a subnetwork per step for elastic adapters, and exact-match accuracy of greedy answers."""

from __future__ import annotations

import dataclasses
import tempfile
import time

from datasets import Dataset
from peft import LoraConfig
from transformers import PrinterCallback
from trl import SFTConfig, SFTTrainer

from ..search.evaluators import ExactMatchEvaluator, LossEvaluator, extract_answer
from ..training import ElasticSFTTrainer, SubnetworkSamplingCallback
from .task import answer_anatomy


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """The same budget for every method: `steps` optimizer steps of `batch_size` problems, AdamW at `learning_rate`
    with warm-up and cosine decay, adapters of rank `r` (elastic ones: `rank_choices` r, 3r/4, r/2).
    `qa_learning_rate`: QA-SparsePEFT's rate (None: `learning_rate`) — its update must reach half a quantization
    step to change a code, which needs a larger rate than float adapters (docs/quantization.md)."""

    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 4e-3
    r: int = 8
    seed: int = 0
    qa_learning_rate: float | None = None

    @property
    def rank_choices(self) -> list[int]:
        return [self.r, 3 * self.r // 4, self.r // 2]


#: Every linear layer of the decoder blocks, as in the papers' recipes.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(settings: FinetuneSettings) -> LoraConfig:
    """Stock PEFT LoRA: the baseline of both tables."""
    return LoraConfig(r=settings.r, lora_alpha=2 * settings.r, target_modules=TARGETS, task_type="CAUSAL_LM")


def finetune(
    model, peft_config, tokenizer, rows: list[dict[str, str]], settings: FinetuneSettings, strategy=None, log=print
):
    """Fine-tune `model` with `peft_config` on `rows` (prompt/completion dicts) and return the PeftModel, in eval mode.
    With `strategy` (a sampler name), a new subnetwork per optimizer step (`ElasticSFTTrainer`); without it, plain
    `SFTTrainer`. Logs one line: steps, time and the training loss at the first and last logging step."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=settings.steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, settings.steps // 20),
            weight_decay=0.0,
            max_length=128,
            seed=settings.seed,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to=[],
            logging_steps=max(1, settings.steps // 5),
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        options = dict(args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        if strategy is None:
            trainer = SFTTrainer(model=model, peft_config=peft_config, **options)
        else:
            callback = SubnetworkSamplingCallback(strategy=strategy, seed=settings.seed)
            trainer = ElasticSFTTrainer(model=model, peft_config=peft_config, callbacks=[callback], **options)
        trainer.remove_callback(PrinterCallback)  # the demo prints one line per run instead of every log
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    log(
        f"    {type(peft_config).__name__}: {settings.steps} steps at learning rate {settings.learning_rate:g} in "
        f"{time.perf_counter() - start:.0f} s, training "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return trainer.model.eval()


def accuracy_of(rows: list[dict[str, str]], tokenizer) -> ExactMatchEvaluator:
    """Exact match of the number after "####" in a greedy answer of at most 32 tokens."""
    return ExactMatchEvaluator(rows, tokenizer, answer_column="completion", max_new_tokens=32, batch_size=64)


@dataclasses.dataclass
class Score:
    """A model's test accuracy, its per-problem hits (for bootstrap intervals), and its perplexity on held-out real
    text (None when the run does not measure it)."""

    accuracy: float
    hits: list[bool]
    perplexity: float | None = None
    #: Where the answers go wrong (`task.answer_anatomy`): formatted, steps, operands, arithmetic, right.
    anatomy: dict[str, float] | None = None

    def summary(self) -> str:
        """The accuracy, and what the answers got right on the way: "8.5% (format 97%, operands 90%, sums 12%)"."""
        text = f"{self.accuracy:.1%}"
        if self.anatomy is not None:
            a = self.anatomy
            text += f" (format {a['formatted']:.0%}, operands {a['operands']:.0%}, sums {a['arithmetic']:.0%})"
        if self.perplexity is not None:
            text += f", perplexity {self.perplexity:.2f}"
        return text


class Scoring:
    """Scores models on the test split (`score`) and on the validation split (`validation`, the search's metric), and
    with `perplexity_samples` > 0 their perplexity on held-out pydoc text (never used for calibration or training)."""

    def __init__(self, data: dict, tokenizer, perplexity_samples: int = 0, perplexity_length: int = 256) -> None:
        self.problems = data["test"]
        self.test = accuracy_of(data["test"], tokenizer)
        self.validation = accuracy_of(data["validation"], tokenizer)
        self.perplexity = None
        if perplexity_samples:
            from ..text import pydoc_texts

            self.perplexity = LossEvaluator(
                pydoc_texts("heldout"),
                tokenizer,
                max_length=perplexity_length,
                num_samples=perplexity_samples,
                batch_size=4,
                perplexity=True,
            )

    def score(self, model) -> Score:
        accuracy = self.test(model)
        hits = [
            extract_answer(text) == answer
            for text, answer in zip(self.test.last_completions, self.test.answers, strict=True)
        ]
        anatomy = answer_anatomy(self.problems, self.test.last_completions)
        return Score(accuracy, hits, None if self.perplexity is None else self.perplexity(model), anatomy)
