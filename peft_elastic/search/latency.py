"""The search's `"latency"` cost: a subnetwork's forward time relative to the maximal subnetwork's, timed in
interleaved rounds so that a slow spell of a shared machine slows both alike.

A single timing of a forward pass on a busy CPU can be 50 times its quiet value (measured on SmolLM2 under load: one
subnetwork gave 0.32, 14.4 and 15.3 s). Here every round times the subnetwork and the reference (the maximal
subnetwork, the same super-network) back to back, in an order that alternates from round to round, and the cost is the
median over rounds of their ratio. When the ratios are still spread after `rounds` rounds (interquartile range above
`max_spread` of the median: an outlier-prone spell), rounds are added up to `max_rounds`. The cost is dimensionless
(1.0: as slow as the maximal subnetwork); `last` holds the figures of the latest call, which `run_search` records
with each trial (`cost_spread`: the quartiles of the ratio).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from ..cost import DEFAULT_SEQ_LEN, check_count, random_tokens
from ..subnetwork import maximal_subnetwork, set_subnetwork


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of `values` (all three the value itself for one value)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


class RelativeLatency:
    """`cost="latency"` of `run_search`: `(model, subnetwork) -> median of t(subnetwork) / t(maximal)` over interleaved
    rounds of one forward pass each, on `batch_size × seq_len` random tokens (fixed seed), in eval mode without
    gradients; `warmup` untimed passes of each first. Leaves `subnetwork` active and every module's training flag as
    it was."""

    __name__ = "latency"

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str | None = None,
        *,
        seq_len: int = DEFAULT_SEQ_LEN,
        batch_size: int = 1,
        rounds: int = 5,
        warmup: int = 1,
        max_rounds: int = 15,
        max_spread: float = 0.1,
    ) -> None:
        self.rounds = check_count("rounds", rounds, 1)
        self.warmup = check_count("warmup", warmup, 0)
        self.max_rounds = check_count("max_rounds", max_rounds, self.rounds)
        if isinstance(max_spread, bool) or not isinstance(max_spread, (int, float)) or not max_spread >= 0:
            raise ValueError(f"max_spread must be a number >= 0, got {max_spread!r}.")
        self.max_spread = float(max_spread)
        self.adapter_name = adapter_name
        self.reference = maximal_subnetwork(model, adapter_name)
        self.input_ids = random_tokens(model, seq_len, batch_size)
        self.last: dict | None = None

    def _time(self, model: nn.Module, subnetwork: Mapping[str, int]) -> float:
        set_subnetwork(model, subnetwork, self.adapter_name)
        start = time.perf_counter()
        model(self.input_ids)
        if self.input_ids.device.type == "cuda":
            torch.cuda.synchronize(self.input_ids.device)
        return time.perf_counter() - start

    def __call__(self, model: nn.Module, subnetwork: Mapping[str, int]) -> float:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        ratios, reference_times = [], []
        try:
            with torch.no_grad():
                for _ in range(self.warmup):
                    self._time(model, subnetwork)
                    self._time(model, self.reference)
                while True:
                    if len(ratios) % 2:
                        own, reference = self._time(model, subnetwork), self._time(model, self.reference)
                    else:
                        reference, own = self._time(model, self.reference), self._time(model, subnetwork)
                    ratios.append(own / reference)
                    reference_times.append(reference)
                    if len(ratios) >= self.rounds:
                        q1, median, q3 = quartiles(ratios)
                        if q3 - q1 <= self.max_spread * median or len(ratios) >= self.max_rounds:
                            break
        finally:
            set_subnetwork(model, subnetwork, self.adapter_name)
            for module, training in modes:
                module.training = training
        self.last = {
            "ratio": median,
            "quartiles": [q1, q3],
            "rounds": len(ratios),
            "reference_seconds": statistics.median(reference_times),
        }
        return median
