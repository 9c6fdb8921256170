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
        _claim(
            all(r.accuracy >= 0.9 * lora.accuracy for r in tuned),
            "Shears and the three SQFT pipelines reach at least 90% of LoRA's accuracy (the papers: 99.8-113.6%).",
        ),
    ]
    heuristic = next(r for r in lonas if "heuristic" in r.method)
    relative = _relative(heuristic.accuracy, lonas[0].accuracy)
    lines.append(
        _claim(
            heuristic.params < lonas[0].params and heuristic.speedup > 1.0,
            f"LoNAS's heuristic subnetwork is smaller ({heuristic.params:,} vs {lonas[0].params:,} parameters) and "
            f"faster ({heuristic.speedup:.2f}x) than the merged LoRA model, at {relative} of its accuracy (the paper: "
            "99.1%).",
        )
    )
    searched = [r for r in lonas if "search" in r.method]
    if searched:
        best = max(searched, key=lambda r: r.accuracy)
        lines.append(
            _claim(
                best.accuracy >= heuristic.accuracy,
                f"Search finds a subnetwork at least as accurate as the heuristic one ({best.method}: "
                f"{best.accuracy:.1%} vs {heuristic.accuracy:.1%} on the test split).",
            )
        )
    return lines


def _claim(holds: bool, text: str) -> str:
    return f"- [{'holds' if holds else 'differs'}] {text}"
