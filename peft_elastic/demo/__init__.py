"""The offline demo: the papers' two tables, in shape, on a model this package pre-trains itself.

    peft-elastic demo [--quick] [--output DIR] [--cache-dir DIR]      (or: python -m peft_elastic.demo ...)

1. A small Llama (about 0.85M parameters) is pre-trained on a synthetic corpus of arithmetic (`task.py`), once, and
   cached under the user's cache directory (`base.py`).
2. Table 2 (SQFT / Shears): the base is pruned to 50 % with Wanda, then fine-tuned on GSM8K-shaped word problems by
   LoRA, Shears (NLS), SQFT + SparsePEFT (merged), SQFT (an NLS adapter on the GPTQ INT4 base) and SQFT +
   QA-SparsePEFT (merged into INT4), all with the same budget (`sqft.py`).
3. Table 1 (LoNAS): Mode B on the dense base against LoRA: the heuristic subnetwork and two found by NSGA-II on the
   validation split, exported as smaller models, with parameters, MACs and measured CPU speedup (`lonas.py`).

Accuracy is the exact match of the number after "####" in greedy answers on the test split, which nothing is tuned
or selected on. Nothing is downloaded. `--quick` runs the same pipelines with tiny budgets (a smoke test: its
accuracies mean nothing).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .base import BaseSettings, default_cache_dir, is_cached, pretrained_base
from .finetune import FinetuneSettings
from .lonas import SearchSettings, lonas_table
from .sqft import sqft_table
from .tables import findings, lonas_markdown, sqft_markdown
from .task import splits

__all__ = ["FULL", "QUICK", "DemoSettings", "default_cache_dir", "run"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every budget of a demo run."""

    base: BaseSettings = BaseSettings()
    n_train: int = 2000
    n_validation: int = 200
    n_test: int = 500
    finetune: FinetuneSettings = FinetuneSettings()
    search: SearchSettings = SearchSettings()


FULL = DemoSettings()
QUICK = DemoSettings(
    base=BaseSettings(steps=30, batch_size=16),
    n_train=128,
    n_validation=16,
    n_test=24,
    finetune=FinetuneSettings(steps=4, batch_size=8),
    search=SearchSettings(steps=4, trials=4, latency_rounds=2),
)


def run(settings: DemoSettings, output_dir: Path, cache_dir: Path, log=print) -> dict:
    """Run the demo; print its progress and tables with `log`; write `tables.md` and `results.json` (and every
    model and adapter it made) to `output_dir`. Returns the results (tables as lists of dicts, findings, seconds)."""
    start = time.perf_counter()
    data = splits(settings.n_train, settings.n_validation, settings.n_test, seed=settings.base.seed)
    held_out = {p["prompt"] for split in ("validation", "test") for p in data[split]}
    cached = is_cached(settings.base, cache_dir)
    base_dir = pretrained_base(settings.base, held_out, cache_dir, log)
    log(f"\nTable 2 pipelines (50% Wanda sparsity; {settings.finetune.steps} fine-tuning steps each):")
    sqft = sqft_table(base_dir, data, settings.finetune, output_dir, log)
    log(f"\nTable 1 pipelines (Mode B on the dense base; super-network {settings.search.steps} steps):")
    lonas = lonas_table(base_dir, data, settings.finetune, settings.search, output_dir, log)
    claims = findings(sqft, lonas)
    seconds = time.perf_counter() - start
    text = "\n\n".join(
        [
            f"Table 2 shape (SQFT / Shears), test split of {settings.n_test} problems:\n\n{sqft_markdown(sqft)}",
            f"Table 1 shape (LoNAS, Mode B), test split of {settings.n_test} problems:\n\n{lonas_markdown(lonas)}",
            "Against the papers' findings:\n\n" + "\n".join(claims),
        ]
    )
    log("\n" + text + f"\n\nDone in {seconds:.0f} s.")
    results = {
        "table2": [dataclasses.asdict(r) for r in sqft],
        "table1": [dataclasses.asdict(r) for r in lonas],
        "findings": claims,
        "seconds": round(seconds, 1),
        "base_was_cached": cached,
        "settings": dataclasses.asdict(settings),
        "base": json.loads((base_dir / "pretraining.json").read_text()),
    }
    (output_dir / "tables.md").write_text(text + "\n")
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
