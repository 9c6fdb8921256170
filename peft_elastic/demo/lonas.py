"""The LoNAS table (Table 1 of the papers, in shape): Mode B elastic adapters on the dense base against LoRA.

LoRA is merged into the base (a model of the base's size: the 1.00x reference). The Mode B super-network (elastic
ranks and MLP widths as in LoNAS — attention heads too with `SearchSettings.heads` —, channels ordered by importance
first) is trained for as many optimizer steps as LoRA, each a sandwich of the maximal, a random and the minimal
subnetwork; its heuristic subnetwork and two subnetworks found by an NSGA-II search on the *validation* split are
exported as physically smaller models and scored on the test split. Parameters and MACs (per token) are those of the
exported model; the speedup is LoRA's median forward time over the model's, timed side by side in one process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..compressed import export_compressed_model, load_compressed_model
from ..cost import count_macs, count_parameters, measure_latency
from ..importance import reorder_by_importance
from ..search import run_search
from ..tuners.elastic_lora import ElasticLoraConfig
from ..tuners.elastic_lora.space import resolve_width_choices, sizes_at_most
from .base import Stopwatch, load_base
from .finetune import TARGETS, FinetuneSettings, Scoring, finetune, lora_config

#: MLP widths and attention heads a subnetwork may keep, as fractions of the base's (rounded down to whole key/value
#: groups of heads, e.g. [9, 6, 3] for SmolLM2's 9 query heads over 3 key/value heads; [4, 2] for the demo's 4 over 2).
WIDTH_FRACTIONS = [1.0, 0.75, 0.5]
HEAD_FRACTIONS = [1.0, 0.75, 0.5]
#: Latency: batch x tokens of every timed forward pass, and rounds (each times every model once, in rotated order).
LATENCY_INPUT = (8, 64)


@dataclasses.dataclass
class CostRow:
    """One line of the table."""

    method: str
    accuracy: float
    validation_accuracy: float
    params: int
    macs: int
    latency_ms: float = float("nan")  # median over the rounds
    speedup: float = float("nan")  # LoRA's median over this model's
    hits: list[bool] = dataclasses.field(default_factory=list, repr=False)  # per test problem
    perplexity: float | None = None
    anatomy: dict[str, float] | None = None  # where the answers go wrong (task.answer_anatomy)
    #: Per timing round, paired with the other rows' rounds (`stats.speedup_interval`).
    latency_rounds_ms: list[float] = dataclasses.field(default_factory=list, repr=False)


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The Mode B super-network's training steps and the search's budget. `heads`: attention heads elastic too
    (Sukthanker et al.'s extension); off by default, as in LoNAS, whose search space is ranks and MLP widths. On the
    demo's base, where the only smaller head choice drops one of its two key/value groups, elastic heads cost the
    maximal subnetwork more than ten points of accuracy against widths alone (benchmarks/RESULTS.md, "Mode B
    super-network training")."""

    steps: int = 150
    strategy: str = "sandwich"
    trials: int = 16
    latency_rounds: int = 60
    heads: bool = False


def mode_b_choices(config, heads: bool = False) -> dict[str, list[int]]:
    """`width_choices` (and with `heads`, `head_choices`) for a base of this `config`: WIDTH_FRACTIONS of its MLP
    width and HEAD_FRACTIONS of its query heads, rounded down to whole channels and whole key/value groups."""
    choices = {"width_choices": sizes_at_most(WIDTH_FRACTIONS, config.intermediate_size)}
    if heads:
        total = config.num_attention_heads
        per_kv = total // (getattr(config, "num_key_value_heads", None) or total)
        choices["head_choices"] = sizes_at_most(HEAD_FRACTIONS, total, multiple_of=per_kv)
    return choices


def lonas_table(
    base_dir: Path,
    data: dict,
    settings: FinetuneSettings,
    search: SearchSettings,
    scoring: Scoring,
    calibration: list[str],
    out: Path,
    log=print,
) -> list[CostRow]:
    """Run LoRA and LoNAS on the dense base; exported models go to `out`. `calibration`: the texts of the importance
    ordering. Returns the rows in the table's order."""
    model, tokenizer = load_base(base_dir)
    train = data["train"]
    seq_len = LATENCY_INPUT[1]
    seconds = Stopwatch().lap

    def row(method: str, model, validation_accuracy: float) -> CostRow:
        score = scoring.score(model)
        params, macs = count_parameters(model), count_macs(model, seq_len=seq_len)
        result = CostRow(method, score.accuracy, validation_accuracy, params, macs, hits=score.hits)
        result.perplexity, result.anatomy = score.perplexity, score.anatomy
        log(f"  {method}: {score.summary()} ({seconds():.0f} s)")
        return result

    lora = finetune(model, lora_config(settings), tokenizer, train, settings, log=log)
    validation = scoring.validation(lora)
    merged = lora.merge_and_unload()
    rows = [row("LoRA (merged)", merged, validation)]
    models = [merged]

    base, _ = load_base(base_dir)
    config = ElasticLoraConfig(
        r=settings.r,
        lora_alpha=2 * settings.r,
        rank_choices=settings.rank_choices,
        target_modules=TARGETS,
        **mode_b_choices(base.config, heads=search.heads),
    )
    resolve_width_choices(base, config)  # a choice the model cannot take fails here, before the reordering
    reorder_by_importance(base, calibration, tokenizer=tokenizer, max_length=128, progress=False)
    budget = dataclasses.replace(settings, steps=search.steps)
    supernet = finetune(base, config, tokenizer, train, budget, search.strategy, log)
    supernet.save_pretrained(out / "lonas-super-adapter")
    log(f"  Mode B super-network ({search.strategy}): {seconds():.0f} s with the importance ordering")

    # the search seeds the maximal, heuristic and minimal subnetworks: their validation accuracy and MACs come with it
    result = run_search(supernet, scoring.validation, "nsga2", "macs", search.trials, seq_len=seq_len, progress=False)
    result.save(out / "lonas-search.json")
    log(f"  NSGA-II search: {search.trials} trials on the validation split, cost MACs ({seconds():.0f} s)")
    heuristic = result.heuristic
    within = [t for t in result.complete() if t["cost"] <= heuristic["cost"]]
    chosen = [("LoNAS (heuristic subnetwork)", heuristic["subnetwork"], heuristic["metric"])]
    if within:  # the most accurate on validation that costs no more than the heuristic
        best = max(within, key=lambda t: (t["metric"], -t["cost"]))
        chosen.append(("LoNAS (search subnetwork 1)", best["subnetwork"], best["metric"]))
    try:  # LoNAS's rule: the cheapest within 2 % of the maximal subnetwork's validation accuracy
        cheapest = result.best(0.02)
        maximal = cheapest["subnetwork"] == result.reference["subnetwork"]
        label = "LoNAS (search subnetwork 2" + (": the maximal one)" if maximal else ")")
        chosen.append((label, cheapest["subnetwork"], cheapest["metric"]))
    except ValueError as error:
        log(f"  search subnetwork 2: {error}")

    for index, (method, subnetwork, val_accuracy) in enumerate(chosen):
        folder = export_compressed_model(supernet, out / f"lonas-subnetwork-{index}", subnetwork, tokenizer=tokenizer)
        small = load_compressed_model(folder, dtype=torch.float32).eval()
        rows.append(row(method, small, val_accuracy))
        models.append(small)

    for cost_row, times in zip(rows, side_by_side_latency(models, search.latency_rounds), strict=True):
        cost_row.latency_rounds_ms = [t * 1000 for t in times]
        cost_row.latency_ms = sorted(times)[len(times) // 2] * 1000
        cost_row.speedup = rows[0].latency_ms / cost_row.latency_ms if cost_row is not rows[0] else 1.0
    log(f"  latency: {search.latency_rounds} rounds of the {len(models)} models side by side ({seconds():.0f} s)")
    (out / "table1.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    return rows


def side_by_side_latency(models: list, rounds: int, repeats: int = 3) -> list[list[float]]:
    """Seconds of one forward pass of each model on the same random tokens, per round: `rounds` rounds that time
    every model (the median of `repeats` passes) in an order rotated from round to round, so that a slow spell of the
    machine hits all and round i of two models can be compared (`stats.speedup_interval`)."""
    batch, seq_len = LATENCY_INPUT
    vocab = models[0].get_input_embeddings().num_embeddings
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in models]
    for model in models:  # warm-up
        measure_latency(model, input_ids, warmup=2, repeats=1)
    for round_ in range(rounds):
        for offset in range(len(models)):
            index = (round_ + offset) % len(models)
            times[index].append(measure_latency(models[index], input_ids, warmup=0, repeats=repeats).median)
    return times
