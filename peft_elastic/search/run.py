"""`run_search`: find Pareto-optimal subnetworks of a trained super-network (metric vs cost), switching subnetworks
in memory, resumable through an optuna storage."""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping

from torch import nn

from ..checks import check_int
from ..choices import SEARCH_COSTS
from ..cost import CostModel
from ..subnetwork import SearchSpace, heuristic_subnetwork, maximal_subnetwork, minimal_subnetwork
from ..tuners.elastic_lora.space import RankGroup
from .latency import RelativeLatency
from .result import SearchResult
from .strategies import (
    MAX_REPEATS,
    SearchStrategy,
    Stop,
    resumed_seed,
    search_strategy,
    subnetwork_key,
    unevaluated_subnetwork,
)

DIRECTIONS = ("minimize", "maximize")


def run_search(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    strategy: str | SearchStrategy = "nsga2",
    cost: str | Callable[[nn.Module, Mapping[str, int]], float] = "params",
    n_trials: int = 100,
    seed: int = 0,
    storage: str | None = None,
    *,
    direction: str | None = None,
    study_name: str | None = None,
    adapter_name: str | None = None,
    seq_len: int = 128,
    population_size: int | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search the subnetworks of `model` (a PeftModel with an elastic adapter) for the best trade-offs between
    `evaluate(model)` (a float; its `direction` attribute, else `direction=`, says whether lower or higher is better)
    and `cost` ("params" or "macs" of the deployed subnetwork, see `peft_elastic.cost`; "latency", the subnetwork's
    forward time through the super-network over the maximal subnetwork's, the median ratio of interleaved rounds
    (`RelativeLatency`; its quartiles are kept in each trial's `cost_spread`); "adapter_params", the
    adapter parameters it uses (what Shears compares: with rank choices only, every subnetwork deploys as a model of
    the base's size); or a callable `(model, subnetwork) -> float`). `strategy`: one of `SEARCH_STRATEGIES`, or a
    `SearchStrategy` (`peft_elastic.search.strategies`).
    `n_trials` is the number of trials of the study: evaluated subnetworks, each a different one (complete or failed
    by its evaluation), so a resumed search (same `storage`, an optuna URL such as "sqlite:///search.db") continues
    up to it with new subnetworks. A subnetwork proposed again is not evaluated nor counted: it is recorded as a
    failed trial with user attribute `repeat_of` (samplers ignore failed trials) and the sampler is asked again. The
    search stops early, with a warning and `SearchResult.stopped`, when every subnetwork of the space has been
    evaluated (or hill_climb reaches a local optimum). The model's active subnetwork is restored at the end."""
    strategy = search_strategy(strategy)
    if not callable(cost) and cost not in SEARCH_COSTS:
        raise ValueError(
            f"Unknown cost {cost!r}; use one of {list(SEARCH_COSTS)} or a callable (model, subnetwork) -> float."
        )
    check_int("n_trials", n_trials)
    if not callable(evaluate):
        raise ValueError(f"evaluate must be a callable model -> float (e.g. LossEvaluator(...)), got {evaluate!r}.")
    direction = direction or getattr(evaluate, "direction", None) or "minimize"
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}.")
    import optuna
    from optuna.distributions import CategoricalDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = SearchSpace.of(model, adapter_name)  # the groups, found once: trials switch subnetworks through it
    space = search.choices
    distributions = {name: CategoricalDistribution(choices) for name, choices in space.items()}
    seeds = {
        "maximal": maximal_subnetwork(model, adapter_name),
        "heuristic": heuristic_subnetwork(model, adapter_name),
        "minimal": minimal_subnetwork(model, adapter_name),
    }
    cost_name = cost if isinstance(cost, str) else getattr(cost, "__name__", "custom")
    signature = {"space": space, "direction": direction, "cost": cost_name}
    study = optuna.create_study(
        storage=storage,
        study_name=study_name or f"peft_elastic-{strategy.name}",
        directions=[direction, "minimize"],
        load_if_exists=True,
    )
    # a resumed study gets a seed of its own: with `seed` again, the sampler would propose the first run's subnetworks
    seed = resumed_seed(seed, len(study.get_trials(deepcopy=False)))
    study.sampler = strategy.sampler(seed, population_size)
    saved = study.user_attrs.get("signature")
    if saved is None:
        study.set_user_attr("signature", json.loads(json.dumps(signature)))
        for name in strategy.seeds:
            study.enqueue_trial(seeds[name], skip_if_exists=True)
    elif saved != json.loads(json.dumps(signature)):
        raise ValueError(
            f"The storage's study {study.study_name!r} belongs to a different search (its search space, metric "
            "direction or cost differ from this one's); use another storage or study_name."
        )
    _requeue_interrupted(study, space)
    if strategy.max_trials is not None:
        n_trials = min(n_trials, strategy.max_trials)

    measure = _cost_function(model, cost, seq_len, adapter_name)
    if cost in ("params", "macs") and all(isinstance(group, RankGroup) for group in search.groups.values()):
        warnings.warn(
            f"cost={cost!r} is the same for every subnetwork of this model: with rank choices only, each deploys as a "
            "model of the base's size. Use cost='adapter_params' (the adapter parameters, what Shears compares), "
            "'latency', or a callable.",
            UserWarning,
            stacklevel=2,
        )
    active = search.current()
    rng = random.Random(seed)
    timing = {"switch_seconds": 0.0, "evaluate_seconds": 0.0, "cost_seconds": 0.0, "evaluations": 0, "repeats": 0}
    started = time.perf_counter()
    evaluated = _evaluated(study, space)  # kept up to date below, instead of scanning every trial per trial
    size = math.prod(len(choices) for choices in space.values())
    finished, in_a_row, stopped = _finished(study), 0, None
    bar = _progress(progress, n_trials, finished)
    try:
        while finished < n_trials:
            if len(evaluated) >= size:
                stopped = f"All {size} subnetworks of the search space have been evaluated"
                break
            if not study.get_trials(deepcopy=False, states=_waiting()):
                proposal = strategy.propose(study, space, direction, rng)
                if isinstance(proposal, Stop):
                    stopped = proposal.reason
                    break
                if proposal is not None:
                    study.enqueue_trial(proposal)
                elif in_a_row >= MAX_REPEATS:  # the sampler keeps proposing evaluated subnetworks
                    study.enqueue_trial(unevaluated_subnetwork(space, evaluated, rng))
            trial = study.ask(distributions)
            params = trial.params  # a copy per access
            subnetwork = {name: params[name] for name in space}
            key = subnetwork_key(subnetwork, space)
            if key in evaluated:  # proposed again: served from the storage, not evaluated nor counted; ask again
                trial.set_user_attr("repeat_of", evaluated[key])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                timing["repeats"] += 1
                in_a_row += 1
                continue
            in_a_row = 0
            tick = time.perf_counter()
            search.apply(subnetwork)  # the sampled choices come from the space: valid
            timing["switch_seconds"] += time.perf_counter() - tick
            tick = time.perf_counter()
            metric = evaluate(model)
            timing["evaluate_seconds"] += time.perf_counter() - tick
            tick = time.perf_counter()
            value = measure(model, subnetwork)
            timing["cost_seconds"] += time.perf_counter() - tick
            spread = getattr(measure, "last", None)  # RelativeLatency: the quartiles of its ratio
            if spread is not None:
                trial.set_user_attr("cost_spread", spread["quartiles"])
            timing["evaluations"] += 1
            if isinstance(metric, bool) or not isinstance(metric, (int, float)) or not math.isfinite(metric):
                trial.set_user_attr("failure", f"the evaluator returned {metric!r}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, [float(metric), float(value)])
            evaluated[key] = trial.number
            finished += 1
            bar.update(1)
    finally:
        bar.close()
        search.apply(active)
    if stopped is not None:
        stopped += f": the search stopped at {finished} of n_trials={n_trials} trials."
        warnings.warn(stopped, UserWarning, stacklevel=2)
    timing["total_seconds"] = time.perf_counter() - started
    timing["overhead_fraction"] = (
        (timing["total_seconds"] - timing["evaluate_seconds"]) / timing["evaluate_seconds"]
        if timing["evaluate_seconds"]
        else None
    )
    return _result(study, space, direction, cost_name, strategy.name, seeds, timing, stopped)


def _cost_function(model: nn.Module, cost, seq_len: int, adapter_name: str | None):
    if callable(cost):
        return cost
    if cost in ("params", "macs", "adapter_params"):
        costs = CostModel(model, adapter_name)  # the model walked once, not per trial
        if cost == "params":
            return lambda model, subnetwork: costs.params(subnetwork)
        if cost == "macs":
            return lambda model, subnetwork: costs.macs(subnetwork, seq_len)
        return lambda model, subnetwork: costs.adapter_params(subnetwork)
    # the super-network's forward with the subnetwork active (sliced, adapters unmerged), relative to the maximal
    # subnetwork's in interleaved rounds: a proxy of the exported model's latency that needs no export
    return RelativeLatency(model, adapter_name, seq_len=seq_len)


def _requeue_interrupted(study, space) -> None:
    """Trials left running by a process that died (one process per study): close them as failed without a
    `failure` reason — which marks them as interrupted, not counted and not reported — and queue their subnetworks
    again, so that nothing finished is repeated and nothing started is lost."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if len(trial.params) == len(space):
            study.enqueue_trial({name: trial.params[name] for name in space}, skip_if_exists=False)


def _counted(trial) -> bool:
    """Complete trials, and trials failed by their evaluation (not interrupted ones)."""
    import optuna

    if trial.state == optuna.trial.TrialState.COMPLETE:
        return True
    return trial.state == optuna.trial.TrialState.FAIL and "failure" in trial.user_attrs


def _evaluated(study, space) -> dict[tuple, int]:
    """`{subnetwork key: number of the trial that evaluated it}` of the counted trials."""
    evaluated = {}
    for trial in study.get_trials(deepcopy=False):
        if _counted(trial):
            evaluated.setdefault(subnetwork_key(trial.params, space), trial.number)
    return evaluated


def _finished(study) -> int:
    return sum(_counted(t) for t in study.get_trials(deepcopy=False))


def _waiting():
    import optuna

    return (optuna.trial.TrialState.WAITING,)


def _result(study, space, direction, cost_name, strategy, seeds, timing, stopped) -> SearchResult:
    import optuna

    trials = []
    for t in study.get_trials(deepcopy=False):
        if not _counted(t):
            continue
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        complete = t.state == optuna.trial.TrialState.COMPLETE
        trials.append(
            {
                "number": t.number,
                "subnetwork": {name: t.params[name] for name in space},
                "metric": t.values[0] if complete else None,
                "cost": t.values[1] if complete else None,
                "state": "complete" if complete else "failed",
                "seconds": seconds,
            }
        )
        if "cost_spread" in t.user_attrs:
            trials[-1]["cost_spread"] = t.user_attrs["cost_spread"]
    reference = next((t for t in trials if t["state"] == "complete" and t["subnetwork"] == seeds["maximal"]), None)
    heuristic = next((t for t in trials if t["state"] == "complete" and t["subnetwork"] == seeds["heuristic"]), None)
    return SearchResult(
        trials=trials,
        direction=direction,
        cost_name=cost_name,
        strategy=strategy,
        reference=reference,
        heuristic=heuristic,
        timing=timing,
        stopped=stopped,
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="search", unit="trial")
