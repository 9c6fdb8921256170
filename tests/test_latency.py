"""The search's latency cost on a shared CPU (`RelativeLatency`): a slow spell that hits a whole round leaves the cost
unchanged, one that hits a single timing is outvoted by the median and makes the cost take more rounds, and on a real
forward the minimal subnetwork of a Mode B super-network costs less than the maximal one (1.0).

Oracle: a scripted clock — each forward "takes" a time we choose — so the expected median and round counts are known;
for the real forwards, a clock that counts the operations they run. No assertion reads wall time (benchmarks do).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode

import peft_elastic
from peft_elastic import ElasticLoraConfig
from peft_elastic.search import SearchResult, latency, run_search
from peft_elastic.search.latency import RelativeLatency, quartiles
from peft_elastic.toy import tiny_llama


@pytest.fixture(scope="module")
def mode_b():
    torch.manual_seed(0)
    config = ElasticLoraConfig(
        r=8, rank_choices=[8, 4], target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        width_choices=[1.0, 0.5],
    )  # fmt: skip
    return get_peft_model(tiny_llama(), config)


def scripted(monkeypatch, own: float, spells):
    """Forwards of the maximal subnetwork take 1.0, of any other `own`; the n-th timing is multiplied by
    `spells(n)` (a slow spell). Returns the list of (timing index, is-reference) calls."""
    calls = []

    def fake_time(self, model, subnetwork):
        index = len(calls)
        reference = dict(subnetwork) == self.reference
        calls.append((index, reference))
        return (1.0 if reference else own) * spells(index)

    monkeypatch.setattr(RelativeLatency, "_time", fake_time)
    return calls


def test_a_slow_spell_over_whole_rounds_leaves_the_cost_unchanged(mode_b, monkeypatch):
    minimal = peft_elastic.minimal_subnetwork(mode_b)
    # warm-up (2 timings) then rounds of 2: rounds 1 and 3 run 50x slower, both timings of them
    calls = scripted(monkeypatch, 0.4, lambda n: 50.0 if (n - 2) // 2 in (1, 3) else 1.0)
    cost = RelativeLatency(mode_b, rounds=5)
    assert cost(mode_b, minimal) == pytest.approx(0.4)
    assert cost.last["rounds"] == 5 and cost.last["quartiles"] == [pytest.approx(0.4), pytest.approx(0.4)]
    assert len(calls) == 2 + 2 * 5
    # the order of the pair alternates from round to round: reference first in even rounds
    assert [reference for _, reference in calls[2:6]] == [True, False, False, True]
    # a single timing, as the old cost took it (median of 5 passes of the subnetwork alone), would have been 20.0
    assert peft_elastic.get_subnetwork(mode_b) == minimal  # the trial's subnetwork stays active


def test_single_outliers_are_outvoted_and_buy_more_rounds(mode_b, monkeypatch):
    minimal = peft_elastic.minimal_subnetwork(mode_b)
    # the subnetwork's timing of every odd round (it comes first there) is 30x slower: the ratios alternate 0.5, 15
    slow = {2 + 2 * r for r in range(1, 40, 2)}
    scripted(monkeypatch, 0.5, lambda n: 30.0 if n in slow else 1.0)
    cost = RelativeLatency(mode_b, rounds=5, max_rounds=9)
    value = cost(mode_b, minimal)
    assert cost.last["rounds"] == 9  # spread too wide after 5 rounds: extended to max_rounds
    assert value == pytest.approx(0.5)  # 4 of the 9 ratios are 15.0, the median is 0.5
    q1, q3 = cost.last["quartiles"]
    assert q1 == pytest.approx(0.5) and q3 == pytest.approx(15.0)


def test_a_quiet_run_stops_after_the_requested_rounds(mode_b, monkeypatch):
    jitter = itertools.cycle([1.0, 1.02, 0.99, 1.01])
    scripted(monkeypatch, 0.7, lambda n: next(jitter))
    cost = RelativeLatency(mode_b, rounds=3, max_rounds=15, max_spread=0.1)
    assert cost(mode_b, peft_elastic.minimal_subnetwork(mode_b)) == pytest.approx(0.7, rel=0.05)
    assert cost.last["rounds"] == 3


class FlopClock:
    """A clock that advances by the floating-point operations the model's forward really runs (torch's
    `FlopCounterMode` around each call): real forwards, sliced weights and all, priced without wall time, which on a
    shared CPU can put a 0.8x forward above 1.0 (it did, at 1.07)."""

    def __init__(self, model) -> None:
        self.now, self.counter = 0.0, None
        model.register_forward_pre_hook(self.start)
        model.register_forward_hook(self.stop)

    def perf_counter(self) -> float:
        return self.now

    def start(self, module, args) -> None:
        self.counter = FlopCounterMode(display=False)
        self.counter.__enter__()

    def stop(self, module, args, output) -> None:
        self.counter.__exit__(None, None, None)
        self.now += self.counter.get_total_flops()


def test_real_forwards_price_the_minimal_subnetwork_below_the_maximal(monkeypatch):
    torch.manual_seed(0)
    config = ElasticLoraConfig(
        r=8, rank_choices=[8, 4], target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        width_choices=[1.0, 0.5],
    )  # fmt: skip
    mode_b = get_peft_model(tiny_llama(), config)  # its own: the clock's hooks stay on it
    monkeypatch.setattr(latency, "time", FlopClock(mode_b))
    mode_b.train()
    minimal, maximal = peft_elastic.minimal_subnetwork(mode_b), peft_elastic.maximal_subnetwork(mode_b)
    cost = RelativeLatency(mode_b, seq_len=256, batch_size=4, rounds=7)
    assert cost(mode_b, minimal) < 1.0
    assert 0.5 < cost(mode_b, maximal) < 2.0  # the same forward twice per round: about 1
    assert cost.last["quartiles"] == [1.0, 1.0]  # exactly, on this clock
    assert mode_b.training and all(m.training for m in mode_b.modules())  # training flags restored
    assert peft_elastic.get_subnetwork(mode_b) == maximal
    assert cost.last["reference_seconds"] > 0


def test_run_search_keeps_each_trials_spread(mode_b, monkeypatch, tmp_path):
    scripted(monkeypatch, 0.6, lambda n: 1.0)

    def evaluate(model):
        return float(peft_elastic.num_adapter_parameters(model))

    result = run_search(mode_b, evaluate, "random", "latency", n_trials=4, seq_len=8, progress=False)
    for trial in result.trials:
        expected = 1.0 if trial["subnetwork"] == peft_elastic.maximal_subnetwork(mode_b) else 0.6
        assert trial["cost"] == pytest.approx(expected)
        assert trial["cost_spread"] == [pytest.approx(expected)] * 2
    again = SearchResult.load(result.save(tmp_path / "result.json"))
    assert [t["cost_spread"] for t in again.trials] == [t["cost_spread"] for t in result.trials]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rounds": 0}, "rounds must be"),
        ({"rounds": 5, "max_rounds": 3}, "max_rounds must be"),
        ({"warmup": -1}, "warmup must be"),
        ({"max_spread": -0.1}, "max_spread must be a number >= 0"),
        ({"seq_len": 0}, "seq_len must be"),
    ],
)
def test_bad_options_are_refused(mode_b, options, match):
    with pytest.raises(ValueError, match=match):
        RelativeLatency(mode_b, **options)


def test_quartiles():
    assert quartiles([2.0]) == (2.0, 2.0, 2.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
