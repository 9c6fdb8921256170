"""`peft_elastic.checks.check_int`: the one integer-argument rule (a bool is not an int), each caller's own words."""

from __future__ import annotations

import pytest

from peft_elastic.checks import check_int


@pytest.mark.parametrize(("value", "minimum"), [(1, 1), (7, 1), (0, 0), (-3, None), (10**12, 5)])
def test_an_int_at_or_above_the_minimum_is_returned(value, minimum):
    assert check_int("n", value, minimum) == value


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, 2.5, "3", None, [1]])
def test_anything_else_is_refused_naming_the_argument_and_the_value(value):
    with pytest.raises(ValueError, match=rf"^n must be an int >= 1, got {value!r}\.$".replace("[", r"\[")):
        check_int("n", value)


def test_no_minimum_still_refuses_bools_and_floats():
    assert check_int("seed", -5, minimum=None) == -5
    for value in (True, 1.5):
        with pytest.raises(ValueError, match=rf"^seed must be an int, got {value!r}\.$"):
            check_int("seed", value, minimum=None)


def test_optional_lets_none_through_and_only_none():
    assert check_int("step", None, optional=True) is None
    with pytest.raises(ValueError, match=r"^step must be an int >= 1, got 0\.$"):
        check_int("step", 0, optional=True)


def test_the_caller_says_what_is_valid():
    with pytest.raises(ValueError, match=r"^width must be a number of tokens >= 1, or None, got 0\.$"):
        check_int("width", 0, optional=True, valid="a number of tokens >= 1, or None")
