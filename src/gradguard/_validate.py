"""Argument checks shared by every public entry point.

Each check raises with the argument's name and the allowed range, so a bad
hyper-parameter fails at construction instead of corrupting a run later. Free of
torch, so the host-side packages (health, recording) and other front-ends use it too.
"""

from __future__ import annotations

import math
from numbers import Real


def _as_float(name: str, value: object) -> float:
    if hasattr(value, "numel") and hasattr(value, "shape"):  # a one-element tensor/array
        if value.numel() != 1:  # type: ignore[attr-defined]
            shape = tuple(value.shape)  # type: ignore[attr-defined]
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {shape}")
        value = value.item()  # type: ignore[attr-defined]
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def finite(name: str, value: object) -> float:
    """Return ``value`` as a float, requiring a finite number."""
    number = _as_float(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    return number


def non_negative(name: str, value: object) -> float:
    """Return ``value`` as a float, requiring a finite number >= 0."""
    number = _as_float(name, value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {number}")
    return number


def positive(name: str, value: object) -> float:
    """Return ``value`` as a float, requiring a finite number > 0."""
    number = _as_float(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {number}")
    return number


def in_open_unit(name: str, value: object) -> float:
    """Return ``value`` as a float, requiring 0 < value < 1."""
    number = _as_float(name, value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {number}")
    return number


def in_range(name: str, value: object, low: float, high: float) -> float:
    """Return ``value`` as a float, requiring low <= value <= high."""
    number = _as_float(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {number}")
    return number


def norm_type(value: object) -> float:
    """Return a p-norm order: a number > 0 or ``inf`` (strings like 'inf' accepted)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {value!r}") from None
    if math.isnan(number) or number <= 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {number}")
    return number


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int, requiring an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
