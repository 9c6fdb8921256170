"""The offline demo: the papers' two tables, in shape, on a model this package pre-trains itself — or on a real
pretrained model (`--model smollm2`, a hub id, a folder or a .gguf file).

    peft-elastic demo [--quick] [--model M] [--output DIR] [--cache-dir DIR]   (or: python -m peft_elastic.demo ...)

1. A small Llama (about 0.85M parameters) is pre-trained on a synthetic corpus of arithmetic (`task.py`), once, and
   cached under the user's cache directory (`base.py`).
2. Table 2 (SQFT / Shears): the base is pruned to 50 % with Wanda, then fine-tuned on GSM8K-shaped word problems by
   LoRA, Shears (NLS), SQFT + SparsePEFT (merged), SQFT (an NLS adapter on the GPTQ INT4 base) and SQFT +
   QA-SparsePEFT (merged into INT4), all with the same budget (`sqft.py`).
3. Table 1 (LoNAS): Mode B on the dense base against LoRA: the heuristic subnetwork and two found by NSGA-II on the
   validation split, exported as smaller models, with parameters, MACs and measured CPU speedup (`lonas.py`).

Accuracy is the exact match of the number after "####" in greedy answers on the test split, which nothing is tuned
or selected on, with its 95 % bootstrap interval over the test problems; the findings say "within noise" where an
interval straddles the papers' claim. Nothing is downloaded. `--quick` runs the same pipelines with tiny budgets (a
smoke test: its accuracies mean nothing).

With a real model (`REAL` budgets), step 1 is skipped, Wanda, GPTQ and the importance ordering are calibrated on
real English text (the standard library's pydoc topics, `peft_elastic.text`), and every row also gets its
perplexity on held-out pydoc text that nothing is calibrated or trained on.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from ..models import resolve_model
from ..text import pydoc_texts
from ..tuners.sparse_peft.monitor import QA_LEARNING_RATE
from .base import BaseSettings, default_cache_dir, is_cached, pretrained_base
from .finetune import FinetuneSettings, Scoring
from .lonas import SearchSettings, lonas_table
from .sqft import sqft_table
from .tables import findings, lonas_markdown, sqft_markdown
from .task import splits

__all__ = ["FULL", "QUICK", "REAL", "REAL_QUICK", "DemoSettings", "default_cache_dir", "run"]


#: `DemoSettings.training_noise` of the demo's own base and budgets. Measured: the standard deviation of SQFT +
#: SparsePEFT's accuracy minus re-pruned LoRA's over 3 fine-tuning seeds x 2 CPU code paths (native AVX2 and
#: portable, 2400-step bases; benchmarks/demo_robustness.py, RESULTS.md): 0.37 points (on an AVX-512 machine's
#: 1800-step bases, 2.1); the only comparison of the tables whose effect sits within training noise.
TRAINING_NOISE = {"sparse_peft - lora_repruned": 0.0037}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every budget of a demo run."""

    base: BaseSettings = BaseSettings()
    n_train: int = 2000
    n_validation: int = 200
    n_test: int = 500
    finetune: FinetuneSettings = FinetuneSettings()
    search: SearchSettings = SearchSettings()
    #: "task": Wanda, GPTQ and the importance ordering read training problems; "pydoc": real English text.
    calibration: str = "task"
    calibration_samples: int = 128
    #: Held-out pydoc texts (of at most 256 tokens) of the perplexity column; 0: no perplexity (the demo's own base
    #: has a tokenizer of arithmetic only).
    perplexity_samples: int = 0
    gptq_group_size: int = 32
    #: Run-to-run standard deviations of compared quantities ("a - b": accuracy of row a minus row b's), which the
    #: bootstrap over test problems does not see; the findings widen those claims' intervals by them (`tables.py`).
    #: Empty: none measured for these budgets.
    training_noise: dict[str, float] = dataclasses.field(default_factory=dict)


FULL = DemoSettings(training_noise=dict(TRAINING_NOISE))
QUICK = DemoSettings(
    base=BaseSettings(steps=30, batch_size=16),
    n_train=128,
    n_validation=16,
    n_test=24,
    finetune=FinetuneSettings(steps=4, batch_size=8),
    search=SearchSettings(steps=4, trials=4, latency_rounds=2),
)
#: A real pretrained model (SmolLM2-135M-Instruct: 30 layers, hidden 576): budgets that fit an hour on 2 CPU cores
#: (measured: 49 minutes, 53 with benchmarks/real_llm.py's step timing; every method the same fine-tuning budget; a
#: GPU runs it in minutes, and larger budgets there). Groups of 64 divide 576 and 1536.
REAL = DemoSettings(
    n_train=640,
    n_validation=32,
    n_test=64,
    finetune=FinetuneSettings(steps=16, batch_size=8, learning_rate=1e-3, r=8, qa_learning_rate=QA_LEARNING_RATE),
    search=SearchSettings(steps=16, trials=8, latency_rounds=5),
    calibration="pydoc",
    calibration_samples=32,
    perplexity_samples=12,
    gptq_group_size=64,
)
REAL_QUICK = dataclasses.replace(
    REAL,
    n_train=32,
    n_validation=4,
    n_test=8,
    finetune=FinetuneSettings(steps=2, batch_size=2, learning_rate=1e-3, r=8, qa_learning_rate=QA_LEARNING_RATE),
    search=SearchSettings(steps=2, trials=3, latency_rounds=1),
    calibration_samples=4,
    perplexity_samples=2,
)


def _intervals(settings: DemoSettings) -> str:
    measured = {key: sd for key, sd in settings.training_noise.items() if sd > 0}
    if not measured:
        return "95% bootstrap intervals over the test problems"
    widened = "; ".join(f"{key}: {sd:.2%}" for key, sd in measured.items())
    return (
        "95% bootstrap intervals over the test problems, widened where the run-to-run standard deviation of the "
        f"compared quantity was measured ({widened})"
    )


def calibration_texts(settings: DemoSettings, data: dict) -> list[str]:
    """The texts Wanda, GPTQ and the importance ordering read: real English (pydoc) or the first training problems."""
    if settings.calibration == "pydoc":
        return pydoc_texts("calibration")[: settings.calibration_samples]
    return [p["prompt"] + p["completion"] for p in data["train"][: settings.calibration_samples]]


def run(settings: DemoSettings, output_dir: Path, cache_dir: Path, log=print, model: str | None = None) -> dict:
    """Run the demo; print its progress and tables with `log`; write `tables.md` and `results.json` (and every
    model and adapter it made) to `output_dir`. `model`: a real model to run the pipelines on (a hub id, a folder, a
    .gguf file or "smollm2"; None: the demo's own pre-trained base). Returns the results (tables as lists of dicts,
    findings, the seconds of each stage, the peak memory)."""
    start = time.perf_counter()
    data = splits(settings.n_train, settings.n_validation, settings.n_test, seed=settings.base.seed)
    if model is None:
        held_out = {p["prompt"] for split in ("validation", "test") for p in data[split]}
        cached = is_cached(settings.base, cache_dir)
        base_dir = pretrained_base(settings.base, held_out, cache_dir, log)
        source = {"pretraining": json.loads((base_dir / "pretraining.json").read_text())}
    else:
        cached = None
        base_dir = Path(resolve_model(model, cache_dir))
        config = AutoConfig.from_pretrained(base_dir)
        log(f"Base: {model} ({config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size})")
        source = {"model": model, "folder": str(base_dir)}
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:  # batches are padded
        tokenizer.pad_token = tokenizer.eos_token
    scoring = Scoring(data, tokenizer, settings.perplexity_samples)
    calibration = calibration_texts(settings, data)
    stages = {"setup": round(time.perf_counter() - start, 1)}

    log(f"\nTable 2 pipelines (50% Wanda sparsity; {settings.finetune.steps} fine-tuning steps each):")
    sqft = sqft_table(
        base_dir, data, settings.finetune, scoring, calibration, output_dir, log, settings.gptq_group_size
    )
    stages |= {f"table2 {row.key}": row.seconds for row in sqft}
    log(f"\nTable 1 pipelines (Mode B on the dense base; super-network {settings.search.steps} steps):")
    clock = time.perf_counter()
    lonas = lonas_table(base_dir, data, settings.finetune, settings.search, scoring, calibration, output_dir, log)
    stages["table1"] = round(time.perf_counter() - clock, 1)
    claims = findings(sqft, lonas, settings.training_noise)
    seconds = time.perf_counter() - start
    text = "\n\n".join(
        [
            f"Table 2 shape (SQFT / Shears), test split of {settings.n_test} problems:\n\n{sqft_markdown(sqft)}",
            f"Table 1 shape (LoNAS, Mode B), test split of {settings.n_test} problems:\n\n{lonas_markdown(lonas)}",
            f"Against the papers' findings ({_intervals(settings)}):\n\n" + "\n".join(claims),
        ]
    )
    log("\n" + text + f"\n\nDone in {seconds:.0f} s.")
    results = {
        "table2": [dataclasses.asdict(r) for r in sqft],
        "table1": [dataclasses.asdict(r) for r in lonas],
        "findings": claims,
        "seconds": round(seconds, 1),
        "stages": stages,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "base_was_cached": cached,
        "settings": dataclasses.asdict(settings),
        "base": source,
    }
    (output_dir / "tables.md").write_text(text + "\n")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
