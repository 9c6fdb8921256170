"""Argument checks shared by every layer: one place for the rule, each caller its own words for what is valid."""

from __future__ import annotations


def check_int(
    name: str, value: object, minimum: int | None = 1, *, optional: bool = False, valid: str | None = None
) -> int | None:
    """`value` if it is an `int` (a `bool` is not one) of at least `minimum` (any int if `minimum` is None), or None
    when `optional` allows it; else a ValueError that names `name`, says what is valid (`valid`, by default
    "an int >= minimum") and shows the value given."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        if valid is None:
            valid = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {valid}, got {value!r}.")
    return value
