"""Argument checks for the health package, free of torch so rules run on plain hosts.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the
argument and the allowed range.
"""

from __future__ import annotations

import math
from numbers import Real


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def positive(name: str, value: object) -> float:
    """A finite number > 0."""
    number = _number(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {number}")
    return number


def at_least(name: str, value: object, low: float) -> float:
    """A finite number >= ``low``."""
    number = _number(name, value)
    if not math.isfinite(number) or number < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {number}")
    return number


def fraction(name: str, value: object) -> float:
    """A number in the open interval (0, 1)."""
    number = _number(name, value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {number}")
    return number


def in_range(name: str, value: object, low: float, high: float) -> float:
    """A number in the closed interval [low, high]."""
    number = _number(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {number}")
    return number


def count(name: str, value: object, minimum: int = 1) -> int:
    """An int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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
