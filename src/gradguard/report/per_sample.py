"""The per-example gradient norm section, read from ``per_sample`` events.

:class:`gradguard.privacy.PerSampleMonitor` records one event per observed step whose
data holds quantiles of the per-example norms (keyed by labels such as ``"0.5"``), the
clip norm and the share of examples above it. This module turns those events into
bounded series and draws them; it imports neither torch nor the privacy package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

from ..schema import Event, EventKind
from .sample import BUCKETS, Envelope, envelope
from .svg import Frame, envelope_paths, fmt, log_bounds, series_line, svg

#: The event kind written by :class:`gradguard.privacy.PerSampleMonitor`.
KIND = EventKind.PER_SAMPLE
MAX_LABELS = 20  # quantile labels read from the events
MAX_LABEL_CHARS = 24


@dataclass(frozen=True)
class PerSampleSeries:
    """Per-example norm summaries over the observed steps, in step order.

    Attributes:
        steps: observed steps.
        labels: recorded quantile labels, lowest quantile first.
        quantiles: ``(steps, labels)`` per-example norm quantiles (NaN where missing).
        clip_norm: the clip norm of each step (NaN where none was given).
        fraction_clipped: share of examples above the clip norm (NaN where unknown).
        examples: examples per step.
    """

    steps: np.ndarray
    labels: tuple[str, ...]
    quantiles: np.ndarray
    clip_norm: np.ndarray
    fraction_clipped: np.ndarray
    examples: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.size)

    def column(self, label: str) -> np.ndarray | None:
        """The quantile series of ``label``, or ``None`` when it was not recorded."""
        return self.quantiles[:, self.labels.index(label)] if label in self.labels else None


def _number(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _level(label: object) -> float | None:
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
        return None
    try:
        q = float(label)
    except (TypeError, ValueError):
        return None
    return q if 0.0 <= q <= 1.0 else None


def per_sample_series(events: Sequence[Event]) -> PerSampleSeries | None:
    """The ``per_sample`` events as series; ``None`` when the run holds none."""
    rows = sorted(
        (e for e in events if e.kind == KIND and isinstance(e.data, dict)), key=lambda e: e.step
    )
    if not rows:
        return None
    levels: dict[str, float] = {}
    for e in rows:
        qs = e.data.get("quantiles")
        if isinstance(qs, dict):
            for key in qs:
                if key not in levels and len(levels) < MAX_LABELS:
                    q = _level(key)
                    if q is not None:
                        levels[key] = q
    labels = tuple(sorted(levels, key=levels.__getitem__))
    quantiles = np.full((len(rows), len(labels)), np.nan)
    for i, e in enumerate(rows):
        qs = e.data.get("quantiles")
        if isinstance(qs, dict):
            quantiles[i] = [_number(qs.get(label)) for label in labels]
    return PerSampleSeries(
        steps=np.array([e.step for e in rows], dtype=np.int64),
        labels=labels,
        quantiles=quantiles,
        clip_norm=np.array([_number(e.data.get("clip_norm")) for e in rows]),
        fraction_clipped=np.array([_number(e.data.get("fraction_clipped")) for e in rows]),
        examples=np.array([_number(e.data.get("n")) for e in rows]),
    )


def _band(series: PerSampleSeries, low: str, high: str, buckets: int) -> Envelope:
    """Per bucket: lowest value of quantile ``low`` to highest of quantile ``high``."""
    a = envelope(series.steps, series.column(low), buckets)  # type: ignore[arg-type]
    b = envelope(series.steps, series.column(high), buckets)  # type: ignore[arg-type]
    ok = np.isfinite(a.low) & np.isfinite(b.high)
    return Envelope(
        a.start,
        a.end,
        np.where(ok, a.low, np.nan),
        np.where(ok, b.high, np.nan),
        np.full(len(a), np.nan),
        a.nonfinite | b.nonfinite,
    )


def _sw(colour: str, text: str) -> str:
    return f'<span><i class="sw" style="background:{colour}"></i>{escape(text)}</span>'


def norm_band_chart(series: PerSampleSeries, buckets: int = BUCKETS) -> str:
    """Quantile bands of the per-example norms on a log scale, median and clip norm on top."""
    if not series.labels:
        return '<p class="empty">The events record no quantiles.</p>'
    lowest, highest = series.labels[0], series.labels[-1]
    outer = _band(series, lowest, highest, buckets)
    clip = envelope(series.steps, series.clip_norm, buckets)
    lo, hi = log_bounds(outer.low, outer.high, clip.high)
    frame = Frame(float(outer.start[0]), float(outer.end[-1]), lo, hi, log=True)
    body = frame.axes("per-example grad norm (log)")
    body += envelope_paths(frame, outer, "dp", mean=False)
    legend = [_sw("#c9b6ea", f"q{lowest}–q{highest} per bucket")]
    if (
        "0.25" in series.labels
        and "0.75" in series.labels
        and (lowest, highest)
        != (
            "0.25",
            "0.75",
        )
    ):
        body += envelope_paths(frame, _band(series, "0.25", "0.75", buckets), "dpiqr", mean=False)
        legend.append(_sw("#8a63c9", "q0.25–q0.75"))
    median = series.column("0.5")
    if median is not None:
        med = envelope(series.steps, median, buckets)
        body += series_line(frame, med, med.mean, "dp-median", "median per-example norm")
        legend.append(_sw("#3d1f73", "median"))
    if np.isfinite(clip.mean).any():
        body += series_line(frame, clip, clip.mean, "dp-clip", "clip norm")
        legend.append(
            _sw(
                "#e3001b", f"clip norm (latest {fmt(float(clip.mean[np.isfinite(clip.mean)][-1]))})"
            )
        )
    legend.append(f"<span>{len(series)} observed steps in {len(outer)} buckets</span>")
    return (
        svg(frame, body, "per-example gradient norm quantiles over steps")
        + '<div class="legend">'
        + "".join(legend)
        + "</div>"
    )


def fraction_chart(series: PerSampleSeries, buckets: int = BUCKETS) -> str:
    """Share of examples whose norm exceeded the clip norm, per observed step."""
    if not np.isfinite(series.fraction_clipped).any():
        return '<p class="empty">No clip norm was recorded, so no fraction clipped.</p>'
    env = envelope(series.steps, series.fraction_clipped, buckets)
    frame = Frame(float(env.start[0]), float(env.end[-1]), 0.0, 1.0, log=False, height=200)
    body = frame.axes("fraction clipped") + envelope_paths(frame, env, "rate")
    return svg(frame, body, "fraction of examples clipped over steps") + (
        '<p class="sub">Share of the examples in each observed step whose gradient norm '
        "exceeded the clip norm (min–max band and mean per bucket).</p>"
    )


def _summary(series: PerSampleSeries) -> str:
    def last(values: np.ndarray) -> str:
        ok = values[np.isfinite(values)]
        return fmt(float(ok[-1])) if ok.size else "–"

    frac = series.fraction_clipped[np.isfinite(series.fraction_clipped)]
    examples = series.examples[np.isfinite(series.examples)]
    median = series.column("0.5")
    cards = [
        ("observed steps", str(len(series))),
        ("quantiles", ", ".join(series.labels) or "–"),
        ("examples per step", fmt(float(np.median(examples))) if examples.size else "–"),
        ("latest median norm", last(median) if median is not None else "–"),
        ("latest clip norm", last(series.clip_norm)),
        ("mean fraction clipped", f"{100 * float(frac.mean()):.1f}%" if frac.size else "–"),
    ]
    return (
        '<div class="cards">'
        + "".join(f'<div class="card">{escape(k)}<b>{escape(v)}</b></div>' for k, v in cards)
        + "</div>"
    )


def per_sample_section(series: PerSampleSeries, buckets: int = BUCKETS) -> str:
    """Summary cards, the quantile band chart and the fraction clipped chart."""
    return (
        _summary(series)
        + "<h3>Per-example norm quantiles</h3>"
        + norm_band_chart(series, buckets)
        + "<h3>Fraction of examples clipped</h3>"
        + fraction_chart(series, buckets)
    )
