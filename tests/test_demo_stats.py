"""The demo's bootstrap intervals and verdicts: a claim holds or differs only when its whole interval agrees."""

from __future__ import annotations

import pytest

from peft_elastic.demo import stats
from peft_elastic.demo.tables import _judged


def test_accuracy_interval_covers_the_mean_and_narrows_with_more_problems():
    few = [True, False] * 10  # 50% of 20
    many = [True, False] * 500  # 50% of 1000
    low, high = stats.accuracy_interval(few)
    assert low < 0.5 < high and high - low > 0.3  # about ±22 points at n = 20
    low_many, high_many = stats.accuracy_interval(many)
    assert low_many < 0.5 < high_many and high_many - low_many < 0.08  # about ±3 points at n = 1000
    assert stats.accuracy_interval([True] * 30) == (1.0, 1.0)


def test_paired_intervals_cancel_shared_problems():
    reference = [True] * 50 + [False] * 50
    same = list(reference)
    assert stats.difference_interval(same, reference) == (0.0, 0.0)  # the same hits: no spread at all
    assert stats.ratio_interval(same, reference) == (1.0, 1.0)
    better = [True] * 60 + [False] * 40  # right on every problem the reference gets, and 10 more
    low, high = stats.difference_interval(better, reference)
    assert 0.0 < low <= 0.1 <= high < 0.2
    assert stats.ratio_interval(better, reference)[0] > 1.0
    with pytest.raises(ValueError, match="Paired rows need the same problems: 3 vs 2"):
        stats.difference_interval([True] * 3, [True] * 2)


def test_verdicts():
    assert stats.verdict(0.96, 1.02, 0.95) == "holds"
    assert stats.verdict(0.80, 0.94, 0.95) == "differs"
    assert stats.verdict(0.90, 1.00, 0.95) == "within noise"
    assert stats.verdict(0.95, 1.00, 0.95) == "holds"  # "at least": reaching the threshold is enough
    # a strict claim ("beats": a gap above 0) is about the sign: a tie in some resamples is neither verdict
    assert stats.verdict(0.002, 0.01, 0.0, strict=True) == "holds"
    assert stats.verdict(0.0, 0.01, 0.0, strict=True) == "within noise"
    assert stats.verdict(-0.01, 0.0, 0.0, strict=True) == "within noise"  # 99.6 % vs 100 %, two problems apart
    assert stats.verdict(-0.02, -0.004, 0.0, strict=True) == "differs"
    assert (
        _judged((-0.01, 0.0), 0.0, "A beats B.", strict=True)
        == "- [within noise] A beats B. (95% interval [-0.01, 0])"
    )
    assert _judged((0.9, 1.0), 0.95, "X.") == "- [within noise] X. (95% interval [0.9, 1])"
    assert _judged(None, 0.95, "X.") == "- [n/a] X. (undefined: the reference scored 0)"
    with pytest.raises(ValueError, match="at least one problem"):
        stats.resample_indices(0)


def test_speedup_interval_is_paired_over_timing_rounds():
    import random

    rng = random.Random(0)
    reference = [30.0 * (1 + 0.3 * rng.random()) for _ in range(30)]  # a noisy machine: rounds 30-39 ms
    assert stats.speedup_interval(reference, list(reference)) == (1.0, 1.0)  # the same times: no spread
    faster = [t / 1.2 for t in reference]  # every round 1.2x faster, whatever the round's noise
    low, high = stats.speedup_interval(reference, faster)
    assert low == pytest.approx(1.2) and high == pytest.approx(1.2)
    unrelated = [30.0 * (1 + 0.3 * rng.random()) / 1.02 for _ in range(30)]  # 2 % faster, within the noise
    low, high = stats.speedup_interval(reference, unrelated)
    assert low < 1.0 < high
    with pytest.raises(ValueError, match="Paired timings need the same rounds \\(and some\\): 3 vs 2"):
        stats.speedup_interval([1.0] * 3, [1.0] * 2)
