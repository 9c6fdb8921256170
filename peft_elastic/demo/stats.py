"""How sure a table's numbers are: bootstrap intervals over the test problems, and verdicts that say "within noise"
when a gap is smaller than its spread.

Every accuracy is a mean of per-problem hits (1 if the greedy answer is right). Resampling the problems with
replacement (the same resampled problems for every row, so that rows are compared on the same draws) gives the
spread of each accuracy and of each ratio of two accuracies. A claim "A / B ≥ t" holds when the whole interval of
A / B is at least `t`, differs when the whole interval is below it, and is within noise otherwise; a strict claim
("A beats B") holds only above its threshold and differs only below it, a tie being neither.

Resampling the problems does not see training noise: another seed, or another CPU code path (other float roundings,
another trajectory), fine-tunes another adapter that scores otherwise on the same problems. Where that noise has been
measured (`benchmarks/demo_robustness.py`: its standard deviation over seeds and code paths), a comparison of
fine-tuned rows is judged on its interval widened by it (`with_training_noise`).
"""

from __future__ import annotations

import math
import statistics

import torch

#: Bootstrap resamples and the interval's coverage.
RESAMPLES = 2000
LEVEL = 0.95


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """(resamples × n) indices drawn with replacement from `range(n)`; fixed by `seed`."""
    if n < 1:
        raise ValueError(f"Bootstrap needs at least one problem, got {n}.")
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def interval(values: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of the bootstrap `values`."""
    low, high = torch.quantile(values.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double))
    return float(low), float(high)


def accuracy_interval(hits: list[bool], indices: torch.Tensor | None = None) -> tuple[float, float]:
    """The bootstrap interval of the accuracy `mean(hits)`."""
    scores = torch.tensor(hits, dtype=torch.double)
    indices = resample_indices(len(hits)) if indices is None else indices
    return interval(scores[indices].mean(dim=1))


def ratio_interval(
    hits: list[bool], reference: list[bool], indices: torch.Tensor | None = None
) -> tuple[float, float]:
    """The paired bootstrap interval of `mean(hits) / mean(reference)` (the same problems resampled for both; a
    resample where the reference scores 0 counts as ratio 0)."""
    if len(hits) != len(reference):
        raise ValueError(f"Paired rows need the same problems: {len(hits)} vs {len(reference)}.")
    a, b = torch.tensor(hits, dtype=torch.double), torch.tensor(reference, dtype=torch.double)
    indices = resample_indices(len(hits)) if indices is None else indices
    top, bottom = a[indices].mean(dim=1), b[indices].mean(dim=1)
    return interval(torch.where(bottom > 0, top / bottom.clamp_min(1e-12), torch.zeros_like(top)))


def difference_interval(
    hits: list[bool], reference: list[bool], indices: torch.Tensor | None = None
) -> tuple[float, float]:
    """The paired bootstrap interval of `mean(hits) - mean(reference)`."""
    if len(hits) != len(reference):
        raise ValueError(f"Paired rows need the same problems: {len(hits)} vs {len(reference)}.")
    a, b = torch.tensor(hits, dtype=torch.double), torch.tensor(reference, dtype=torch.double)
    indices = resample_indices(len(hits)) if indices is None else indices
    return interval(a[indices].mean(dim=1) - b[indices].mean(dim=1))


def speedup_interval(reference: list[float], times: list[float], resamples: int = RESAMPLES) -> tuple[float, float]:
    """The paired bootstrap interval of `median(reference) / median(times)`: per-round forward times of two models
    timed side by side (round i of both in the same pass over the models), the rounds resampled with replacement."""
    if len(reference) != len(times) or not times:
        raise ValueError(f"Paired timings need the same rounds (and some): {len(reference)} vs {len(times)}.")
    a, b = torch.tensor(reference, dtype=torch.double), torch.tensor(times, dtype=torch.double)
    indices = resample_indices(len(times), resamples)
    return interval(a[indices].median(dim=1).values / b[indices].median(dim=1).values)


def with_training_noise(
    bounds: tuple[float, float], estimate: float, noise: float, level: float = LEVEL
) -> tuple[float, float]:
    """`bounds`, the bootstrap interval over test problems of a quantity measured as `estimate`, widened by training
    noise of standard deviation `noise` (independent of which problems are drawn): each side's distance from the
    estimate combined in quadrature with z·noise, z the normal quantile of `level` (1.96 at 95 %); noise 0: as is."""
    if noise < 0:
        raise ValueError(f"Training noise is a standard deviation, at least 0; got {noise}.")
    if noise == 0:
        return bounds
    low, high = bounds
    spread = statistics.NormalDist().inv_cdf((1 + level) / 2) * noise
    below, above = max(0.0, estimate - low), max(0.0, high - estimate)
    return estimate - math.hypot(below, spread), estimate + math.hypot(above, spread)


def verdict(low: float, high: float, threshold: float, strict: bool = False) -> str:
    """ "holds" if the whole interval is at or above `threshold` (`strict`: above it), "differs" if it is all below,
    else "within noise".

    A strict claim ("A costs / recovers / beats B", "A is faster": a difference above 0, a ratio above 1) is about
    the sign of a gap: an interval that reaches exactly the threshold — a tie in some resamples, as when both rows
    are right on all but a few problems — supports neither "holds" nor "differs"."""
    if low > threshold or (low == threshold and not strict):
        return "holds"
    if high < threshold:
        return "differs"
    return "within noise"
