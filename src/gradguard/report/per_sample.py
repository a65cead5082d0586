"""The per-example gradient norm section, read from ``per_sample`` events.

:class:`gradguard.privacy.PerSampleMonitor` records one event per observed step whose
data holds quantiles of the per-example norms (keyed by labels such as ``"0.5"``), the
clip norm and the share of examples above it. This module turns those events into
series on the report's step grid and summary cards; it imports neither torch nor
the privacy package. Fields the privacy monitor lists in an event's ``data["exact"]``
were computed from the raw per-example norms, outside the DP mechanism: the page
labels them "not private".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np

from ..schema import Event, EventKind
from .sample import Bucketed, Grid
from .series import floats
from .text import fmt

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
        fraction_clipped: share of examples above the clip norm (NaN where unknown);
            the noised share the DP mechanism released when the exact one was not.
        examples: examples per step (the expected batch size when the realised one was
            not released).
        exact: payload fields marked exact (not covered by the privacy guarantee).
        released: series shown from DP-released stand-ins (``"fraction_clipped"``,
            ``"n"``), labelled as such.
    """

    steps: np.ndarray
    labels: tuple[str, ...]
    quantiles: np.ndarray
    clip_norm: np.ndarray
    fraction_clipped: np.ndarray
    examples: np.ndarray
    exact: frozenset[str] = frozenset()
    released: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return int(self.steps.size)

    def column(self, label: str) -> np.ndarray | None:
        """The quantile series of ``label``, or ``None`` when it was not recorded."""
        return self.quantiles[:, self.labels.index(label)] if label in self.labels else None


def _number(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _first(data: dict[str, Any], keys: tuple[str, ...]) -> float:
    """The first of ``keys`` that holds a number (exact fields first, then released ones)."""
    for key in keys:
        value = _number(data.get(key))
        if math.isfinite(value):
            return value
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
        fraction_clipped=np.array([_first(e.data, _FRACTION) for e in rows]),
        examples=np.array([_first(e.data, _EXAMPLES) for e in rows]),
        exact=frozenset(_exact_fields(rows)),
        released=frozenset(_released(rows)),
    )


#: Where each series is read from: the exact field when it was released (marked "not
#: private"), else what the DP mechanism released (the private monitor's default).
_FRACTION = ("fraction_clipped", "noised_fraction_clipped")
_EXAMPLES = ("n", "expected_n")


def _released(rows: Sequence[Event]) -> set[str]:
    """Series shown from DP-released stand-ins: the events lacked the exact field."""
    out = set()
    for name, (exact, stand_in) in {"fraction_clipped": _FRACTION, "n": _EXAMPLES}.items():
        if any(exact not in e.data and stand_in in e.data for e in rows):
            out.add(name)
    return out


def _exact_fields(rows: Sequence[Event]) -> set[str]:
    fields: set[str] = set()
    for e in rows:
        exact = e.data.get("exact")
        if isinstance(exact, list):
            fields.update(f for f in exact[:MAX_LABELS] if isinstance(f, str) and len(f) < 40)
    return fields


def per_sample_payload(series: PerSampleSeries, grid: Grid) -> dict[str, Any]:
    """Chart series on ``grid``: the outer and inner quantile bands (lowest to highest
    per bucket), the median, the clip norm and the fraction clipped."""
    at = Bucketed.place(grid, series.steps)
    out: dict[str, Any] = {"labels": list(series.labels), "exact": sorted(series.exact)}
    if series.labels:
        lowest, highest = series.labels[0], series.labels[-1]
        out["outer"] = [lowest, highest]
        out["outer_low"] = floats(at.reduce(series.column(lowest), "min"))
        out["outer_high"] = floats(at.reduce(series.column(highest), "max"))
        if {"0.25", "0.75"} <= set(series.labels) and (lowest, highest) != ("0.25", "0.75"):
            out["inner_low"] = floats(at.reduce(series.column("0.25"), "min"))
            out["inner_high"] = floats(at.reduce(series.column("0.75"), "max"))
    median = series.column("0.5")
    if median is not None:
        out["median"] = floats(at.reduce(median, "mean"))
    if np.isfinite(series.clip_norm).any():
        out["clip_norm"] = floats(at.reduce(series.clip_norm, "mean"))
    if np.isfinite(series.fraction_clipped).any():
        out["fraction_clipped"] = floats(at.reduce(series.fraction_clipped, "mean"))
        out["fraction_clipped_max"] = floats(at.reduce(series.fraction_clipped, "max"))
    return out


#: What each card shows, by payload field (for the "not private" labels).
_FIELDS = {
    "quantiles": "quantiles",
    "examples per step": "n",
    "latest median norm": "quantiles",
    "latest clip norm": "clip_norm",
    "mean fraction clipped": "fraction_clipped",
}


def not_private(field: str, series: PerSampleSeries) -> str:
    """The label of a card: "not private" for an exact field, "noised" or "expected" for
    a DP-released stand-in, else nothing."""
    if field in series.released:
        word = "noised" if field == "fraction_clipped" else "expected"
        return (
            f'<span class="released" title="released through the DP mechanism (covered by '
            f'epsilon)">{word}</span>'
        )
    if field not in series.exact:
        return ""
    return (
        '<span class="exact" title="computed from the raw per-example norms, outside the '
        'DP mechanism: not covered by epsilon">not private</span>'
    )


def per_sample_summary(series: PerSampleSeries) -> str:
    """Summary cards of the section."""

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
    html = "".join(
        f'<div class="card">{escape(k)}{not_private(_FIELDS.get(k, ""), series)}'
        f"<b>{escape(v)}</b></div>"
        for k, v in cards
    )
    note = ""
    if series.exact:
        listed = ", ".join(escape(f) for f in sorted(series.exact))
        note = (
            f'<p class="sub">Marked <span class="exact">not private</span>: {listed} — '
            "computed from the raw per-example norms, outside the DP mechanism, so not "
            "covered by the privacy guarantee (epsilon). Do not publish them.</p>"
        )
    return f'<div class="cards">{html}</div>{note}'
