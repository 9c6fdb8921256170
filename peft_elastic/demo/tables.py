"""The demo's two tables as Markdown, and the comparisons with the papers' findings that they support."""

from __future__ import annotations

from .lonas import CostRow
from .sqft import Row


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def sqft_markdown(rows: list[Row]) -> str:
    lora = next(r.accuracy for r in rows if r.key == "lora")
    lines = [
        "| method | accuracy | vs LoRA | sparsity | sparsity after merge | precision |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        relative = "-" if row.key in ("dense", "sparse") else _relative(row.accuracy, lora)
        lines.append(
            f"| {row.method} | {row.accuracy:.1%} | {relative} | {row.sparsity:.1%} | {_percent(row.merged_sparsity)} "
            f"| {row.precision} |"
        )
    return "\n".join(lines)


def lonas_markdown(rows: list[CostRow]) -> str:
    lora = rows[0]
    lines = [
        "| method | accuracy | vs LoRA | validation accuracy | parameters | MACs (64 tokens) | latency (ms) "
        "| speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.method} | {row.accuracy:.1%} | {_relative(row.accuracy, lora.accuracy)} | "
            f"{row.validation_accuracy:.1%} | {row.params:,} | {row.macs / 1e6:.1f}M | {row.latency_ms:.2f} | "
            f"{row.speedup:.2f}x |"
        )
    return "\n".join(lines)


def _relative(accuracy: float, reference: float) -> str:
    return f"{accuracy / reference:.1%}" if reference > 0 else "n/a"


#: Accuracy relative to LoRA in the papers' Table 2 (Mistral-7B-v0.3, GSM8K).
PAPER_RELATIVE = {"shears": 1.023, "sparse_peft": 1.136, "sqft": 1.009, "qa_sparse_peft": 0.998}


def findings(sqft: list[Row], lonas: list[CostRow]) -> list[str]:
    """The papers' claims, each checked against these tables: one line per claim, saying whether it holds here."""
    by = {row.key: row for row in sqft}
    dense, sparse, lora = by["dense"], by["sparse"], by["lora"]
    sparse_peft, qa = by["sparse_peft"], by["qa_sparse_peft"]
    tuned = [row for row in sqft if row.key not in ("dense", "sparse")]
    worst = min(tuned, key=lambda r: r.accuracy)
    lines = [
        _claim(
            sparse.accuracy <= dense.accuracy,
            f"50% Wanda sparsity costs accuracy without tuning ({dense.accuracy:.1%} -> {sparse.accuracy:.1%}).",
        ),
        _claim(
            worst.accuracy > sparse.accuracy,
            f"Every fine-tuning method recovers the sparse model (lowest: {worst.method}, {worst.accuracy:.1%}, vs "
            f"{sparse.accuracy:.1%} untuned).",
        ),
        _claim(
            abs(sparse_peft.merged_sparsity - sparse.sparsity) < 1e-9 and lora.merged_sparsity < sparse.sparsity,
            f"SparsePEFT merges without losing sparsity ({sparse_peft.merged_sparsity:.1%}); merging LoRA leaves "
            f"{lora.merged_sparsity:.1%}.",
        ),
        _claim(
            qa.merged_sparsity >= sparse.sparsity,
            f"QA-SparsePEFT merges into INT4 and keeps every zero ({qa.merged_sparsity:.1%} zero weights; INT4 "
            "rounding can add zeros, never remove the mask's).",
        ),
    ]
    for row in tuned[1:]:  # accuracy relative to LoRA: within 5 points of the papers' ratio counts as agreeing
        paper = PAPER_RELATIVE[row.key]
        ratio = row.accuracy / lora.accuracy if lora.accuracy else 0.0
        lines.append(
            _claim(
                ratio >= paper - 0.05,
                f"{row.method} reaches {ratio:.1%} of LoRA's accuracy (the papers: {paper:.1%}).",
            )
        )
    lora_b, heuristic = lonas[0], next(r for r in lonas if "heuristic" in r.method)
    relative = heuristic.accuracy / lora_b.accuracy if lora_b.accuracy else 0.0
    lines.append(
        _claim(
            heuristic.params < lora_b.params and heuristic.speedup > 1.0 and relative >= 0.991 - 0.05,
            f"LoNAS's heuristic subnetwork is smaller ({heuristic.params:,} vs {lora_b.params:,} parameters) and "
            f"faster ({heuristic.speedup:.2f}x) than the merged LoRA model, at {relative:.1%} of its accuracy (the "
            "paper: 83% of the parameters, 1.23x, 99.1%).",
        )
    )
    rivals = [r for r in lonas if "search" in r.method and r.params <= heuristic.params]
    if rivals:  # the paper's search subnetwork 1: as small as the heuristic one, more accurate
        best = max(rivals, key=lambda r: r.validation_accuracy)
        lines.append(
            _claim(
                best.accuracy >= heuristic.accuracy,
                f"Search finds a subnetwork no larger than the heuristic one that is at least as accurate on the test "
                f"split ({best.method}: {best.accuracy:.1%}, {best.params:,} parameters, vs {heuristic.accuracy:.1%}; "
                f"validation {best.validation_accuracy:.1%} vs {heuristic.validation_accuracy:.1%}).",
            )
        )
    return lines


def _claim(holds: bool, text: str) -> str:
    return f"- [{'holds' if holds else 'differs'}] {text}"
