"""Argument checks for the health package; the shared ones come from ``gradguard._validate``.

Each check raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the
argument and the allowed range.
"""

from __future__ import annotations

import math

from .._validate import _as_float as _number
from .._validate import in_open_unit as fraction
from .._validate import in_range, positive
from .._validate import positive_int as count

__all__ = ["at_least", "band", "count", "fraction", "in_range", "positive"]


def at_least(name: str, value: object, low: float) -> float:
    """A finite number >= ``low``."""
    number = _number(name, value)
    if not math.isfinite(number) or number < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {number}")
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
