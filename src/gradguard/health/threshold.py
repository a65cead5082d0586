"""Clip-threshold advice from a warm-up window of unclipped gradient norms."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from . import _check as check


@dataclass(frozen=True)
class ThresholdAdvice:
    """A recommended clip threshold and where it sits in the observed window.

    Attributes:
        threshold: the recommended max norm.
        percentile: share of the window's finite norms at or below ``threshold``, in %.
        expected_clip_rate: share of the window's finite norms above ``threshold``
            (the fraction of steps it would have clipped).
        window: number of finite norms used.
        median: median of those norms.
        ignored: number of non-finite values left out.
        capped: ``True`` when the order-of-magnitude cap lowered the threshold.
        reason: one sentence explaining the choice.
    """

    threshold: float
    percentile: float
    expected_clip_rate: float
    window: int
    median: float
    ignored: int
    capped: bool
    reason: str


def _values(norms_or_run: object) -> np.ndarray:
    columns = getattr(norms_or_run, "columns", None)
    if columns is not None:
        norms_or_run = columns["total_norm"]
    elif isinstance(norms_or_run, Mapping):
        norms_or_run = norms_or_run["total_norm"]
    try:
        values = np.asarray(norms_or_run, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(
            "norms_or_run must be a sequence of floats, an array, or an object with "
            f"columns['total_norm'], got {type(norms_or_run).__name__}"
        ) from None
    return values


def recommend_threshold(
    norms_or_run: object,
    *,
    percentile: float = 95.0,
    margin: float = 1.1,
    max_ratio: float = 10.0,
    min_samples: int = 20,
) -> ThresholdAdvice:
    """Recommend a clip threshold a little above the typical unclipped norm.

    The threshold is ``margin`` × the ``percentile``-th percentile of the finite norms
    in the window, capped at ``max_ratio`` × their median so it stays within an order
    of magnitude of the typical step. Non-finite values are ignored and counted.

    The documented band: unless the cap applies (``capped`` is ``True``), the threshold
    sits at or above the ``percentile``-th percentile of the window and at most at
    ``margin`` × it, so ``advice.percentile >= percentile`` and
    ``advice.expected_clip_rate <= 1 - percentile / 100`` (≤ 5 % at the defaults);
    always ``median <= threshold <= max_ratio × median``.

    Args:
        norms_or_run: unclipped total norms of a warm-up window: a sequence of floats,
            a numpy array, or an object with ``columns["total_norm"]`` (a
            :class:`~gradguard.record.HostBatch` or a run) or a mapping with that key.
        percentile: the percentile to sit above, in (50, 100).
        margin: multiplier on that percentile, >= 1.
        max_ratio: cap as a multiple of the median, > 1.
        min_samples: fewest finite norms accepted.

    Raises:
        ValueError: bad arguments, too few finite norms, or a zero median.
    """
    check.in_range("percentile", percentile, 50.0, 100.0)
    if not 50.0 < percentile < 100.0:
        raise ValueError(f"percentile must lie strictly between 50 and 100, got {percentile}")
    margin = check.at_least("margin", margin, 1.0)
    max_ratio = check.positive("max_ratio", max_ratio)
    if max_ratio <= 1.0:
        raise ValueError(f"max_ratio must be > 1, got {max_ratio}")
    check.count("min_samples", min_samples)
    values = _values(norms_or_run)
    finite = values[np.isfinite(values)]
    ignored = int(values.size - finite.size)
    if finite.size < min_samples:
        raise ValueError(
            f"norms_or_run holds {finite.size} finite norms; min_samples is {min_samples}"
        )
    if (finite < 0).any():
        raise ValueError("norms_or_run holds negative values; norms are >= 0")
    median = float(np.median(finite))
    if median <= 0.0:
        raise ValueError("norms_or_run has a zero median: gradients are absent or vanishing")
    high = float(np.percentile(finite, percentile))
    threshold = max(high * margin, median)
    capped = threshold > max_ratio * median
    if capped:
        threshold = max_ratio * median
    at_or_below = float(np.count_nonzero(finite <= threshold)) / finite.size
    if capped:
        reason = (
            f"p{percentile:g} ({high:.3g}) × {margin:g} exceeds {max_ratio:g}× the median "
            f"({median:.3g}); capped there: the window has heavy outliers"
        )
    else:
        reason = (
            f"p{percentile:g} of {finite.size} unclipped norms ({high:.3g}) × {margin:g}; "
            f"median {median:.3g}"
        )
    if ignored:
        reason += f"; {ignored} non-finite values ignored"
    return ThresholdAdvice(
        threshold=threshold,
        percentile=100.0 * at_or_below,
        expected_clip_rate=1.0 - at_or_below,
        window=int(finite.size),
        median=median,
        ignored=ignored,
        capped=capped,
        reason=reason,
    )
