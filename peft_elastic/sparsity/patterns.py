"""Which weights to keep, given importance scores: unstructured per-row sparsity, or N:M semi-structured."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """A pruning pattern: `unstructured` (zero the `sparsity` fraction of lowest scores in each output row) or `n:m`
    (keep the `n` highest scores of every `m` consecutive inputs of each row)."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def parse_pattern(pattern: str, sparsity: float | None) -> Pattern:
    """Validate `pattern` ("unstructured", "2:4", "N:M") together with `sparsity`."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}.")
    match = _NM.match(pattern.strip())
    if pattern == "unstructured":
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ValueError(
                f"sparsity must be a number in [0, 1) (the fraction of weights to zero in each row), got {sparsity!r}."
            )
        return Pattern(float(sparsity))
    if match is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M keeps N of every M weights, so it needs 0 < N < M, e.g. '2:4'.")
    implied = (m - n) / m
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise ValueError(
            f"pattern {pattern!r} zeroes {implied:.4g} of the weights, but sparsity={sparsity!r} was given; "
            f"pass sparsity=None (or {implied:.4g}) with an N:M pattern."
        )
    return Pattern(implied, n, m)


def keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """A boolean mask of the weights to keep (same shape as `scores`, out × in); ties break towards lower indices."""
    rows, cols = scores.shape
    if pattern.structured:
        if cols % pattern.m:
            raise ValueError(
                f"pattern {pattern}: in_features={cols} is not divisible by M={pattern.m}; use another pattern or "
                "leave this module out."
            )
        blocks = scores.reshape(rows, cols // pattern.m, pattern.m)
        # stable sort: among equal scores the earlier input is kept
        order = torch.sort(blocks, dim=-1, descending=True, stable=True).indices[..., : pattern.n]
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order, True)
        return keep.reshape(rows, cols)
    prune = int(cols * pattern.sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prune:
        order = torch.sort(scores, dim=-1, stable=True).indices[:, :prune]
        keep.scatter_(-1, order, False)
    return keep
