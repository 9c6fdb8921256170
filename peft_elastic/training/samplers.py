"""Subnetwork samplers for super-network training: which sub-adapter(s) each optimizer step trains.

A sampler is set up once on a model (it reads the search space) and then, for every optimizer step, returns the
subnetworks that step trains: one for most strategies, several for `sandwich` (their gradients are summed). Draws
depend only on `(seed, step)`, never on earlier draws, so every DDP rank picks the same subnetwork, and a run
resumed from a checkpoint continues the same sequence.

| strategy        | each optimizer step trains                                                 | source               |
|-----------------|----------------------------------------------------------------------------|----------------------|
| `random`        | one subnetwork, each group's rank drawn uniformly                          | Shears, LoNAS        |
| `sandwich`      | the maximal, `num_random` random and the minimal subnetwork (grads summed) | Yu et al. 2019, 2020 |
| `random_linear` | a random subnetwork with probability `step / max_steps`, else the maximal  | warm-up schedule     |
| `grid_params`   | one of a fixed grid of subnetworks evenly spread over the parameter range  | Sukthanker et al.    |
| `fixed`         | always the same subnetwork (e.g. the maximal one: plain LoRA training)     |                      |
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..checks import check_int
from ..subnetwork import (
    SearchSpace,
    Subnetwork,
    heuristic_subnetwork,
    maximal_subnetwork,
    minimal_subnetwork,
    parameters_per_rank,
    search_space,
)

NAMED_SUBNETWORKS = {"maximal": maximal_subnetwork, "heuristic": heuristic_subnetwork, "minimal": minimal_subnetwork}


def named_subnetwork(model: nn.Module, subnetwork: str | Mapping[str, int], adapter_name: str | None = None):
    """`subnetwork` as a dict: "maximal", "heuristic" and "minimal" are resolved on `model`; a dict is validated
    (unknown groups or invalid ranks raise `ValueError`) and returned as it is, possibly naming only some groups."""
    if isinstance(subnetwork, str):
        if subnetwork not in NAMED_SUBNETWORKS:
            raise ValueError(
                f"Unknown subnetwork name {subnetwork!r}; use one of {list(NAMED_SUBNETWORKS)} or a dict "
                "{group name: choice}."
            )
        return NAMED_SUBNETWORKS[subnetwork](model, adapter_name)
    if not isinstance(subnetwork, Mapping):
        raise ValueError(
            f"A subnetwork is 'maximal', 'heuristic', 'minimal' or a dict {{group name: choice}}, got {subnetwork!r}."
        )
    return SearchSpace.of(model, adapter_name).validated(subnetwork)


def step_rng(seed: int, step: int) -> random.Random:
    """The random stream of one optimizer step: a function of `(seed, step)` only (string seeds hash with SHA-512,
    independent of the process and of PYTHONHASHSEED)."""
    return random.Random(f"peft_elastic:{seed}:{step}")


class SubnetworkSampler:
    """Base class. `setup(model)` reads the search space; `sample(step, max_steps)` returns the subnetworks of one
    optimizer step. Subclasses set `name` and implement `_sample`."""

    name = ""

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int("seed", seed, minimum=None)
        self.space: dict[str, list[int]] | None = None

    @property
    def passes(self) -> int:
        """How many subnetworks (forward/backward passes) one optimizer step trains."""
        return 1

    def setup(self, model: nn.Module, adapter_name: str | None = None, state: Mapping[str, Any] | None = None) -> None:
        """Read the search space of `model`; `state` is what `state()` returned when a checkpoint was saved."""
        self.space = search_space(model, adapter_name)
        self.maximal = {name: choices[0] for name, choices in self.space.items()}
        self.minimal = {name: choices[-1] for name, choices in self.space.items()}

    def sample(self, step: int, max_steps: int = 0) -> list[Subnetwork]:
        """The subnetworks that optimizer step `step` (0-based; `max_steps` in all) trains."""
        if self.space is None:
            raise RuntimeError(f"{type(self).__name__}.setup(model) must be called before sample().")
        return self._sample(step_rng(self.seed, step), step, max_steps)

    def _sample(self, rng: random.Random, step: int, max_steps: int) -> list[Subnetwork]:
        raise NotImplementedError

    def draw(self, rng: random.Random) -> Subnetwork:
        """A subnetwork with every group's rank drawn uniformly from its choices (group by group, in order)."""
        return {name: choices[rng.randrange(len(choices))] for name, choices in self.space.items()}

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state needed to continue the same sequence after a resume (none by default)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class RandomSampler(SubnetworkSampler):
    """Each step trains one subnetwork whose groups draw their rank uniformly and independently (Shears, LoNAS)."""

    name = "random"

    def _sample(self, rng, step, max_steps):
        return [self.draw(rng)]


class SandwichSampler(SubnetworkSampler):
    """The sandwich rule (Yu et al., *Universally Slimmable Networks*, 2019; *BigNAS*, 2020): each step trains the
    maximal subnetwork, `num_random` uniformly random ones and the minimal one, and sums their gradients. Needs a
    trainer that runs several passes per step (`peft_elastic.training.ElasticTrainer` / `ElasticSFTTrainer`)."""

    name = "sandwich"

    def __init__(self, seed: int = 0, num_random: int = 1) -> None:
        super().__init__(seed)
        self.num_random = check_int("num_random", num_random, 0, valid="an int >= 0 (random subnetworks per step)")

    @property
    def passes(self) -> int:
        return self.num_random + 2

    def _sample(self, rng, step, max_steps):
        return [dict(self.maximal), *(self.draw(rng) for _ in range(self.num_random)), dict(self.minimal)]

    def __repr__(self) -> str:
        return f"SandwichSampler(seed={self.seed}, num_random={self.num_random})"


class RandomLinearSampler(SubnetworkSampler):
    """Step `t` of `T` trains a uniformly random subnetwork with probability `t / T` and the maximal one otherwise:
    training starts as plain LoRA and ends as `random` (a warm-up for the super-network)."""

    name = "random_linear"

    def _sample(self, rng, step, max_steps):
        probability = min(1.0, step / max_steps) if max_steps > 0 else 1.0
        if rng.random() < probability:
            return [self.draw(rng)]
        return [dict(self.maximal)]


class FixedSampler(SubnetworkSampler):
    """Every step trains the same subnetwork: "maximal" (plain LoRA training), "heuristic", "minimal" or a dict
    (groups it does not name: their maximal rank)."""

    name = "fixed"

    def __init__(self, seed: int = 0, subnetwork: str | Mapping[str, int] = "maximal") -> None:
        super().__init__(seed)
        if not isinstance(subnetwork, (str, Mapping)):
            raise ValueError(
                f"subnetwork must be 'maximal', 'heuristic', 'minimal' or a dict {{group name: choice}}, "
                f"got {subnetwork!r}."
            )
        self.subnetwork = subnetwork

    def setup(self, model, adapter_name=None, state=None):
        super().setup(model, adapter_name, state)
        self.fixed = {**self.maximal, **named_subnetwork(model, self.subnetwork, adapter_name)}

    def _sample(self, rng, step, max_steps):
        return [dict(self.fixed)]

    def __repr__(self) -> str:
        return f"FixedSampler(subnetwork={self.subnetwork!r})"


class GridParamsSampler(SubnetworkSampler):
    """Grid-params sampling (Sukthanker et al., *LLM Compression with Neural Architecture Search*,
    2024): spend the steps evenly over model sizes instead of oversampling mid-sized subnetworks as uniform draws do.

    At setup, the range `[params(minimal), params(maximal)]` of active adapter parameters is cut into `bins` equal
    bins. Candidates are drawn by rejection sampling until every bin holds `candidates` distinct subnetworks or
    `max_tries` draws were made; a bin keeps the candidate with the largest weight magnitude
    `sqrt(Σ ||A[:k]||² + ||B[:, :k]||²)` over its modules (ties: more parameters, then first drawn). Each training
    step then trains one grid entry drawn uniformly. The minimal and maximal subnetworks are always candidates of the
    first and last bin; bins that no subnetwork falls into stay empty and are left out (their count is logged in
    `empty_bins`).

    Proposals: uniform per-group draws concentrate around the middle of the range, so each proposal first draws a
    density `t ~ U(0, 1)` and then gives each group choice index `i` (0 = largest) with probability
    `Binomial(n - 1, 1 - t)`; proposals therefore spread over the whole range, and rejection keeps bins exact.
    The grid is built from the adapter weights at setup and saved with the trainer state, so a resumed run keeps it.
    """

    name = "grid_params"

    def __init__(self, seed: int = 0, bins: int = 10, candidates: int = 10, max_tries: int | None = None) -> None:
        super().__init__(seed)
        check_int("bins", bins)
        check_int("candidates", candidates)
        if max_tries is None:
            max_tries = 200 * bins * candidates
        check_int("max_tries", max_tries, valid="an int >= 1 (None: 200 * bins * candidates)")
        self.bins, self.candidates, self.max_tries = bins, candidates, max_tries
        self.grid: list[Subnetwork] = []
        self.empty_bins = 0

    def setup(self, model, adapter_name=None, state=None):
        super().setup(model, adapter_name, state)
        self.costs = parameters_per_rank(model, adapter_name)
        widths = sorted(set(self.space) - set(self.costs))
        if widths:
            raise ValueError(
                f"strategy='grid_params' bins subnetworks by their adapter ranks and is not available with elastic "
                f"widths (Mode B; e.g. {widths[0]!r}); use 'random', 'sandwich' or 'random_linear'."
            )
        if state and state.get("grid"):
            grid = [dict(entry) for entry in state["grid"]]
            fits = state.get("bins", self.bins) == self.bins and len(grid) <= self.bins
            for entry in grid:
                fits = fits and entry.keys() == self.space.keys()
                fits = fits and all(type(rank) is int and rank in self.space[g] for g, rank in entry.items())
            if not fits:
                raise ValueError(
                    f"The grid_params grid saved in the checkpoint (bins={state.get('bins')}) does not fit this "
                    f"model's search space and bins={self.bins}; resume with the model, adapter configuration and "
                    "sampler options the checkpoint was trained with."
                )
            self.grid, self.empty_bins = grid, int(state.get("empty_bins", 0))
            return
        self.grid, self.empty_bins = self.build_grid(model, adapter_name)

    def params(self, subnetwork: Mapping[str, int]) -> int:
        return sum(self.costs[name] * rank for name, rank in subnetwork.items())

    def build_grid(self, model: nn.Module, adapter_name: str | None = None) -> tuple[list[Subnetwork], int]:
        """Return the grid (one subnetwork per non-empty bin, smallest first) and the number of empty bins."""
        self.costs = parameters_per_rank(model, adapter_name)
        magnitudes = _prefix_square_norms(model, adapter_name)
        low, high = self.params(self.minimal), self.params(self.maximal)

        def bin_of(params: int) -> int:
            if high == low:
                return 0
            return min(self.bins - 1, int((params - low) * self.bins / (high - low)))

        found: list[dict[tuple, Subnetwork]] = [{} for _ in range(self.bins)]

        def offer(subnetwork: Subnetwork) -> None:
            chosen = found[bin_of(self.params(subnetwork))]
            key = tuple(subnetwork.values())
            if len(chosen) < self.candidates and key not in chosen:
                chosen[key] = subnetwork

        offer(dict(self.minimal))
        offer(dict(self.maximal))
        rng = random.Random(f"peft_elastic:grid_params:{self.seed}")
        for _ in range(self.max_tries):
            if all(len(chosen) >= self.candidates for chosen in found):
                break
            density = rng.random()
            offer(
                {
                    name: choices[sum(rng.random() >= density for _ in range(len(choices) - 1))]
                    for name, choices in self.space.items()
                }
            )
        grid = []
        for chosen in found:
            if chosen:
                grid.append(
                    max(
                        chosen.values(),
                        key=lambda s: (sum(magnitudes[g][k] for g, k in s.items()), self.params(s)),
                    )
                )
        return grid, sum(1 for chosen in found if not chosen)

    def _sample(self, rng, step, max_steps):
        return [dict(self.grid[rng.randrange(len(self.grid))])]

    def state(self):
        return {"grid": [dict(entry) for entry in self.grid], "empty_bins": self.empty_bins, "bins": self.bins}

    def __repr__(self) -> str:
        return (
            f"GridParamsSampler(seed={self.seed}, bins={self.bins}, candidates={self.candidates}, "
            f"max_tries={self.max_tries})"
        )


def _prefix_square_norms(model: nn.Module, adapter_name: str | None) -> dict[str, dict[int, float]]:
    """`{group: {rank k: Σ over the group's modules of ||A[:k]||² + ||B[:, :k]||²}}` for every choice `k`."""
    space = SearchSpace.of(model, adapter_name)
    adapter_name, groups = space.adapter_name, space.rank_groups
    norms = {}
    with torch.no_grad():
        for name, group in groups.items():
            total = None
            for _, layer in group.modules:
                rows = layer.lora_A[adapter_name].weight.float().pow(2).sum(dim=1)
                cols = layer.lora_B[adapter_name].weight.float().pow(2).sum(dim=0)
                cumulative = torch.cumsum(rows + cols, dim=0)
                total = cumulative if total is None else total + cumulative
            norms[name] = {k: float(total[k - 1]) for k in group.choices}
    return norms


SAMPLER_CLASSES: dict[str, type[SubnetworkSampler]] = {
    cls.name: cls for cls in (RandomSampler, SandwichSampler, RandomLinearSampler, GridParamsSampler, FixedSampler)
}


def make_sampler(strategy: str, seed: int = 0, **options: Any) -> SubnetworkSampler:
    """The sampler for `strategy` (one of `SAMPLER_CLASSES`) with its options (e.g. `num_random=2` for "sandwich")."""
    if strategy not in SAMPLER_CLASSES:
        raise ValueError(f"Unknown sampling strategy {strategy!r}; valid strategies: {sorted(SAMPLER_CLASSES)}.")
    cls = SAMPLER_CLASSES[strategy]
    accepted = set(cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount]) - {"seed"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"Option(s) {unknown} do not apply to strategy {strategy!r}; it accepts "
            f"{sorted(accepted) if accepted else 'no options'}."
        )
    return cls(seed, **options)


__all__ = [
    "SAMPLER_CLASSES",
    "FixedSampler",
    "GridParamsSampler",
    "RandomLinearSampler",
    "RandomSampler",
    "SandwichSampler",
    "SubnetworkSampler",
    "make_sampler",
    "named_subnetwork",
    "step_rng",
]
