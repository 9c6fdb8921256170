"""The SQFT / Shears table (Table 2 of the papers, in shape): one 50 %-sparse base, fine-tuned by each method with the
same budget, scored on the test split (and, with a real model, by perplexity on held-out text).

| method                 | base                       | adapter                         | deployed as               |
| w/o tune (dense)       | the pre-trained base       | none                            | FP32                      |
| w/o tune (sparse)      | 50 % Wanda                 | none                            | FP32                      |
| LoRA                   | 50 % Wanda                 | stock PEFT LoRA                 | FP32 base + FP32 adapter  |
| LoRA, re-pruned        | 50 % Wanda                 | LoRA merged, pruned again (50 %)| FP32, sparse              |
| Shears                 | 50 % Wanda                 | NLS, heuristic subnetwork       | FP32 base + FP32 adapter  |
| SQFT + SparsePEFT      | 50 % Wanda                 | SparsePEFT, heuristic, merged   | FP32, sparse              |
| SQFT                   | 50 % Wanda, GPTQ INT4      | NLS, heuristic subnetwork       | INT4 base + FP32 adapter  |
| SQFT + QA-SparsePEFT   | 50 % Wanda, GPTQ INT4      | QA-SparsePEFT, heuristic, merged| INT4, sparse              |

"Sparsity" is the fraction of zero weights in the decoder's linear layers of the model as deployed; "after merge" is
what `merge_and_unload()` leaves (LoRA and Shears adapters are dense: merging them fills the zeros).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTQConfig

from ..quantization import quantize_gptq
from ..quantization.layers import eager_dequantization
from ..sparsity import measure_sparsity, save_sparsified, sparsify
from ..subnetwork import heuristic_subnetwork, set_subnetwork
from ..tuners.nls import NLSConfig
from ..tuners.sparse_peft import SparsePEFTConfig
from ..tuners.sparse_peft.monitor import codes_changed
from .base import Stopwatch, load_base
from .finetune import TARGETS, FinetuneSettings, Scoring, finetune, lora_config

#: GPTQ bits of the INT4 rows; the group size is a setting (32 for the demo's layers of 128-384 inputs).
BITS = 4


@dataclasses.dataclass
class Row:
    """One line of a table."""

    key: str  # dense, sparse, lora, lora_repruned, shears, sparse_peft, sqft, qa_sparse_peft
    method: str
    accuracy: float
    sparsity: float
    merged_sparsity: float | None  # None: not mergeable (an FP adapter on an INT4 base)
    precision: str
    hits: list[bool] = dataclasses.field(default_factory=list, repr=False)  # per test problem
    perplexity: float | None = None
    seconds: float = 0.0  # the pipeline's wall time (fine-tuning, merging, quantizing and scoring)
    codes_changed: float | None = None  # QA-SparsePEFT: the fraction of INT4 codes its merge changed
    anatomy: dict[str, float] | None = None  # where the answers go wrong (task.answer_anatomy)


def load_gptq(path: Path):
    """A GPTQ checkpoint on CPU with the standard-layout torch kernel, computing in float32, its dequantization eager
    (compiling it costs the first run minutes and saves nothing on layers this small: `eager_dequantization`)."""
    config = GPTQConfig(bits=BITS, backend="gptq_torch")
    with warnings.catch_warnings():  # transformers warns that our backend overrides the checkpoint's: we mean it
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=torch.float32, device_map="cpu"
        )
    eager_dequantization(model)
    return model


def elastic(config_class, settings: FinetuneSettings, **options):
    return config_class(
        r=settings.r, lora_alpha=2 * settings.r, rank_choices=settings.rank_choices, target_modules=TARGETS, **options
    )


def heuristic(model):
    """`model` with its heuristic (midpoint) subnetwork active, as Shears and SQFT evaluate."""
    set_subnetwork(model, heuristic_subnetwork(model))
    return model


def prune(model, calibration: list[str], tokenizer):
    """The table's sparse base: 50 % Wanda, calibrated on `calibration` (in place); returns the sparsity report."""
    return sparsify(model, calibration, "wanda", 0.5, tokenizer=tokenizer, max_length=128, progress=False)


def sqft_table(
    base_dir: Path,
    data: dict,
    settings: FinetuneSettings,
    scoring: Scoring,
    calibration: list[str],
    out: Path,
    log=print,
    group_size: int = 32,
) -> list[Row]:
    """Run every pipeline of the table; artefacts go to `out` (the sparse base, its INT4 version, the adapters and
    the merged models). `calibration`: the texts of Wanda and GPTQ. Returns the rows in the table's order."""
    model, tokenizer = load_base(base_dir)
    rows: list[Row] = []
    stopwatch = Stopwatch()

    def add(key, method, model, sparsity, merged_sparsity, precision) -> Row:
        score = scoring.score(model)
        row = Row(key, method, score.accuracy, sparsity, merged_sparsity, precision, score.hits, score.perplexity)
        row.seconds = round(stopwatch.lap(), 1)
        row.anatomy = score.anatomy
        rows.append(row)
        log(f"  {row.method}: {score.summary()} ({row.seconds:.0f} s)")
        return row

    def tune(base, config, strategy="random", budget=settings):
        """Fine-tune on the training split; elastic adapters come back at their heuristic subnetwork."""
        tuned = finetune(base, config, tokenizer, data["train"], budget, strategy, log)
        return tuned if strategy is None else heuristic(tuned)

    def sparse_base():
        return load_base(out / "sparse-base")[0]

    add("dense", "w/o tune (dense)", model, measure_sparsity(model).sparsity, None, "FP32")
    report = prune(model, calibration, tokenizer)
    save_sparsified(model, out / "sparse-base", report, tokenizer)
    add("sparse", "w/o tune (50% Wanda)", model, report.sparsity, None, "FP32")

    lora = tune(sparse_base(), lora_config(settings), strategy=None)
    merged = _deployed_unmerged(add, "lora", "LoRA", lora, report.sparsity, "FP32 + FP32")
    repruned = prune(merged, calibration, tokenizer)  # SparsePEFT's baseline: merge LoRA, then prune again
    add("lora_repruned", "LoRA merged, re-pruned to 50%", merged, repruned.sparsity, repruned.sparsity, "FP32")

    shears = tune(sparse_base(), elastic(NLSConfig, settings))
    shears.save_pretrained(out / "shears-nls-adapter")
    _deployed_unmerged(add, "shears", "Shears (NLS, heuristic)", shears, report.sparsity, "FP32 + FP32")

    merged = tune(sparse_base(), elastic(SparsePEFTConfig, settings)).merge_and_unload()
    save_sparsified(merged, out / "sqft-sparsepeft-merged", tokenizer=tokenizer)
    sparsity = measure_sparsity(merged).sparsity
    add("sparse_peft", "SQFT + SparsePEFT (merged)", merged, sparsity, sparsity, "FP32")

    options = {"bits": BITS, "group_size": group_size, "tokenizer": tokenizer, "max_length": 128}
    quantized = quantize_gptq(out / "sparse-base", out / "sparse-int4", calibration, **options)
    log(f"  {quantized}")
    int4 = load_gptq(out / "sparse-int4")
    int4_sparsity = measure_sparsity(int4).sparsity
    sqft = tune(int4, elastic(NLSConfig, settings))
    sqft.save_pretrained(out / "sqft-int4-nls-adapter")
    add("sqft", "SQFT (INT4 + FP adapter)", sqft, int4_sparsity, None, "INT4 + FP32")

    qa_budget = dataclasses.replace(settings, learning_rate=settings.qa_learning_rate or settings.learning_rate)
    qa_config = elastic(SparsePEFTConfig, settings, quantization_aware=True)
    qa = tune(load_gptq(out / "sparse-int4"), qa_config, budget=qa_budget)
    changes = codes_changed(qa)  # what the merge writes: nothing, if the rate left the update under half a step
    log(f"    QA-SparsePEFT at learning rate {qa_budget.learning_rate:g}: {changes}")
    qa.merge_and_unload().save_pretrained(out / "sqft-qa-int4-merged")
    tokenizer.save_pretrained(out / "sqft-qa-int4-merged")
    merged = load_gptq(out / "sqft-qa-int4-merged")  # scored as reloaded: the checkpoint is the deliverable
    sparsity = measure_sparsity(merged).sparsity
    add("qa_sparse_peft", "SQFT + QA-SparsePEFT (merged)", merged, sparsity, sparsity, "INT4")
    rows[-1].codes_changed = changes.fraction
    (out / "table2.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    return rows


def _deployed_unmerged(add, key: str, method: str, model, sparsity: float, precision: str):
    """Score a dense adapter on the frozen sparse base (of `sparsity`), deployed unmerged since merging fills the
    zeros; the row's "after merge" is measured on the merged model, which is returned."""
    row = add(key, method, model, sparsity, None, precision)
    merged = model.merge_and_unload()
    row.merged_sparsity = measure_sparsity(merged).sparsity
    return merged
