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


def test_training_noise_widens_an_interval_in_quadrature():
    # no noise: the bootstrap interval as it is
    assert stats.with_training_noise((0.004, 0.022), 0.012, 0.0) == (0.004, 0.022)
    low, high = stats.with_training_noise((0.004, 0.022), 0.012, 0.01)
    z = 1.959964
    assert low == pytest.approx(0.012 - (0.008**2 + (z * 0.01) ** 2) ** 0.5, rel=1e-6)
    assert high == pytest.approx(0.012 + (0.010**2 + (z * 0.01) ** 2) ** 0.5, rel=1e-6)
    # a gap that clears the bootstrap over problems but not the run-to-run spread: within noise, not "holds"
    assert stats.verdict(0.004, 0.022, 0.0, strict=True) == "holds"
    assert stats.verdict(low, high, 0.0, strict=True) == "within noise"
    # a gap far above both stays a finding
    assert stats.verdict(*stats.with_training_noise((0.35, 0.43), 0.39, 0.01), 0.0, strict=True) == "holds"
    assert stats.with_training_noise((1.0, 1.0), 1.0, 0.005) == pytest.approx((1.0 - z * 0.005, 1.0 + z * 0.005))
    with pytest.raises(ValueError, match="at least 0; got -0.1"):
        stats.with_training_noise((0.0, 1.0), 0.5, -0.1)


def test_findings_widen_the_claims_whose_training_noise_was_measured():
    from peft_elastic.demo.lonas import CostRow
    from peft_elastic.demo.sqft import Row
    from peft_elastic.demo.tables import findings

    n = 500

    def row(key, right):
        hits = [i < right for i in range(n)]
        return Row(key, key, right / n, 0.5, 0.0 if key in ("lora", "shears") else 0.5, "FP32", hits)

    # dense 499 right, sparse 300; every tuned row 499, re-pruned LoRA 493 (six problems below SparsePEFT)
    right = {"dense": 499, "sparse": 300, "lora_repruned": 493}
    keys = ["dense", "sparse", "lora", "lora_repruned", "shears", "sparse_peft", "sqft", "qa_sparse_peft"]
    sqft = [row(key, right.get(key, 499)) for key in keys]
    hits = [True] * 400 + [False] * 100
    lonas = [
        CostRow("LoRA (merged)", 0.8, 0.8, 100, 100, 10.0, 1.0, hits),
        CostRow("LoNAS (heuristic subnetwork)", 0.8, 0.8, 80, 80, 8.0, 1.25, list(hits)),
    ]
    quiet = findings(sqft, lonas)
    noisy = findings(sqft, lonas, {"sparse_peft - lora_repruned": 0.01})
    [before] = [line for line in quiet if "SparsePEFT beats" in line]
    [after] = [line for line in noisy if "SparsePEFT beats" in line]
    assert before.startswith("- [holds]") and after.startswith("- [within noise]")
    low, high = (float(x) for x in after.rsplit("[", 1)[1].rstrip("])").split(", "))
    assert low < 0 < 0.012 < high  # widened around the gap of 6 of 500 problems
    assert [line for line in quiet if line != before] == [line for line in noisy if line != after]  # only that one
    # a ratio claim keyed "a / b" is widened the same way
    shears = findings(sqft, lonas, {"shears / lora": 0.02})
    assert [line for line in shears if "shears reaches" in line] != [
        line for line in quiet if "shears reaches" in line
    ]
