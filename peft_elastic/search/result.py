"""`SearchResult`: the trials of a subnetwork search, their Pareto front, hypervolume, the LoNAS selection rule,
JSON round trip and plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ..atomic_folders import staged_directory

_FORMAT = "peft_elastic.search_result.v1"
T = TypeVar("T")


def pareto_front(
    items: Iterable[T], objectives: Callable[[T], tuple[float, float]], order: Callable[[T], int]
) -> list[T]:
    """The items of `items` that no other dominates, by their `objectives` (metric, cost), both minimised: one per
    point, the first by `order` among equals, by increasing cost. The one Pareto rule of the search (its result, and
    hill_climb's front)."""
    front, best_metric = [], math.inf
    for item in sorted(items, key=lambda item: (objectives(item)[1], objectives(item)[0], order(item))):
        metric = objectives(item)[0]
        if metric < best_metric:
            front.append(item)
            best_metric = metric
    return front


@dataclasses.dataclass
class SearchResult:
    """All trials of a search, in the order they were evaluated. Each trial is a dict `{"number", "subnetwork",
    "metric", "cost", "state" ("complete" or "failed"), "seconds"}`. `direction` is the metric's ("minimize": a loss,
    "maximize": an accuracy); the cost is always minimised. `reference` is the metric of the maximal subnetwork
    when it was evaluated (the search seeds it), `heuristic` the heuristic subnetwork's trial. `timing`: seconds spent
    switching subnetworks, evaluating and costing, and the search overhead as a fraction of evaluation time; the
    number of evaluations and of repeats (proposals of evaluated subnetworks, served from the storage). `stopped` says
    why the search ended before `n_trials` (every subnetwork of the space evaluated, or hill_climb at a local
    optimum), None when it did not."""

    trials: list[dict]
    direction: str
    cost_name: str
    strategy: str
    reference: dict | None = None
    heuristic: dict | None = None
    timing: dict = dataclasses.field(default_factory=dict)
    stopped: str | None = None

    # --------------------------------------------------------------------------------------------- selection

    def complete(self) -> list[dict]:
        """The trials that produced a metric (failed ones, e.g. a NaN metric, left out)."""
        return [t for t in self.trials if t["state"] == "complete"]

    def _key(self, trial: dict) -> tuple[float, float]:
        """(metric, cost) as two values to minimise."""
        metric = trial["metric"] if self.direction == "minimize" else -trial["metric"]
        return metric, trial["cost"]

    def pareto_front(self) -> list[dict]:
        """The non-dominated complete trials (no other trial is at least as good in metric and cost and better in
        one), one per (metric, cost) point, by increasing cost."""
        return pareto_front(self.complete(), self._key, lambda trial: trial["number"])

    def hypervolume(self, reference_point: tuple[float, float]) -> float:
        """The area dominated by the Pareto front and bounded by `reference_point` = (metric, cost), in the
        minimised orientation (for a maximised metric, pass the metric itself: it is negated like the trials')."""
        ref_metric, ref_cost = reference_point
        if self.direction == "maximize":
            ref_metric = -ref_metric
        area, previous_metric = 0.0, ref_metric
        for trial in self.pareto_front():  # increasing cost, decreasing (minimised) metric
            metric, cost = self._key(trial)
            if cost >= ref_cost or metric >= previous_metric:
                continue
            area += (previous_metric - metric) * (ref_cost - cost)
            previous_metric = metric
        return area

    def best(self, max_metric_drop: float = 0.01, reference_metric: float | None = None) -> dict:
        """The cheapest complete trial whose metric is within `max_metric_drop` (relative) of `reference_metric`
        (default: the maximal subnetwork's) — the rule LoNAS selects with. Raises if nothing qualifies."""
        if not (isinstance(max_metric_drop, (int, float)) and 0 <= max_metric_drop < 1):
            raise ValueError(f"max_metric_drop is a relative drop in [0, 1), got {max_metric_drop!r}.")
        if reference_metric is None:
            if self.reference is None:
                raise ValueError(
                    "No reference metric: the maximal subnetwork was not evaluated in this search; pass "
                    "reference_metric=."
                )
            reference_metric = self.reference["metric"]
        if self.direction == "minimize":
            limit = reference_metric + abs(reference_metric) * max_metric_drop
            qualifying = [t for t in self.complete() if t["metric"] <= limit]
        else:
            limit = reference_metric - abs(reference_metric) * max_metric_drop
            qualifying = [t for t in self.complete() if t["metric"] >= limit]
        if not qualifying:
            raise ValueError(
                f"No trial is within {max_metric_drop:.1%} of the reference metric {reference_metric:.6g} "
                f"({len(self.complete())} complete trials)."
            )
        return min(qualifying, key=lambda t: (t["cost"], self._key(t)[0], t["number"]))

    # ------------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return {"format": _FORMAT} | dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON to `path` (atomically)."""
        path = Path(path)
        with staged_directory(path.parent) as staging:
            (staging / path.name).write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """A result written by `save`."""
        data = json.loads(Path(path).read_text())
        if data.pop("format", None) != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a peft_elastic search result.")
        return cls(**data)

    # ----------------------------------------------------------------------------------------------- plots

    def plot_pareto(self, path: str | os.PathLike) -> Path:
        """A PNG of every complete trial (metric vs cost), the Pareto front, and the maximal subnetwork."""
        figure, axis = self._figure()
        self._draw_front(axis)
        return self._save(figure, path)

    def plot_progression(self, path: str | os.PathLike) -> Path:
        """A PNG with the trials coloured by their order, the Pareto front, and lines at the metrics of the maximal
        and the heuristic subnetworks."""
        figure, axis = self._figure()
        trials = self.complete()
        points = axis.scatter(
            [t["cost"] for t in trials], [t["metric"] for t in trials], c=[t["number"] for t in trials], cmap="viridis"
        )
        figure.colorbar(points, ax=axis, label="trial")
        self._draw_front(axis, scatter=False)
        return self._save(figure, path)

    def _figure(self):
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot

        figure, axis = pyplot.subplots(figsize=(6, 4.5))
        axis.set_xlabel(f"cost ({self.cost_name})")
        axis.set_ylabel(f"metric ({'lower' if self.direction == 'minimize' else 'higher'} is better)")
        axis.set_title(f"{self.strategy}: {len(self.complete())} trials")
        return figure, axis

    def _draw_front(self, axis, scatter: bool = True) -> None:
        trials = self.complete()
        if scatter:
            axis.scatter(
                [t["cost"] for t in trials], [t["metric"] for t in trials], s=12, color="grey", label="trials"
            )
        front = self.pareto_front()
        axis.step(
            [t["cost"] for t in front], [t["metric"] for t in front], where="post", color="red", label="Pareto front"
        )
        if self.reference is not None:
            axis.axhline(self.reference["metric"], color="black", linestyle="--", label="maximal subnetwork")
        if self.heuristic is not None:
            axis.axhline(self.heuristic["metric"], color="blue", linestyle=":", label="heuristic subnetwork")
        axis.legend()

    @staticmethod
    def _save(figure, path) -> Path:
        from matplotlib import pyplot

        path = Path(path)
        with staged_directory(path.parent) as staging:
            figure.savefig(staging / path.name, dpi=100)
        pyplot.close(figure)
        return path
