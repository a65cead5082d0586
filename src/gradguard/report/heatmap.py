"""Per-layer norms over snapshot steps as a bounded heatmap image with SVG labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

from . import png
from .sample import bucket_starts
from .svg import RIGHT, WIDTH, log_bounds

#: Largest heatmap size: columns (snapshot buckets) x rows (layer groups).
MAX_COLUMNS, MAX_ROWS = 400, 300


def reduce_max(values: np.ndarray, starts: np.ndarray, axis: int) -> np.ndarray:
    """Max over runs of ``values`` along ``axis``; a non-finite entry makes its run inf."""
    bad = ~np.isfinite(values)
    clean = np.where(bad, -np.inf, values)
    out = np.maximum.reduceat(clean, starts, axis=axis)
    anybad = np.add.reduceat(bad.astype(np.int64), starts, axis=axis) > 0
    return np.where(anybad, np.inf, out)


def merge_labels(labels: Sequence[str], starts: np.ndarray) -> list[str]:
    """Labels for runs of consecutive layers: the layer, or ``first … last (k layers)``."""
    ends = [*starts[1:].tolist(), len(labels)]
    out = []
    for a, b in zip(starts.tolist(), ends):
        out.append(labels[a] if b - a == 1 else f"{labels[a]} … {labels[b - 1]} ({b - a} layers)")
    return out


def bounded_layers(
    labels: Sequence[str], norms: np.ndarray, rows: int = MAX_ROWS
) -> tuple[list[str], np.ndarray]:
    """At most ``rows`` layer rows (consecutive layers merged by max), model order kept."""
    if len(labels) <= rows:
        return list(labels), norms
    starts = bucket_starts(len(labels), rows)
    return merge_labels(labels, starts), reduce_max(norms, starts, axis=1)


def colours(norms: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """RGB cells: log10 norm on the colour scale; zero black, non-finite red, NaN grey."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.log10(np.where(norms > 0, norms, 1.0)) - lo) / (hi - lo)
    rgb = png.colour_scale(np.nan_to_num(t))
    rgb[norms == 0] = png.ZERO_RGB
    rgb[np.isinf(norms)] = png.NONFINITE_RGB
    rgb[np.isnan(norms)] = png.MISSING_RGB
    return rgb


def heatmap(
    steps: np.ndarray,
    labels: Sequence[str],
    norms: np.ndarray,
    columns: int = MAX_COLUMNS,
    rows: int = MAX_ROWS,
) -> str:
    """An SVG heatmap (rows: layers in model order; columns: snapshot steps, bucketed)."""
    if norms.size == 0:
        return '<p class="empty">No per-layer snapshots were recorded.</p>'
    starts = bucket_starts(norms.shape[0], columns)
    cols = reduce_max(norms, starts, axis=0)
    labels, cols = bounded_layers(labels, cols, rows)
    grid = cols.T  # rows: layers
    lo, hi = log_bounds(grid)
    image = png.data_uri(png.encode_png(colours(grid, lo, hi)))
    left, top, bottom = 260, 10, 44
    n = len(labels)
    row = 14 if n <= 40 else max(2, min(8, 600 // n))
    plot_h = row * n
    span = WIDTH - left - RIGHT
    height = top + plot_h + bottom
    body = [
        f'<image x="{left}" y="{top}" width="{span}" height="{plot_h}" '
        f'preserveAspectRatio="none" href="{image}" class="heat"/>'
    ]
    every = max(1, math.ceil(n / (plot_h / 10)))
    for i, label in enumerate(labels):
        if i % every == 0:
            short = label if len(label) <= 40 else "…" + label[-39:]
            body.append(
                f'<text class="tick" x="{left - 6}" y="{top + i * row + row / 2 + 4:.1f}" '
                f'text-anchor="end"><title>{escape(label)}</title>{escape(short)}</text>'
            )
    first, last = int(steps[0]), int(steps[-1])
    y = top + plot_h + 16
    body.append(
        f'<text class="tick" x="{left}" y="{y}">step {first}</text>'
        f'<text class="tick" x="{WIDTH - RIGHT}" y="{y}" text-anchor="end">step {last}'
        f'</text><text class="tick" x="{left + span / 2:.0f}" y="{y}" '
        f'text-anchor="middle">{len(steps)} snapshots in {len(starts)} columns '
        f"(max per column)</text>"
    )
    legend_x, legend_y = left, y + 8
    for k in range(100):
        colour = png.scale_css(k / 99)
        body.append(
            f'<rect x="{legend_x + k * 3}" y="{legend_y}" width="3" height="10" fill="{colour}"/>'
        )
    body.append(
        f'<text class="tick" x="{legend_x + 306}" y="{legend_y + 9}">1e{int(lo)} … '
        f"1e{int(hi)} (log norm) · black: zero · red: non-finite</text>"
    )
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height + 8}" role="img" '
        f'aria-label="per-layer gradient norms over steps" '
        f'xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )
