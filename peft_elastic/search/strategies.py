"""Search strategies behind one ask/tell interface (optuna): each only sees "subnetwork in, objectives out".

- `heuristic`: the maximal and the heuristic subnetwork (the LoNAS/Shears midpoint), nothing else;
- `random`: uniform draws (optuna's `RandomSampler`);
- `nsga2`: NSGA-II (optuna's `NSGAIISampler`);
- `tpe`: multi-objective TPE (optuna's `TPESampler`, multivariate);
- `hill_climb`: Pareto local search from the heuristic: each trial takes a random point of the current Pareto front
  and evaluates a random, not yet evaluated neighbour of it (one group moved by one step, up or down).

Every strategy but `heuristic` first evaluates the maximal, heuristic and minimal subnetworks (enqueued).
"""

from __future__ import annotations

import random

STRATEGIES = ("heuristic", "random", "nsga2", "tpe", "hill_climb")


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


def _key(subnetwork: dict[str, int], space: dict[str, list[int]]) -> tuple:
    return tuple(subnetwork[name] for name in space)
