"""A resumed search proposes new subnetworks: a subnetwork proposed again is served from the storage and not counted
as a trial, so `n_trials` distinct subnetworks are evaluated where the space allows; a space smaller than `n_trials`
stops the search once every subnetwork has been evaluated, and the search says so."""

from __future__ import annotations

import json
import math
import random
import warnings

import optuna
import pytest
from peft import get_peft_model
from test_search import Synthetic, adapter_params, super_network

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.search import SearchResult, run_search
from peft_elastic.toy import tiny_llama


def distinct(trials: list[dict]) -> int:
    return len({json.dumps(t["subnetwork"], sort_keys=True) for t in trials})


@pytest.fixture(scope="module")
def model():
    return super_network()  # 6 groups of 3 ranks: 729 subnetworks


@pytest.fixture(scope="module")
def small():
    config = ElasticLoraConfig(r=8, rank_choices=[8, 6, 4], target_modules=["q_proj", "k_proj", "v_proj"])
    return get_peft_model(tiny_llama(), config)  # 2 groups of 3 ranks: 9 subnetworks


@pytest.mark.parametrize("strategy", ["nsga2", "tpe", "random", "hill_climb"])
def test_resumed_search_evaluates_new_subnetworks(model, strategy, tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    evaluator = Synthetic(model)
    first = run_search(
        model, evaluator, strategy, adapter_params, n_trials=12, seed=0, storage=storage, progress=False
    )
    assert evaluator.calls == 12 and distinct(first.trials) == 12
    second = run_search(
        model, evaluator, strategy, adapter_params, n_trials=24, seed=0, storage=storage, progress=False
    )
    assert second.trials[:12] == first.trials  # kept, in order
    assert len(second.trials) == 24 and all(t["state"] == "complete" for t in second.trials)
    assert distinct(second.trials) == 24  # every new trial is a new subnetwork ...
    assert evaluator.calls == 24  # ... evaluated once
    assert second.stopped is None and second.timing["evaluations"] == 12
    # a repeat a sampler proposed is in the storage as a failed trial that points at the trial that evaluated it
    study = optuna.load_study(study_name=f"peft_elastic-{strategy}", storage=storage)
    numbers = {t["number"]: t["subnetwork"] for t in second.trials}
    repeats = [t for t in study.get_trials(deepcopy=False) if "repeat_of" in t.user_attrs]
    assert len(repeats) == second.timing["repeats"] + first.timing["repeats"]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in repeats)
    assert all(numbers[t.user_attrs["repeat_of"]] == t.params for t in repeats)


def test_a_resumed_search_is_reproducible(model, tmp_path):
    runs = []
    for name in ("a", "b"):
        storage = f"sqlite:///{tmp_path / name}.db"
        run_search(
            model, Synthetic(model), "nsga2", adapter_params, n_trials=6, seed=3, storage=storage, progress=False
        )
        result = run_search(
            model, Synthetic(model), "nsga2", adapter_params, n_trials=12, seed=3, storage=storage, progress=False
        )
        runs.append([(t["subnetwork"], t["metric"], t["cost"]) for t in result.trials])
    assert runs[0] == runs[1] and len(runs[0]) == 12


@pytest.mark.parametrize("strategy", ["nsga2", "tpe", "random"])
def test_a_space_smaller_than_n_trials_stops_when_every_subnetwork_is_evaluated(small, strategy, tmp_path):
    space = peft_elastic.search_space(small)
    size = math.prod(len(choices) for choices in space.values())
    assert size == 9
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    evaluator = Synthetic(small)
    run_search(small, evaluator, strategy, adapter_params, n_trials=5, seed=0, storage=storage, progress=False)
    with pytest.warns(UserWarning, match=r"All 9 subnetworks of the search space have been evaluated: the search "
                      r"stopped at 9 of n_trials=20 trials"):  # fmt: skip
        result = run_search(
            small, evaluator, strategy, adapter_params, n_trials=20, seed=0, storage=storage, progress=False
        )
    assert len(result.trials) == 9 and distinct(result.trials) == 9 and evaluator.calls == 9
    assert result.stopped.startswith("All 9 subnetworks of the search space have been evaluated")
    # the same call again asks the sampler for nothing and evaluates nothing
    again = run_search(
        small, lambda m: pytest.fail("evaluated again"), strategy, adapter_params, n_trials=20, seed=0,
        storage=storage, direction="minimize", progress=False,
    )  # fmt: skip
    assert again.trials == result.trials and again.timing["repeats"] == 0
    study = optuna.load_study(study_name=f"peft_elastic-{strategy}", storage=storage)
    trials = study.get_trials(deepcopy=False)
    repeats = sum("repeat_of" in t.user_attrs for t in trials)
    assert len(trials) == 9 + repeats  # nothing but the 9 evaluations and the repeats a sampler proposed


def test_the_stop_reason_round_trips_and_hill_climb_says_when_it_stops(small, tmp_path):
    with pytest.warns(UserWarning, match=r"the search stopped at \d of n_trials=20 trials"):
        result = run_search(small, Synthetic(small), "hill_climb", adapter_params, n_trials=20, progress=False)
    assert distinct(result.trials) == len(result.trials) <= 9 and result.stopped
    assert SearchResult.load(result.save(tmp_path / "result.json")) == result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = run_search(small, Synthetic(small), "random", adapter_params, n_trials=9, progress=False)
    assert full.stopped is None and distinct(full.trials) == 9  # n_trials = the space: no warning, all evaluated


def test_a_sampler_that_only_repeats_itself_gets_random_unevaluated_subnetworks(model):
    from peft_elastic.search.strategies import MAX_REPEATS, SearchStrategy, unevaluated_subnetwork

    maximal = peft_elastic.maximal_subnetwork(model)

    class Stuck(SearchStrategy):  # a strategy of one's own: its sampler proposes the maximal subnetwork only
        name = "stuck"

        def sampler(self, seed, population_size=None):
            return optuna.samplers.PartialFixedSampler(maximal, optuna.samplers.RandomSampler(seed=0))

    result = run_search(model, Synthetic(model), Stuck(), adapter_params, n_trials=6, progress=False)
    assert len(result.trials) == 6 and distinct(result.trials) == 6
    # after the 3 seeds, each new subnetwork came after MAX_REPEATS proposals of the maximal one
    assert result.timing["repeats"] == 3 * MAX_REPEATS and result.stopped is None

    space = peft_elastic.search_space(model)
    rng, evaluated = random.Random(0), set()
    while (subnetwork := unevaluated_subnetwork(space, evaluated, rng)) is not None:
        key = tuple(subnetwork[name] for name in space)
        assert key not in evaluated and all(subnetwork[name] in choices for name, choices in space.items())
        evaluated.add(key)
    assert len(evaluated) == 729  # every subnetwork of the space, then None
