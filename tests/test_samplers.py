"""Subnetwork samplers: determinism per (seed, step), each strategy's distribution, the grid_params grid, errors."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TARGETS, randomize_lora_b
from peft import LoraConfig, get_peft_model

import peft_elastic
from peft_elastic import ElasticLoraConfig, NLSConfig
from peft_elastic.toy import tiny_llama
from peft_elastic.training import (
    SAMPLER_CLASSES,
    FixedSampler,
    GridParamsSampler,
    RandomLinearSampler,
    RandomSampler,
    SandwichSampler,
    SubnetworkSampler,
    make_sampler,
)
from peft_elastic.training.samplers import step_rng

ROOT = Path(__file__).resolve().parents[1]
QKV0 = "model.layers.0.self_attn.q_proj+k_proj+v_proj"
UP1 = "model.layers.1.mlp.up_proj"
CHOICES = [8, 6, 4]


def seeded(config, seed=0):
    """A tiny Llama with `config`'s adapter, whose LoRA A factors are initialised from `seed`: grid_params depends on
    the weights, and the global torch RNG is seeded differently in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(tiny_llama(), config)


def nls(seed=0):
    return seeded(NLSConfig(r=8, lora_alpha=16, rank_choices=CHOICES, target_modules=TARGETS), seed)


def elastic(target_modules, seed=0):
    return seeded(ElasticLoraConfig(r=8, lora_alpha=16, rank_choices=CHOICES, target_modules=target_modules), seed)


@pytest.fixture(scope="module")
def model():
    """One NLS model (6 groups with choices [8, 6, 4]) shared by the tests that do not change its weights."""
    return nls()


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    f"""
    import json
    from peft import get_peft_model
    from peft_elastic import NLSConfig
    from peft_elastic.toy import tiny_llama
    from peft_elastic.training import RandomSampler
    config = NLSConfig(r=8, lora_alpha=16, rank_choices={CHOICES!r}, target_modules={TARGETS!r})
    sampler = RandomSampler(seed=3)
    sampler.setup(get_peft_model(tiny_llama(), config))
    print("SAMPLES", json.dumps([sampler.sample(step) for step in range(10)]))
    """
)


@pytest.fixture(scope="module", autouse=True)
def fresh_process(request):
    """A fresh Python process printing `RandomSampler(seed=3)`'s draws of steps 0..9 (what another DDP rank sees).

    It is started before the first test of this file, so that its slow start (importing torch, transformers and
    peft) overlaps with the other tests; `test_random_sampler_sequence_is_the_same_in_a_fresh_process` waits for it.
    """
    if not any(
        item.name == "test_random_sampler_sequence_is_the_same_in_a_fresh_process" for item in request.session.items
    ):
        yield None
        return
    # Another hash seed than this process's: string hashing must not leak into the draws.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    yield process
    if process.poll() is None:  # the test did not get to wait for it
        process.kill()
        process.communicate()


def set_up(sampler, model):
    sampler.setup(model)
    return sampler


def key(subnetwork):
    return tuple(sorted(subnetwork.items()))


def all_subnetworks(space):
    names = list(space)
    return [dict(zip(names, ranks, strict=True)) for ranks in itertools.product(*(space[n] for n in names))]


SAMPLER_FACTORIES = {
    "random": lambda seed: RandomSampler(seed),
    "sandwich": lambda seed: SandwichSampler(seed, num_random=2),
    "random_linear": lambda seed: RandomLinearSampler(seed),
    "grid_params": lambda seed: GridParamsSampler(seed, bins=6),
}


# --- determinism: draws depend on (seed, step) only ----------------------------------------------------------------


def test_step_rng_is_a_function_of_seed_and_step_only():
    def stream(seed, step):
        rng = step_rng(seed, step)
        return [rng.random() for _ in range(5)]

    assert stream(3, 7) == stream(3, 7)
    assert stream(3, 7) != stream(3, 8) and stream(3, 7) != stream(4, 7)
    assert stream(37, 0) != stream(3, 70)  # seed and step are kept apart
    # Pinned: a run resumed with another version of the library must continue the same sequence.
    pinned = random.Random("peft_elastic:3:7")
    assert stream(3, 7) == [pinned.random() for _ in range(5)]


@pytest.mark.parametrize("strategy", list(SAMPLER_FACTORIES))
def test_same_seed_and_step_same_subnetworks_across_instances(strategy):
    # Two models and two samplers built independently (as on two DDP ranks, whose weights DDP makes equal) agree
    # step by step.
    first = set_up(SAMPLER_FACTORIES[strategy](5), nls())
    second = set_up(SAMPLER_FACTORIES[strategy](5), nls())
    for step in range(40):
        assert first.sample(step, 40) == second.sample(step, 40)


def test_different_steps_give_different_subnetworks(model):
    sampler = set_up(RandomSampler(seed=0), model)
    samples = [sampler.sample(step)[0] for step in range(20)]
    # 729 subnetworks: 20 uniform draws are almost all distinct, and never the same one twice in a row.
    assert len({key(s) for s in samples}) >= 17
    assert all(samples[i] != samples[i + 1] for i in range(19))


def test_different_seeds_give_different_sequences(model):
    sequences = [[set_up(RandomSampler(seed), model).sample(step)[0] for step in range(20)] for seed in (0, 1, 2)]
    for a, b in itertools.combinations(sequences, 2):
        assert sum(x != y for x, y in zip(a, b, strict=True)) >= 17


@pytest.mark.parametrize("strategy", list(SAMPLER_FACTORIES))
def test_a_step_does_not_depend_on_earlier_draws(model, strategy):
    fresh = set_up(SAMPLER_FACTORIES[strategy](9), model)
    used = set_up(SAMPLER_FACTORIES[strategy](9), model)
    for step in range(5):
        used.sample(step, 10)
    expected = fresh.sample(5, 10)
    assert used.sample(5, 10) == expected
    for step in range(6, 10):
        used.sample(step, 10)
    assert used.sample(5, 10) == expected  # and sampling later steps does not change it either


def test_returned_subnetworks_are_copies(model):
    # A caller that edits a returned dict must not change what later steps return.
    for sampler in (SandwichSampler(num_random=0), RandomLinearSampler(), FixedSampler(), GridParamsSampler(bins=3)):
        set_up(sampler, model)
        expected = [dict(subnetwork) for subnetwork in sampler.sample(0, 10)]
        for subnetwork in sampler.sample(0, 10):
            subnetwork[QKV0] = -1
        assert sampler.sample(0, 10) == expected


# --- random --------------------------------------------------------------------------------------------------------


def test_random_sampler_draws_are_valid_and_uniform(model):
    sampler = set_up(RandomSampler(seed=4), model)
    space = peft_elastic.search_space(model)
    assert sampler.passes == 1 and sampler.space == space
    steps = 600
    counts = {name: Counter() for name in space}
    for step in range(steps):
        draws = sampler.sample(step)
        assert len(draws) == 1
        (subnetwork,) = draws
        assert list(subnetwork) == list(space)
        for name, rank in subnetwork.items():
            assert rank in space[name]
            counts[name][rank] += 1
    bound = 4.5 * math.sqrt((1 / 3) * (2 / 3) / steps)  # 4.5 standard deviations of a binomial frequency
    for name in space:
        assert set(counts[name]) == set(CHOICES)
        for rank in CHOICES:
            assert abs(counts[name][rank] / steps - 1 / 3) < bound, (name, rank, counts[name])


# --- sandwich ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_random", [0, 1, 3])
def test_sandwich_is_maximal_random_minimal(model, num_random):
    sampler = set_up(SandwichSampler(seed=2, num_random=num_random), model)
    assert sampler.passes == num_random + 2
    maximal, minimal = peft_elastic.maximal_subnetwork(model), peft_elastic.minimal_subnetwork(model)
    space = peft_elastic.search_space(model)
    middles = set()
    for step in range(20):
        draws = sampler.sample(step)
        assert len(draws) == num_random + 2
        assert draws[0] == maximal and draws[-1] == minimal
        for subnetwork in draws[1:-1]:
            assert list(subnetwork) == list(space) and all(subnetwork[n] in space[n] for n in space)
            middles.add(key(subnetwork))
    if num_random == 0:
        assert sampler.sample(0) == [maximal, minimal]
    else:
        assert len(middles) >= 15 * num_random  # the middle ones are fresh random draws, not fixed


@pytest.mark.parametrize("num_random", [-1, 1.5, True, "2", None])
def test_sandwich_rejects_invalid_num_random(num_random):
    with pytest.raises(ValueError, match=r"num_random must be an int >= 0.*got " + re.escape(repr(num_random))):
        SandwichSampler(num_random=num_random)


# --- random_linear -------------------------------------------------------------------------------------------------


def test_random_linear_starts_maximal(model):
    maximal = peft_elastic.maximal_subnetwork(model)
    for seed in range(50):
        assert set_up(RandomLinearSampler(seed), model).sample(0, 100) == [maximal]


def test_random_linear_probability_grows_linearly(model):
    maximal = peft_elastic.maximal_subnetwork(model)
    seeds, total = 40, 100
    non_maximal = [0] * total
    for seed in range(seeds):
        sampler = set_up(RandomLinearSampler(seed), model)
        for step in range(total):
            (subnetwork,) = sampler.sample(step, total)
            non_maximal[step] += subnetwork != maximal
    first, last = sum(non_maximal[:25]) / (25 * seeds), sum(non_maximal[75:]) / (25 * seeds)
    assert first < 0.2 and last > 0.75 and last - first > 0.6
    p_not_maximal = 1 - 1 / 729  # a random draw is the maximal subnetwork with probability 1/729
    for decile in range(10):
        steps = range(10 * decile, 10 * decile + 10)
        observed = sum(non_maximal[t] for t in steps) / (10 * seeds)
        expected = sum(t / total for t in steps) / 10 * p_not_maximal
        assert abs(observed - expected) < 0.1, (decile, observed, expected)


@pytest.mark.parametrize(("step", "max_steps"), [(100, 100), (150, 100), (0, 0), (7, 0)])
def test_random_linear_is_random_at_the_end_and_without_max_steps(model, step, max_steps):
    maximal = peft_elastic.maximal_subnetwork(model)
    counts = {name: Counter() for name in maximal}
    seeds = 300
    maximal_draws = 0
    for seed in range(seeds):
        (subnetwork,) = set_up(RandomLinearSampler(seed), model).sample(step, max_steps)
        maximal_draws += subnetwork == maximal
        for name, rank in subnetwork.items():
            counts[name][rank] += 1
    # P(a uniform draw is maximal) = 1/729: about 0.4 in 300 draws; far from the 0% random of a warm-up.
    assert maximal_draws <= 4
    bound = 4.5 * math.sqrt((1 / 3) * (2 / 3) / seeds)
    for name in maximal:
        for rank in CHOICES:
            assert abs(counts[name][rank] / seeds - 1 / 3) < bound, (name, rank, counts[name])


# --- fixed ---------------------------------------------------------------------------------------------------------


def test_fixed_named_and_partial_subnetworks(model):
    maximal = peft_elastic.maximal_subnetwork(model)
    cases = [
        ("maximal", maximal),
        ("heuristic", {name: 6 for name in maximal}),
        ("minimal", {name: 4 for name in maximal}),
        ({UP1: 6, QKV0: 4}, {**maximal, QKV0: 4, UP1: 6}),
    ]
    for spec, want in cases:
        sampler = set_up(FixedSampler(seed=7, subnetwork=spec), model)
        assert sampler.passes == 1
        for step in (0, 1, 50):
            assert sampler.sample(step, 100) == [want]
        assert list(sampler.sample(3)[0]) == list(maximal)  # module order, even for a partial dict
    assert set_up(FixedSampler(), model).sample(0) == [maximal]  # the default is plain LoRA training


def test_fixed_errors(model):
    with pytest.raises(ValueError, match=r"Unknown subnetwork name 'largest'.*'maximal', 'heuristic', 'minimal'"):
        set_up(FixedSampler(subnetwork="largest"), model)
    with pytest.raises(ValueError, match=r"Unknown group name\(s\) \['model\.layers\.9\.mlp\.up_proj'\]"):
        set_up(FixedSampler(subnetwork={"model.layers.9.mlp.up_proj": 8}), model)
    with pytest.raises(ValueError, match=r"Invalid choice\(s\).*up_proj': 5 \(valid: \[8, 6, 4\]\)"):
        set_up(FixedSampler(subnetwork={UP1: 5}), model)
    with pytest.raises(ValueError, match=r"subnetwork must be 'maximal', 'heuristic', 'minimal' or a dict.*got 8"):
        FixedSampler(subnetwork=8)


# --- grid_params ---------------------------------------------------------------------------------------------------


def bin_of(params, low, high, bins):
    return min(bins - 1, (params - low) * bins // (high - low))


def magnitude(model, subnetwork):
    """sqrt(Σ ||A[:k]||² + ||B[:, :k]||²) over every module of every group, computed from the weights directly."""
    root = model.base_model.model
    total = 0.0
    for group, k in subnetwork.items():
        prefix, _, leaves = group.rpartition(".")
        for leaf in leaves.split("+"):
            layer = root.get_submodule(f"{prefix}.{leaf}")
            a = layer.lora_A["default"].weight.detach().double()
            b = layer.lora_B["default"].weight.detach().double()
            total += float(a[:k].pow(2).sum() + b[:, :k].pow(2).sum())
    return math.sqrt(total)


@pytest.mark.parametrize(("bins", "candidates"), [(1, 10), (4, 10), (10, 10), (44, 2)])
def test_grid_params_grid_spreads_over_the_parameter_range(model, bins, candidates):
    sampler = set_up(GridParamsSampler(seed=1, bins=bins, candidates=candidates), model)
    grid = sampler.grid
    count = [peft_elastic.num_adapter_parameters(model, s) for s in grid]
    low = peft_elastic.num_adapter_parameters(model, peft_elastic.minimal_subnetwork(model))
    high = peft_elastic.num_adapter_parameters(model, peft_elastic.maximal_subnetwork(model))
    assert all(a < b for a, b in itertools.pairwise(count))
    grid_bins = [bin_of(p, low, high, bins) for p in count]
    assert len(set(grid_bins)) == len(grid_bins)
    assert grid_bins[0] == bin_of(low, low, high, bins) == 0 and grid_bins[-1] == bin_of(high, low, high, bins)
    assert grid_bins[-1] == bins - 1
    assert len(grid) + sampler.empty_bins == bins
    # Every bin that some subnetwork falls into is represented (729 subnetworks: checked exhaustively).
    space = peft_elastic.search_space(model)
    occupied = {bin_of(peft_elastic.num_adapter_parameters(model, s), low, high, bins) for s in all_subnetworks(space)}
    assert grid_bins == sorted(occupied)
    for entry in grid:
        assert list(entry) == list(space) and all(entry[n] in space[n] for n in space)
    # Parameter counts are low + 128 * (5 i + 3 j) (i: steps of the two q/k/v groups, 320 per rank; j: of the four
    # MLP groups, 192 per rank), and 5 i + 3 j misses 1, 2, 4, 7, 37, 40, 42 of 0..44: with 44 bins those are empty.
    assert sampler.empty_bins == {1: 0, 4: 0, 10: 0, 44: 7}[bins]


def randomize_b(model, seed):
    """B of about the size of A (||row of A||² ≈ 1/3 from its init, ||column of B||² ≈ 64 · 0.07² ≈ 0.31), so that
    the magnitude depends on both factors; k_proj's B three times larger, so that every module of a group counts."""
    randomize_lora_b(model, std=0.07, seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "k_proj.lora_B" in name:
                param.mul_(3)


@pytest.mark.parametrize(
    ("target_modules", "num_groups", "bins"),
    [(["q_proj", "k_proj", "v_proj"], 2, 3), (["up_proj", "down_proj"], 4, 4)],
)
def test_grid_params_keeps_the_largest_magnitude_of_each_bin(target_modules, num_groups, bins):
    model = elastic(target_modules)
    randomize_b(model, seed=3)
    space = peft_elastic.search_space(model)
    assert len(space) == num_groups and len(all_subnetworks(space)) == 3**num_groups
    sampler = set_up(GridParamsSampler(seed=0, bins=bins, candidates=100, max_tries=20000), model)
    low = peft_elastic.num_adapter_parameters(model, peft_elastic.minimal_subnetwork(model))
    high = peft_elastic.num_adapter_parameters(model, peft_elastic.maximal_subnetwork(model))
    by_bin = {}
    for subnetwork in all_subnetworks(space):
        by_bin.setdefault(bin_of(peft_elastic.num_adapter_parameters(model, subnetwork), low, high, bins), []).append(
            subnetwork
        )
    assert sorted(by_bin) == list(range(bins)) and sampler.empty_bins == 0
    expected = [max(by_bin[b], key=lambda s: magnitude(model, s)) for b in range(bins)]
    assert sampler.grid == expected
    # The choice depends on the weights, not only on the parameter count: other B factors, another grid.
    randomize_b(model, seed=6)
    other = set_up(GridParamsSampler(seed=0, bins=bins, candidates=100, max_tries=20000), model)
    assert other.grid == [max(by_bin[b], key=lambda s: magnitude(model, s)) for b in range(bins)]
    assert other.grid != sampler.grid


def test_grid_params_ties_go_to_more_parameters():
    model = elastic(["up_proj", "down_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.zero_()
    bins = 4
    sampler = set_up(GridParamsSampler(seed=0, bins=bins, candidates=100, max_tries=20000), model)
    low, high = 16 * 192, 32 * 192  # 4 groups at rank 4 / rank 8, 192 parameters per unit of rank
    best = {}
    for subnetwork in all_subnetworks(peft_elastic.search_space(model)):
        params = peft_elastic.num_adapter_parameters(model, subnetwork)
        b = bin_of(params, low, high, bins)
        best[b] = max(best.get(b, 0), params)
    assert [peft_elastic.num_adapter_parameters(model, s) for s in sampler.grid] == [best[b] for b in range(bins)]


def test_grid_params_minimal_and_maximal_are_always_candidates(model):
    # One candidate per bin and a single proposal: the first and last bins hold the minimal and maximal subnetworks.
    sampler = set_up(GridParamsSampler(seed=0, bins=10, candidates=1, max_tries=1), model)
    assert sampler.grid[0] == peft_elastic.minimal_subnetwork(model)
    assert sampler.grid[-1] == peft_elastic.maximal_subnetwork(model)
    assert len(sampler.grid) <= 3 and len(sampler.grid) + sampler.empty_bins == 10


def test_grid_params_samples_only_grid_entries_and_all_of_them(model):
    sampler = set_up(GridParamsSampler(seed=2, bins=8), model)
    assert sampler.passes == 1 and len(sampler.grid) == 8
    grid = [key(s) for s in sampler.grid]
    seen = Counter()
    for step in range(400):
        (subnetwork,) = sampler.sample(step)
        assert key(subnetwork) in grid
        seen[key(subnetwork)] += 1
    assert set(seen) == set(grid)
    assert min(seen.values()) >= 25  # uniform over 8 entries: 50 each on average


def test_grid_params_state_round_trip():
    model = nls()
    randomize_lora_b(model, seed=5)
    old = set_up(GridParamsSampler(seed=0, bins=6), model)
    state = json.loads(json.dumps(old.state()))  # what the trainer state holds after a checkpoint
    assert state == {"grid": old.grid, "empty_bins": old.empty_bins, "bins": 6}
    randomize_lora_b(model, seed=6)  # training went on: the weights (and so the magnitudes) changed
    rebuilt = set_up(GridParamsSampler(seed=0, bins=6), model)
    assert rebuilt.grid != old.grid  # a grid built from the new weights would differ ...
    resumed = GridParamsSampler(seed=0, bins=6)
    resumed.setup(model, state=state)
    assert resumed.grid == old.grid and resumed.empty_bins == old.empty_bins  # ... but the resumed run keeps its grid
    assert [resumed.sample(step) for step in range(20)] == [old.sample(step) for step in range(20)]
    # An empty state (a sampler that had nothing to save) builds the grid afresh.
    fresh = GridParamsSampler(seed=0, bins=6)
    fresh.setup(model, state={})
    assert fresh.grid == rebuilt.grid


def test_grid_params_state_must_fit_the_search_space(model):
    good = set_up(GridParamsSampler(seed=0, bins=4), model).state()
    other_model = elastic(["up_proj", "down_proj"])
    bad_rank = {"grid": [{**entry, QKV0: 5} for entry in good["grid"]], "empty_bins": 0}
    missing = {"grid": [{n: r for n, r in entry.items() if n != UP1} for entry in good["grid"]], "empty_bins": 0}
    float_rank = {"grid": [{**entry, QKV0: float(entry[QKV0])} for entry in good["grid"]], "empty_bins": 0}
    for target, state in ((other_model, good), (model, bad_rank), (model, missing), (model, float_rank)):
        with pytest.raises(ValueError, match=r"grid saved in the checkpoint \(bins=.*\) does not fit this model"):
            GridParamsSampler(seed=0, bins=4).setup(target, state=state)
    # a grid built with other bins is not silently reused
    with pytest.raises(ValueError, match=r"\(bins=4\) does not fit this model's search space and bins=10"):
        GridParamsSampler(seed=0, bins=10).setup(model, state=good)
    # the parameter counts work after a resume too
    resumed = GridParamsSampler(seed=0, bins=4)
    resumed.setup(model, state=good)
    assert [resumed.params(entry) for entry in resumed.grid] == [
        peft_elastic.num_adapter_parameters(model, entry) for entry in resumed.grid
    ]


@pytest.mark.parametrize("label", ["bins", "candidates", "max_tries"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3"])
def test_grid_params_rejects_invalid_options(label, value):
    with pytest.raises(ValueError, match=rf"{label} must be an int >= 1.*got {re.escape(repr(value))}"):
        GridParamsSampler(**{label: value})


def test_grid_params_default_max_tries():
    assert GridParamsSampler(bins=3, candidates=7).max_tries == 200 * 3 * 7
    assert GridParamsSampler(max_tries=5).max_tries == 5


# --- make_sampler, setup and errors --------------------------------------------------------------------------------


def test_make_sampler_builds_each_strategy():
    assert SAMPLER_CLASSES == {
        "random": RandomSampler,
        "sandwich": SandwichSampler,
        "random_linear": RandomLinearSampler,
        "grid_params": GridParamsSampler,
        "fixed": FixedSampler,
    }
    sandwich = make_sampler("sandwich", seed=1, num_random=2)
    assert type(sandwich) is SandwichSampler and sandwich.seed == 1 and sandwich.num_random == 2
    assert sandwich.passes == 4
    grid = make_sampler("grid_params", seed=4, bins=3, candidates=2)
    assert (type(grid), grid.seed, grid.bins, grid.candidates, grid.max_tries) == (GridParamsSampler, 4, 3, 2, 1200)
    fixed = make_sampler("fixed", subnetwork="minimal")
    assert type(fixed) is FixedSampler and fixed.subnetwork == "minimal" and fixed.seed == 0
    assert type(make_sampler("random_linear", 8)) is RandomLinearSampler


def test_make_sampler_errors():
    with pytest.raises(ValueError, match=r"Unknown sampling strategy 'uniform'; valid strategies: \[.*\]") as info:
        make_sampler("uniform")
    assert all(repr(name) in str(info.value) for name in SAMPLER_CLASSES)
    with pytest.raises(ValueError, match=r"\['num_random'\] do not apply to strategy 'random'; it accepts no options"):
        make_sampler("random", num_random=2)
    with pytest.raises(
        ValueError, match=r"\['bins'\] do not apply to strategy 'sandwich'; it accepts \['num_random'\]"
    ):
        make_sampler("sandwich", bins=3)
    with pytest.raises(ValueError, match=r"\['num_random'\] do not apply.*\['bins', 'candidates', 'max_tries'\]"):
        make_sampler("grid_params", num_random=1)
    for seed in ("1", 1.0, True, None):
        with pytest.raises(ValueError, match=r"seed must be an int, got " + re.escape(repr(seed))):
            make_sampler("random", seed=seed)


@pytest.mark.parametrize("strategy", list(SAMPLER_CLASSES))
def test_sample_before_setup_raises(strategy):
    sampler = make_sampler(strategy)
    with pytest.raises(RuntimeError, match=rf"{type(sampler).__name__}\.setup\(model\) must be called before sample"):
        sampler.sample(0, 10)


@pytest.mark.parametrize("strategy", list(SAMPLER_CLASSES))
def test_setup_on_a_model_without_elastic_adapters(strategy):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    for target in (lora, tiny_llama()):
        with pytest.raises(ValueError, match=r"Expected a PeftModel \(or its tuner\) with an elastic adapter"):
            make_sampler(strategy).setup(target)


def test_setup_uses_the_named_adapter():
    model = nls()
    model.add_adapter("small", NLSConfig(r=4, lora_alpha=8, rank_choices=[4, 2], target_modules=["q_proj"]))
    sampler = RandomSampler(seed=0)
    sampler.setup(model, adapter_name="small")
    assert sampler.space == {f"model.layers.{i}.self_attn.q_proj": [4, 2] for i in range(2)}
    draws = [sampler.sample(step)[0] for step in range(20)]
    assert {rank for draw in draws for rank in draw.values()} == {4, 2}
    set_up(sampler, model)  # the active adapter ("default") by default
    assert sampler.space == peft_elastic.search_space(model) and len(sampler.space) == 6


def test_base_sampler_is_abstract(model):
    sampler = set_up(SubnetworkSampler(seed=0), model)
    with pytest.raises(NotImplementedError):
        sampler.sample(0)
    assert sampler.state() == {}


# --- last, so that the fresh process started by the `fresh_process` fixture had time to start ----------------------


def test_random_sampler_sequence_is_the_same_in_a_fresh_process(model, fresh_process):
    stdout, stderr = fresh_process.communicate(timeout=300)
    assert fresh_process.returncode == 0, stderr[-2000:]
    in_subprocess = json.loads(stdout.split("SAMPLES", 1)[1])
    sampler = set_up(RandomSampler(seed=3), model)
    in_process = [sampler.sample(step) for step in range(10)]
    assert in_subprocess == in_process
    assert len({key(s[0]) for s in in_process}) > 1
