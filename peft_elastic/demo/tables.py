"""The demo's two tables as Markdown, and the comparisons with the papers' findings that they support.

Every accuracy comes with its 95 % bootstrap interval over the test problems (`stats.py`), and every claim about
accuracies is judged on the interval of the compared quantity: "holds" or "differs" only when the whole interval is
on one side, "within noise" otherwise; a speedup on the interval of its paired timing rounds. Sparsity and parameter
counts are exact.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import stats
from .lonas import CostRow
from .sqft import Row


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _with_interval(accuracy: float, hits: list[bool], indices) -> str:
    if not hits:
        return f"{accuracy:.1%}"
    low, high = stats.accuracy_interval(hits, indices)
    return f"{accuracy:.1%} [{low:.1%}, {high:.1%}]"


def _perplexity(value: float | None) -> str:
    return "" if value is None else f" {value:.2f} |"


def sqft_markdown(rows: list[Row]) -> str:
    lora = next(r for r in rows if r.key == "lora")
    indices = _indices(rows)
    perplexity = any(r.perplexity is not None for r in rows)
    lines = [
        "| method | accuracy [95% interval] | vs LoRA |" + (" perplexity |" if perplexity else "")
        + " sparsity | sparsity after merge | precision |",
        "|---|---:|---:|" + ("---:|" if perplexity else "") + "---:|---:|---|",
    ]  # fmt: skip
    for row in rows:
        relative = "-" if row.key in ("dense", "sparse") else _relative(row.accuracy, lora.accuracy)
        lines.append(
            f"| {row.method} | {_with_interval(row.accuracy, row.hits, indices)} | {relative} |"
            f"{_perplexity(row.perplexity) if perplexity else ''} {row.sparsity:.1%} | "
            f"{_percent(row.merged_sparsity)} | {row.precision} |"
        )
    return "\n".join(lines)


def lonas_markdown(rows: list[CostRow]) -> str:
    lora = rows[0]
    indices = _indices(rows)
    perplexity = any(r.perplexity is not None for r in rows)
    lines = [
        "| method | accuracy [95% interval] | vs LoRA | validation accuracy |"
        + (" perplexity |" if perplexity else "")
        + " parameters | MACs (64 tokens) | latency (ms) | speedup |",
        "|---|---:|---:|---:|" + ("---:|" if perplexity else "") + "---:|---:|---:|---:|",
    ]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row.method} | {_with_interval(row.accuracy, row.hits, indices)} | "
            f"{_relative(row.accuracy, lora.accuracy)} | {row.validation_accuracy:.1%} |"
            f"{_perplexity(row.perplexity) if perplexity else ''} {row.params:,} | {row.macs / 1e6:.1f}M | "
            f"{row.latency_ms:.2f} | {row.speedup:.2f}x |"
        )
    return "\n".join(lines)


def anatomy_markdown(rows: list[Row | CostRow]) -> str:
    """Where each row's answers go wrong (`task.answer_anatomy`); "" when no row has it (results of older runs)."""
    rows = [row for row in rows if getattr(row, "anatomy", None)]
    if not rows:
        return ""
    lines = [
        "| method | answers in the format | right number of steps | operands read right | sums right "
        "| right, in the format |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        a = row.anatomy
        lines.append(
            f"| {row.method} | {a['formatted']:.1%} | {a['steps']:.1%} | {a['operands']:.1%} | {a['arithmetic']:.1%} "
            f"| {a['right']:.1%} |"
        )
    return "\n".join(lines)


def _relative(accuracy: float, reference: float) -> str:
    return f"{accuracy / reference:.1%}" if reference > 0 else "n/a"


def _indices(rows):
    """One set of bootstrap resamples for every row of a table (all rows are scored on the same problems)."""
    sizes = {len(r.hits) for r in rows if r.hits}
    return stats.resample_indices(sizes.pop()) if len(sizes) == 1 else None


#: Accuracy relative to LoRA in the papers' Table 2 (Mistral-7B-v0.3, GSM8K).
PAPER_RELATIVE = {"shears": 1.023, "sparse_peft": 1.136, "sqft": 1.009, "qa_sparse_peft": 0.998}
#: How far below the papers' ratio still counts as agreeing with it.
MARGIN = 0.05


def findings(sqft: list[Row], lonas: list[CostRow], training_noise: Mapping[str, float] | None = None) -> list[str]:
    """The papers' claims, each checked against these tables: one line per claim, saying whether it holds here,
    differs, or is within noise (the 95 % bootstrap interval of the compared quantity straddles the threshold).
    `training_noise`: the measured run-to-run standard deviation (seeds, CPU code paths: benchmarks/demo_robustness.py)
    of a compared quantity, keyed "a - b" (accuracy of the row of key a minus b's) or "a / b" (their ratio); a claim
    about it is judged on its interval widened by it (`stats.with_training_noise`). Quantities without a measured
    noise are judged on the bootstrap over test problems alone."""
    noise = dict(training_noise or {})
    indices = _indices(sqft)
    by = {row.key: row for row in sqft}
    dense, sparse, lora = by["dense"], by["sparse"], by["lora"]
    sparse_peft, qa = by["sparse_peft"], by["qa_sparse_peft"]
    tuned = [row for row in sqft if row.key not in ("dense", "sparse", "lora_repruned")]
    worst = min(tuned, key=lambda r: r.accuracy)

    def gap(a, b) -> tuple[float, float]:
        """Interval of accuracy(a) - accuracy(b) (paired), widened by its training noise where measured."""
        bounds = stats.difference_interval(a.hits, b.hits, indices)
        return stats.with_training_noise(bounds, a.accuracy - b.accuracy, noise.get(f"{a.key} - {b.key}", 0.0))

    def ratio(a, b, resamples, key: str) -> tuple[float, float] | None:
        """Interval of accuracy(a) / accuracy(b) (paired), widened by the training noise of `key` where measured;
        None if b scored 0."""
        if not b.accuracy:
            return None
        bounds = stats.ratio_interval(a.hits, b.hits, resamples)
        return stats.with_training_noise(bounds, a.accuracy / b.accuracy, noise.get(key, 0.0))

    lines = [
        _judged(
            gap(dense, sparse),
            0.0,
            f"50% Wanda sparsity costs accuracy without tuning ({dense.accuracy:.1%} -> {sparse.accuracy:.1%}).",
            strict=True,
        ),
        _judged(
            gap(worst, sparse),
            0.0,
            f"Every fine-tuning method recovers the sparse model (lowest: {worst.method}, {worst.accuracy:.1%}, vs "
            f"{sparse.accuracy:.1%} untuned).",
            strict=True,
        ),
        _exact(
            abs(sparse_peft.merged_sparsity - sparse.sparsity) < 1e-9 and lora.merged_sparsity < sparse.sparsity,
            f"SparsePEFT merges without losing sparsity ({sparse_peft.merged_sparsity:.1%}); merging LoRA leaves "
            f"{lora.merged_sparsity:.1%}.",
        ),
        _exact(
            qa.merged_sparsity >= sparse.sparsity,
            f"QA-SparsePEFT merges into INT4 and keeps every zero ({qa.merged_sparsity:.1%} zero weights; INT4 "
            "rounding can add zeros, never remove the mask's).",
        ),
    ]
    repruned = by.get("lora_repruned")
    if repruned is not None:
        lines.append(
            _judged(
                gap(sparse_peft, repruned),
                0.0,
                f"SparsePEFT beats LoRA merged and pruned again to the same sparsity ({sparse_peft.accuracy:.1%} vs "
                f"{repruned.accuracy:.1%}).",
                strict=True,
            )
        )
    for row in tuned[1:]:  # accuracy relative to LoRA, against the papers' ratio less MARGIN
        paper = PAPER_RELATIVE[row.key]
        relative = row.accuracy / lora.accuracy if lora.accuracy else 0.0
        lines.append(
            _judged(
                ratio(row, lora, indices, f"{row.key} / lora"),
                paper - MARGIN,
                f"{row.method} reaches {relative:.1%} of LoRA's accuracy (the papers: {paper:.1%}; agreeing means at "
                f"least {paper - MARGIN:.1%}).",
            )
        )
    lonas_indices = _indices(lonas)
    lora_b, heuristic = lonas[0], next(r for r in lonas if "heuristic" in r.method)
    relative = heuristic.accuracy / lora_b.accuracy if lora_b.accuracy else 0.0
    size = (
        f"LoNAS's heuristic subnetwork is smaller ({heuristic.params:,} vs {lora_b.params:,} parameters) and faster "
        f"({heuristic.speedup:.2f}x) than the merged LoRA model (the paper: 83% of the parameters, 1.23x)."
    )
    if heuristic.params >= lora_b.params:
        lines.append(_exact(False, size))
    elif heuristic.latency_rounds_ms:  # the speedup's interval over the paired timing rounds
        interval = stats.speedup_interval(lora_b.latency_rounds_ms, heuristic.latency_rounds_ms)
        lines.append(_judged(interval, 1.0, size, strict=True))
    else:  # results of a run that kept medians only
        lines.append(_exact(heuristic.speedup > 1.0, size))
    lines.append(
        _judged(
            ratio(heuristic, lora_b, lonas_indices, "lonas_heuristic / lonas_lora"),
            0.991 - MARGIN,
            f"LoNAS's heuristic subnetwork keeps {relative:.1%} of LoRA's accuracy (the paper: 99.1%).",
        )
    )
    rivals = [r for r in lonas if "search" in r.method and r.params <= heuristic.params]
    if rivals:  # the paper's search subnetwork 1: as small as the heuristic one, as accurate (the same MARGIN)
        best = max(rivals, key=lambda r: r.validation_accuracy)
        silent = best.accuracy == heuristic.accuracy == 0 and best.validation_accuracy == heuristic.validation_accuracy
        if silent:
            bounds, threshold = None, 0.0
        elif heuristic.accuracy:  # the same rule as every ratio claim: at least 1 - MARGIN of the reference
            bounds, threshold = ratio(best, heuristic, lonas_indices, "lonas_search / lonas_heuristic"), 1.0 - MARGIN
        else:  # a reference at 0: any accuracy keeps it; judged on the difference
            bounds, threshold = stats.difference_interval(best.hits, heuristic.hits, lonas_indices), 0.0
        kept = _relative(best.accuracy, heuristic.accuracy)
        lines.append(
            _judged(
                bounds,
                threshold,
                f"Search finds a subnetwork no larger than the heuristic one that keeps its accuracy on the test "
                f"split ({best.method}: {best.accuracy:.1%}, {best.params:,} parameters, vs {heuristic.accuracy:.1%}, "
                f"{kept} of it; validation {best.validation_accuracy:.1%} vs {heuristic.validation_accuracy:.1%}; "
                f"agreeing means at least {1.0 - MARGIN:.1%}).",
                "both score 0 on validation and test: the search had nothing to rank them by",
            )
        )
    return lines


def _judged(
    bounds: tuple[float, float] | None,
    threshold: float,
    text: str,
    why: str = "undefined: the reference scored 0",
    strict: bool = False,
) -> str:
    """A claim "quantity >= threshold" (`strict`: "quantity > threshold") judged on the quantity's interval `bounds`
    (None: not judged, for the reason `why`, e.g. a ratio to an accuracy of 0)."""
    if bounds is None:
        return f"- [n/a] {text} ({why})"
    low, high = bounds
    return f"- [{stats.verdict(low, high, threshold, strict)}] {text} (95% interval [{low:.3g}, {high:.3g}])"


def _exact(holds: bool, text: str) -> str:
    """A claim about exact quantities (sparsity, parameters, a measured median speedup)."""
    return f"- [{'holds' if holds else 'differs'}] {text}"
