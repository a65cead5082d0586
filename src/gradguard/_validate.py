"""Argument checks shared by every public entry point.

Each check raises with the argument's name and the allowed range, so a bad
hyper-parameter fails at construction instead of corrupting a run later. Free of
torch, so the host-side packages (health, recording) and other front-ends use it too.
Numbers may be Python or NumPy numbers, or one-element tensors/arrays.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

#: Decisions are computed in float32: a threshold beyond its range would overflow to inf.
FLOAT32_MAX = 3.4028234663852886e38


def _unwrap(name: str, value: object) -> object:
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor or array
        size = getattr(value, "size", None)
        count = value.numel() if hasattr(value, "numel") else size  # type: ignore[attr-defined]
        if count != 1:
            shape = tuple(value.shape)  # type: ignore[attr-defined]
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {shape}")
        return value.item()  # type: ignore[attr-defined]
    return value


def _as_float(name: str, value: object) -> float:
    value = _unwrap(name, value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def finite(name: str, value: object) -> float:
    """Return ``value`` as a float, requiring a finite number."""
    number = _as_float(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    return number


def _in_float32(name: str, number: float) -> float:
    if number > FLOAT32_MAX:
        raise ValueError(
            f"{name} must be at most {FLOAT32_MAX:.4g} (the largest float32: decisions are "
            f"taken in float32), got {number}"
        )
    return number


def non_negative(name: str, value: object, *, float32: bool = False) -> float:
    """Return ``value`` as a float, requiring a finite number >= 0 (and within float32's
    range with ``float32=True``: the policies' thresholds, used in float32 decisions)."""
    number = _as_float(name, value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {number}")
    return _in_float32(name, number) if float32 else number


def positive(name: str, value: object, *, float32: bool = False) -> float:
    """Return ``value`` as a float, requiring a finite number > 0 (and within float32's
    range with ``float32=True``)."""
    number = _as_float(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {number}")
    return _in_float32(name, number) if float32 else number


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


def norm_type(value: object, *, like_torch: bool = False) -> float:
    """Return a p-norm order: a number > 0 or ``inf`` (strings like 'inf' accepted).

    ``like_torch=True`` accepts what ``torch.linalg.vector_norm`` accepts (any number but
    NaN, e.g. ``-inf`` or ``-0.1``), for the drop-ins of ``torch.nn.utils``.
    """
    value = _unwrap("norm_type", value)
    if isinstance(value, bool):
        raise TypeError(f"norm_type must be a number or 'inf', got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {value!r}") from None
    if math.isnan(number) or (number <= 0 and not like_torch):
        allowed = "a number (not NaN)" if like_torch else "> 0 or inf"
        raise ValueError(f"norm_type must be {allowed}, got {number}")
    return number


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int, requiring an integer >= ``minimum``.

    Python and NumPy integers and one-element integer tensors are accepted.
    """
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        kind = str(value.dtype)  # type: ignore[attr-defined]
        if "int" not in kind:
            raise TypeError(f"{name} must be an int, got a tensor of dtype {kind}")
        value = _unwrap(name, value)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    number = int(value)
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def one_of(name: str, value: object, allowed: tuple[type, ...], what: str) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``value`` is an instance of ``allowed``."""
    if not isinstance(value, allowed):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
