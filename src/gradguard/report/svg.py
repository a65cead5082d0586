"""Inline SVG charts built as strings: log-scale series with envelopes, bars, heatmap frame.

Every label that can come from a user (layer names, titles) passes through
:func:`html.escape`; numbers are formatted here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

from .sample import Envelope

WIDTH, HEIGHT = 1200, 260
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 16, 34


def fmt(value: float) -> str:
    """A compact number for labels."""
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def _steps_label(step: float) -> str:
    step = int(step)
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if abs(step) >= div and step % (div // 10) == 0:
            return f"{step / div:g}{unit}"
    return str(step)


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values covering ``[lo, hi]``."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


class Frame:
    """A plot area mapping steps (x) and values (y, log10 or linear) to pixels."""

    def __init__(
        self,
        x0: float,
        x1: float,
        y0: float,
        y1: float,
        *,
        log: bool,
        width: int = WIDTH,
        height: int = HEIGHT,
    ) -> None:
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y0, self.y1 = y0, y1 if y1 > y0 else y0 + 1
        self.log, self.width, self.height = log, width, height

    def x(self, step: np.ndarray | float) -> np.ndarray:
        span = self.width - LEFT - RIGHT
        return LEFT + (np.asarray(step, dtype=np.float64) - self.x0) / (self.x1 - self.x0) * span

    def y(self, value: np.ndarray | float) -> np.ndarray:
        v = np.asarray(value, dtype=np.float64)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.log10(np.maximum(v, 10.0**self.y0))
        v = np.clip(v, self.y0, self.y1)
        span = self.height - TOP - BOTTOM
        return TOP + (self.y1 - v) / (self.y1 - self.y0) * span

    def axes(self, y_label: str) -> list[str]:
        """Axis lines, grid, tick labels."""
        h, w = self.height, self.width
        out = [
            f'<rect class="plot-bg" x="{LEFT}" y="{TOP}" width="{w - LEFT - RIGHT}" '
            f'height="{h - TOP - BOTTOM}"/>'
        ]
        if self.log:
            yt = [float(e) for e in range(math.ceil(self.y0), math.floor(self.y1) + 1)]
            labels = [f"1e{int(e)}" for e in yt]
            ypos = [float(self.y(10.0**e)) for e in yt]
        else:
            yt = nice_ticks(self.y0, self.y1, 4)
            labels = [fmt(v) for v in yt]
            ypos = [float(self.y(v)) for v in yt]
        for yy, label in zip(ypos, labels):
            out.append(
                f'<line class="grid" x1="{LEFT}" x2="{w - RIGHT}" y1="{yy:.1f}" '
                f'y2="{yy:.1f}"/><text class="tick" x="{LEFT - 6}" y="{yy + 4:.1f}" '
                f'text-anchor="end">{escape(label)}</text>'
            )
        for xv in nice_ticks(self.x0, self.x1, 8):
            xx = float(self.x(xv))
            out.append(
                f'<line class="grid" x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" '
                f'y2="{h - BOTTOM}"/><text class="tick" x="{xx:.1f}" '
                f'y="{h - BOTTOM + 16}" text-anchor="middle">{_steps_label(xv)}</text>'
            )
        out.append(
            f'<text class="axis-label" x="14" y="{TOP + (h - TOP - BOTTOM) / 2:.0f}" '
            f'transform="rotate(-90 14 {TOP + (h - TOP - BOTTOM) / 2:.0f})" '
            f'text-anchor="middle">{escape(y_label)}</text>'
            f'<text class="axis-label" x="{w - RIGHT}" y="{h - 4}" '
            f'text-anchor="end">step</text>'
        )
        return out


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` index ranges where ``mask`` is True."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _points(xs: np.ndarray, ys: np.ndarray) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs.tolist(), ys.tolist()))


def envelope_paths(frame: Frame, env: Envelope, cls: str, *, mean: bool = True) -> list[str]:
    """A filled min/max band, a min-max stroke per bucket, and (with ``mean``) a mean line.

    The per-bucket strokes are at least one pixel wide, so a one-step spike inside a
    bucket stays visible at any zoom (a polygon's sub-pixel tip would fade out).
    """
    out = []
    xs = (frame.x(env.start) + frame.x(env.end)) / 2
    finite = np.isfinite(env.high)
    top, bottom = frame.y(np.where(finite, env.high, 1.0)), frame.y(np.where(finite, env.low, 1.0))
    strokes = " ".join(
        f"M{x:.1f} {b + 0.5:.1f}V{t:.1f}"
        for x, t, b, ok in zip(xs.tolist(), top.tolist(), bottom.tolist(), finite.tolist())
        if ok
    )
    for a, b in _runs(finite):
        if b - a > 1:
            upper = _points(xs[a:b], top[a:b])
            lower = _points(xs[a:b][::-1], bottom[a:b][::-1])
            out.append(f'<polygon class="{cls}-band" points="{upper} {lower}"/>')
    if strokes:
        out.append(f'<path class="{cls}-range" d="{strokes}"/>')
    if mean:
        for a, b in _runs(finite):
            if b - a > 1:
                line = _points(xs[a:b], frame.y(env.mean[a:b]))
                out.append(f'<polyline class="{cls}-line" points="{line}"/>')
    return out


def series_line(frame: Frame, env: Envelope, values: np.ndarray, cls: str, title: str) -> list[str]:
    """A polyline through one value per bucket of ``env``, broken where a value is not finite.

    A lone finite bucket becomes a two-pixel stub so that it still shows.
    """
    values = np.asarray(values, dtype=np.float64)
    xs = (frame.x(env.start) + frame.x(env.end)) / 2
    ys = frame.y(np.where(np.isfinite(values), values, 1.0))
    out = []
    for a, b in _runs(np.isfinite(values)):
        pts = _points(xs[a:b], ys[a:b])
        if b - a == 1:
            pts += f" {xs[a] + 2:.1f},{ys[a]:.1f}"
        out.append(
            f'<polyline class="{cls}" points="{pts}"><title>{escape(title)}</title></polyline>'
        )
    return out


def flag_marks(
    frame: Frame, env: Envelope, flags: np.ndarray, cls: str, y: float, title: str
) -> list[str]:
    """Small tick marks at ``y`` for each bucket where ``flags`` is set."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return []
    xs = (frame.x(env.start[idx]) + frame.x(env.end[idx])) / 2
    path = " ".join(f"M{x:.1f} {y:.1f}v6" for x in xs.tolist())
    return [f'<path class="{cls}" d="{path}"><title>{escape(title)}</title></path>']


def svg(frame: Frame, body: Sequence[str], label: str) -> str:
    """Wrap chart elements in an ``<svg>`` with an accessible label."""
    return (
        f'<svg class="chart" viewBox="0 0 {frame.width} {frame.height}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        + "".join(body)
        + "</svg>"
    )


def log_bounds(*arrays: np.ndarray) -> tuple[float, float]:
    """Whole decades covering the finite positive values of ``arrays`` (1e-8 floor)."""
    vals = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if vals.size == 0:
        return -3.0, 1.0
    lo = max(math.floor(math.log10(vals.min())), -12)
    hi = math.ceil(math.log10(vals.max()))
    return float(lo), float(max(hi, lo + 1))


def bar_chart(labels: Sequence[str], values: np.ndarray, title: str) -> str:
    """Horizontal bars on a log scale, one per layer, in model order."""
    n = len(labels)
    row = 16 if n <= 60 else 8
    height = TOP + BOTTOM + row * max(n, 1)
    lo, hi = log_bounds(values)
    left = 260
    span = WIDTH - left - RIGHT

    def xpos(v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            return 0.0
        return max(0.0, min(1.0, (math.log10(v) - lo) / (hi - lo))) * span

    body = [
        f'<rect class="plot-bg" x="{left}" y="{TOP}" width="{span}" height="{row * max(n, 1)}"/>'
    ]
    for e in range(int(lo), int(hi) + 1):
        xx = left + (e - lo) / (hi - lo) * span
        body.append(
            f'<line class="grid" x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" '
            f'y2="{height - BOTTOM}"/><text class="tick" x="{xx:.1f}" '
            f'y="{height - BOTTOM + 16}" text-anchor="middle">1e{e}</text>'
        )
    for i, (label, v) in enumerate(zip(labels, np.asarray(values, dtype=np.float64).tolist())):
        y = TOP + i * row
        cls = "bar bad" if not math.isfinite(v) else "bar"
        width = span if not math.isfinite(v) else xpos(v)
        body.append(
            f"<g><title>{escape(label)}: {escape(fmt(v))}</title>"
            f'<rect class="{cls}" x="{left}" y="{y + 1}" width="{width:.1f}" '
            f'height="{row - 2}"/>'
        )
        if row >= 12 or i % max(1, n // 40) == 0:
            short = label if len(label) <= 40 else "…" + label[-39:]
            body.append(
                f'<text class="tick" x="{left - 6}" y="{y + row - 3}" '
                f'text-anchor="end">{escape(short)}</text>'
            )
        body.append("</g>")
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        + "".join(body)
        + "</svg>"
    )
