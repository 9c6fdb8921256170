"""Search strategies behind one ask/tell interface (optuna): each only sees "subnetwork in, objectives out".

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

from ..choices import SEARCH_STRATEGIES

STRATEGIES = SEARCH_STRATEGIES
MAX_REPEATS = 10  # proposals of evaluated subnetworks in a row after which a random unevaluated one is taken


def resumed_seed(seed: int, trials: int) -> int:
    """The seed of the sampler of a search that starts on a study holding `trials` trials: `seed` for a new study,
    else a 32-bit seed derived from both (with `seed` again, a sampler would draw the first run's sequence again)."""
    if trials == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{trials}".encode()).digest()[:4], "little")


def optuna_sampler(strategy: str, seed: int, population_size: int | None = None):
    """The optuna sampler of `strategy` (hill_climb and heuristic propose their own points: random sampler)."""
    import optuna

    if strategy == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size or 20)
    if strategy == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    return optuna.samplers.RandomSampler(seed=seed)


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
        options = [n for n in neighbours(start, space) if _key(n, space) not in evaluated]
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
        if _key(subnetwork, space) not in evaluated:
            return {name: subnetwork[name] for name in space}
    return None


def _key(subnetwork: dict[str, int], space: dict[str, list[int]]) -> tuple:
    return tuple(subnetwork[name] for name in space)
