"""Argument checks for the health package; the shared ones come from ``gradguard._validate``.

Each check takes ``(name, value)``, returns the value normalised, and raises
``ValueError`` (or ``TypeError`` for a wrong type) naming the argument and the allowed
range, so a rule can declare its thresholds with the check that validates them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._validate import _as_float as _number
from .._validate import in_open_unit as fraction
from .._validate import in_range, positive, positive_int

__all__ = [
    "at_least",
    "band",
    "boolean",
    "count",
    "counter",
    "fraction",
    "greater_than_one",
    "in_range",
    "positive",
]

Check = Callable[[str, object], object]


def count(name: str, value: object, minimum: int = 1) -> int:
    """An int >= ``minimum`` (1 by default)."""
    return positive_int(name, value, minimum)


def counter(minimum: int) -> Check:
    """A check for an int >= ``minimum``."""

    def check(name: str, value: object) -> int:
        return positive_int(name, value, minimum)

    return check


def at_least(name: str, value: object, low: float) -> float:
    """A finite number >= ``low``."""
    number = _number(name, value)
    if not math.isfinite(number) or number < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {number}")
    return number


def greater_than_one(name: str, value: object) -> float:
    """A finite number > 1 (a ratio or a factor)."""
    number = positive(name, value)
    if number <= 1.0:
        raise ValueError(f"{name} must be > 1, got {number}")
    return number


def band(name: str, value: object) -> tuple[float, float]:
    """A pair ``(low, high)`` of finite numbers with 0 <= low < high."""
    try:
        low, high = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (low, high), got {value!r}") from None
    low = _number(name, low)
    high = _number(name, high)
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low < high):
        raise ValueError(f"{name} must satisfy 0 <= low < high (finite), got ({low}, {high})")
    return (low, high)


def boolean(name: str, value: object) -> bool:
    """A bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
