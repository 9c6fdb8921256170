"""`sparsify`: prune the linear layers of a decoder in place with Wanda or magnitude scores, unstructured or N:M.

Wanda (Sun et al., *A Simple and Effective Pruning Approach for Large Language Models*, ICLR 2024) scores weight
`W_ij` by `|W_ij| · ‖X_j‖₂`, the norm of input feature `j` over all calibration tokens, and compares scores within
each output row. Blocks are processed in order: the calibration inputs of block `l` are the outputs of the
already-pruned blocks before it, and only one block's activations are kept in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..atomic_folders import export_directory, staged_directory
from ..calibration import calibration_batches
from ..choices import PRUNING_METHODS
from ..quantization.layers import check_standard_layout, codes, is_gptq_layer, zeros
from .patterns import Pattern, keep_mask, parse_pattern
from .structure import PRUNABLE, block_output, decoder_blocks, first_block_inputs, prunable_modules


@dataclass
class SparsityReport:
    """Zeros per pruned module (`{module name: (zeros, total)}`) and how they were made."""

    method: str
    pattern: str
    target_sparsity: float
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """The fraction of zeros over all pruned modules."""
        zeros = sum(z for z, _ in self.modules.values())
        total = sum(t for _, t in self.modules.values())
        return zeros / total if total else 0.0

    def module_sparsity(self) -> dict[str, float]:
        return {name: zeros / total for name, (zeros, total) in self.modules.items()}

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "pattern": self.pattern,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "modules": {name: {"zeros": z, "total": t} for name, (z, t) in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> SparsityReport:
        modules = {name: (entry["zeros"], entry["total"]) for name, entry in data["modules"].items()}
        return cls(data["method"], data["pattern"], data["target_sparsity"], modules)

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (atomically)."""
        path = Path(path)
        with staged_directory(path.parent) as staging:
            (staging / path.name).write_text(json.dumps(self.to_dict(), indent=2))

    def __str__(self) -> str:
        width = max([len(name) for name in self.modules] + [6])
        lines = [f"{self.method} ({self.pattern}, target {self.target_sparsity:.2%}): {self.sparsity:.2%} zeros"]
        lines += [f"  {name:<{width}}  {z / t:7.2%}" for name, (z, t) in self.modules.items()]
        return "\n".join(lines)


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out × in); a view of the parameter (Conv1D stores in × out)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _in_features(module: nn.Module) -> int:
    return _weight(module).shape[1]


@torch.no_grad()
def sparsify(
    model: nn.Module,
    calibration_data=None,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str = "unstructured",
    *,
    tokenizer=None,
    text_column: str = "text",
    max_length: int = 512,
    num_samples: int | None = 128,
    skip_modules: tuple[str, ...] = (),
    progress: bool = True,
) -> SparsityReport:
    """Prune the linear layers of `model`'s decoder blocks in place and return a `SparsityReport`.

    Args:
        model: a causal LM (Llama, Mistral, Qwen2, OPT, GPT-NeoX, GPT-2 style); its embeddings and head are kept.
        calibration_data: for Wanda: input_ids tensors, dicts with `input_ids` (and `attention_mask`, whose zeros
            are left out of the norms), a tokenized `datasets.Dataset`, or texts / a text dataset with `tokenizer`.
            Not needed for magnitude.
        method: "wanda" (`|W| · ‖X_j‖₂`) or "magnitude" (`|W|`); scores are compared within each output row.
        sparsity: the fraction of weights to zero in every row, in [0, 1) ("unstructured"); for "N:M" it is
            implied ((M − N) / M) and may be left None.
        pattern: "unstructured", or "N:M" such as "2:4" (keep N of every M consecutive inputs of a row).
        num_samples: use at most this many calibration entries (default 128, as Wanda).
        skip_modules: names (suffixes, e.g. "o_proj") of linear layers to leave dense.
        progress: show a progress bar over the blocks.
    """
    if method not in PRUNING_METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; use one of {list(PRUNING_METHODS)}.")
    parsed = parse_pattern(pattern, sparsity)
    _, blocks = decoder_blocks(model)
    prefix = {id(block): name for name, block in model.named_modules() if block in set(blocks)}
    block_names = [prefix[id(block)] for block in blocks]
    targets = [
        {name: m for name, m in prunable_modules(block).items() if not name.endswith(tuple(skip_modules))}
        for block in blocks
    ]
    if parsed.structured:
        for block_name, modules in zip(block_names, targets, strict=True):
            for name, module in modules.items():
                if _in_features(module) % parsed.m:
                    raise ValueError(
                        f"pattern {pattern!r}: {block_name}.{name} has in_features={_in_features(module)}, not "
                        f"divisible by M={parsed.m}; skip it with skip_modules=({name.rsplit('.', 1)[-1]!r},)."
                    )
    report = SparsityReport(method, str(parsed), parsed.sparsity)
    was_training = model.training
    model.eval()
    try:
        if method == "magnitude":
            for block_name, modules in zip(block_names, targets, strict=True):
                for name, module in modules.items():
                    report.modules[f"{block_name}.{name}"] = _prune(module, _weight(module).abs().float(), parsed)
            return report
        if calibration_data is None:
            raise ValueError("calibration_data is None; Wanda needs calibration inputs (method='magnitude' does not).")
        batches = calibration_batches(
            calibration_data, tokenizer, text_column=text_column, max_length=max_length, num_samples=num_samples
        )
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
        token_masks = [
            batch["attention_mask"].reshape(-1).bool() if "attention_mask" in batch else None for batch in batches
        ]
        inputs = first_block_inputs(model, blocks, batches)
        for block, block_name, modules in tqdm(
            list(zip(blocks, block_names, targets, strict=True)), desc=f"{method} {parsed}", disable=not progress
        ):
            norms = _input_norms(block, modules, inputs, token_masks)
            for name, module in modules.items():
                scores = _weight(module).abs().float() * norms[name].sqrt()[None, :]
                report.modules[f"{block_name}.{name}"] = _prune(module, scores, parsed)
            # the next block is calibrated on the outputs of this pruned one
            inputs = [(block_output(block, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
        return report
    finally:
        model.train(was_training)


def _input_norms(block, modules, inputs, token_masks) -> dict[str, torch.Tensor]:
    """`{module name: Σ over calibration tokens of x_j²}` for each linear layer of `block`. Layers that read the same
    input tensor (q/k/v, gate/up) share one sum: it is computed once per input of each forward."""
    sums = {
        name: torch.zeros(_in_features(m), dtype=torch.float64, device=m.weight.device) for name, m in modules.items()
    }
    current: dict = {"mask": None, "seen": {}}

    def hook(name):
        def accumulate(module, args):
            seen = current["seen"].get(id(args[0]))
            if seen is None:
                x = args[0].reshape(-1, args[0].shape[-1])
                if current["mask"] is not None:
                    x = x[current["mask"]]
                seen = current["seen"][id(args[0])] = (args[0], x.float().square().sum(dim=0, dtype=torch.float64))
            sums[name] += seen[1]

        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        for (hidden, kwargs), mask in zip(inputs, token_masks, strict=True):
            current["mask"], current["seen"] = mask, {}  # the input is kept with its sum, so its id is not reused
            block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.float() for name, value in sums.items()}


def _prune(module: nn.Module, scores: torch.Tensor, pattern: Pattern) -> tuple[int, int]:
    keep = keep_mask(scores, pattern)
    weight = _weight(module)
    weight.mul_(keep.to(weight.dtype))
    zeros = int(torch.count_nonzero(weight == 0))
    return zeros, weight.numel()


def measure_sparsity(model: nn.Module) -> SparsityReport:
    """The zeros of every linear layer in `model`'s decoder blocks, as they are now. GPTQ layers (standard packed
    layout, e.g. loaded with `backend="gptq_torch"`) count the weights that dequantize to exactly zero: code equal to
    its group's zero-point."""
    _, blocks = decoder_blocks(model)
    report = SparsityReport("measured", "any", math.nan)
    names = {id(block): name for name, block in model.named_modules() if block in set(blocks)}
    for block in blocks:
        for name, module in block.named_modules():
            if isinstance(module, PRUNABLE):
                weight = _weight(module)
                zero, size = int(torch.count_nonzero(weight == 0)), weight.numel()
            elif is_gptq_layer(module):
                check_standard_layout(module, name)
                q = codes(module)  # in x out
                zero, size = int(torch.count_nonzero(q == zeros(module)[module.g_idx.long()])), q.numel()
            else:
                continue
            report.modules[f"{names[id(block)]}.{name}"] = (zero, size)
    return report


def save_sparsified(
    model,
    save_directory: str | os.PathLike,
    report: SparsityReport | None = None,
    tokenizer=None,
    *,
    overwrite: bool = False,
):
    """Save a sparsified model (safetensors), its tokenizer and `sparsity_report.json`, atomically, and check that
    the saved weights hold the zeros of the model in memory. `save_directory` must be new or empty; a non-empty one is
    refused unless `overwrite`, which replaces it whole (as the other exports do)."""
    report = report if report is not None else measure_sparsity(model)
    with export_directory(save_directory, overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "sparsity_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        _verify_saved_zero_counts(staging, model)


def _verify_saved_zero_counts(directory: Path, model: nn.Module) -> None:
    """Raise unless every pruned layer's weight saved in `directory` has as many zeros as in `model`. One saved tensor
    is read at a time, its file opened for it alone: a handle kept open for a whole file keeps every page it has read
    mapped, and so resident (the shard's size by its last tensor)."""
    from safetensors import safe_open

    expected = {f"{name}.weight": zeros for name, (zeros, _) in measure_sparsity(model).modules.items()}
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            keys = [key for key in handle.keys() if key in expected]
        for key in keys:
            with safe_open(file, "pt") as handle:
                found[key] = int(torch.count_nonzero(handle.get_tensor(key) == 0))
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        differ = sorted(k for k in found if found[k] != expected[k])[:3]
        raise RuntimeError(
            f"The saved weights do not match the sparsified model (missing {missing}, different zeros {differ}); "
            "nothing was written."
        )
