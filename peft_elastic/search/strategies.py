"""Search strategies as objects behind one interface, `SearchStrategy`: which named subnetworks go first, the optuna
sampler that proposes the rest (ask/tell: each only sees "subnetwork in, objectives out"), and, for strategies that
propose their own points, `propose`. `run_search` knows no strategy by name.

- `heuristic`: the maximal and the heuristic subnetwork (the LoNAS/Shears midpoint), nothing else;
- `random`: uniform draws (optuna's `RandomSampler`);
- `nsga2`: NSGA-II (optuna's `NSGAIISampler`);
- `tpe`: multi-objective TPE (optuna's `TPESampler`, multivariate);
- `hill_climb`: Pareto local search from the heuristic: each trial takes a random point of the current Pareto front
  and evaluates a random, not yet evaluated neighbour of it (one group moved by one step, up or down).

Every strategy but `heuristic` first evaluates the maximal, heuristic and minimal subnetworks (enqueued). A
subnetwork proposed again is not a trial: `run_search` asks again, and after `MAX_REPEATS` repeats in a row takes a
random unevaluated subnetwork (`unevaluated_subnetwork`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Container
from dataclasses import dataclass

from ..choices import SEARCH_STRATEGIES
from .result import pareto_front

MAX_REPEATS = 10  # proposals of evaluated subnetworks in a row after which a random unevaluated one is taken


def resumed_seed(seed: int, trials: int) -> int:
    """The seed of the sampler of a search that starts on a study holding `trials` trials: `seed` for a new study,
    else a 32-bit seed derived from both (with `seed` again, a sampler would draw the first run's sequence again)."""
    if trials == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{trials}".encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Stop:
    """What `SearchStrategy.propose` returns to end the search: `reason` is warned (None: a planned end)."""

    reason: str | None = None


class SearchStrategy:
    """A strategy of `run_search`. Subclass it (and pass an instance as `strategy=`) for a strategy of your own."""

    #: The name `run_search(strategy=...)` takes, and the study's default name.
    name = ""
    #: The named subnetworks evaluated first, in this order (of "maximal", "heuristic", "minimal").
    seeds: tuple[str, ...] = ("maximal", "heuristic", "minimal")
    #: At most this many trials, whatever `n_trials` is (None: no limit of its own).
    max_trials: int | None = None

    def sampler(self, seed: int, population_size: int | None = None):
        """The optuna sampler that proposes the subnetworks this strategy does not propose itself."""
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)

    def propose(self, study, space: dict[str, list[int]], direction: str, rng: random.Random):
        """Called when no trial is queued: a subnetwork to evaluate next, None to let `sampler` propose one, or a
        `Stop` to end the search."""
        return None


class HeuristicStrategy(SearchStrategy):
    name = "heuristic"
    seeds = ("maximal", "heuristic")
    max_trials = 2

    def propose(self, study, space, direction, rng):
        return Stop()  # it evaluates its seeds only


class RandomStrategy(SearchStrategy):
    name = "random"


class NSGA2Strategy(SearchStrategy):
    name = "nsga2"

    def sampler(self, seed, population_size=None):
        import optuna

        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size or 20)


class TPEStrategy(SearchStrategy):
    name = "tpe"

    def sampler(self, seed, population_size=None):
        import optuna

        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)


class HillClimbStrategy(SearchStrategy):
    name = "hill_climb"

    def propose(self, study, space, direction, rng):
        import optuna

        trials = study.get_trials(deepcopy=False)
        evaluated = {subnetwork_key(t.params, space) for t in trials if len(t.params) == len(space)}
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        sign = 1 if direction == "minimize" else -1
        front = pareto_front(complete, lambda t: (sign * t.values[0], t.values[1]), lambda t: t.number)
        proposal = hill_climb_proposal(
            [{name: t.params[name] for name in space} for t in front], evaluated, space, rng
        )
        if proposal is None:
            return Stop("hill_climb reached a local optimum (every neighbour of its Pareto front evaluated)")
        return proposal


#: `run_search(strategy=name)`: the strategy of each name in `peft_elastic.choices.SEARCH_STRATEGIES`.
STRATEGY_CLASSES: dict[str, type[SearchStrategy]] = {
    cls.name: cls for cls in (HeuristicStrategy, RandomStrategy, NSGA2Strategy, TPEStrategy, HillClimbStrategy)
}


def search_strategy(strategy) -> SearchStrategy:
    """The `SearchStrategy` of `strategy`: a name in `SEARCH_STRATEGIES`, or a `SearchStrategy` (returned as is)."""
    if isinstance(strategy, SearchStrategy):
        return strategy
    if isinstance(strategy, str) and strategy in STRATEGY_CLASSES:
        return STRATEGY_CLASSES[strategy]()
    raise ValueError(f"Unknown search strategy {strategy!r}; valid strategies: {list(SEARCH_STRATEGIES)}.")


def neighbours(subnetwork: dict[str, int], space: dict[str, list[int]]) -> list[dict[str, int]]:
    """Every subnetwork one step away from `subnetwork`: one group moved to the next larger or smaller choice."""
    found = []
    for name, choices in space.items():
        index = choices.index(subnetwork[name])
        for step in (-1, 1):
            if 0 <= index + step < len(choices):
                found.append(subnetwork | {name: choices[index + step]})
    return found


def hill_climb_proposal(
    front: list[dict[str, int]], evaluated: set[tuple], space: dict[str, list[int]], rng: random.Random
) -> dict[str, int] | None:
    """A random unevaluated neighbour of a random point of `front` (None when the whole front's neighbourhood has
    been evaluated: a local optimum)."""
    starts = list(front)
    rng.shuffle(starts)
    for start in starts:
        options = [n for n in neighbours(start, space) if subnetwork_key(n, space) not in evaluated]
        if options:
            return rng.choice(options)
    return None


def unevaluated_subnetwork(
    space: dict[str, list[int]], evaluated: Container[tuple], rng: random.Random
) -> dict[str, int] | None:
    """The first subnetwork not in `evaluated` from a uniformly random position in the order of
    `itertools.product(*space.values())` (None when every subnetwork of `space` has been evaluated)."""
    size = math.prod(len(choices) for choices in space.values())
    start = rng.randrange(size)
    for offset in range(size):
        index, subnetwork = (start + offset) % size, {}
        for name, choices in reversed(space.items()):  # the last group varies fastest
            index, position = divmod(index, len(choices))
            subnetwork[name] = choices[position]
        if subnetwork_key(subnetwork, space) not in evaluated:
            return {name: subnetwork[name] for name in space}
    return None


def subnetwork_key(subnetwork: dict[str, int], space: dict[str, list[int]]) -> tuple:
    """`subnetwork`'s choices in the order of `space`: a hashable key (what identifies an evaluated subnetwork)."""
    return tuple(subnetwork[name] for name in space)
