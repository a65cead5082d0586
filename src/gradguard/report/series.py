"""A run's step columns as chart series on the report's shared step grid.

Each series is reduced per bucket so that nothing is lost to downsampling: the loss and
the total norm keep their min and max (a one-step spike stays visible at any zoom),
the clip coefficient its min, the loss scale its min (an overflow's drop), counts of
clipped, skipped and non-finite steps are summed. Values are JSON lists with ``None``
for an empty bucket.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .data import RunData
from .sample import Bucketed, Grid, rolling_mean

#: Steps listed one by one for the skip and non-finite marks (beyond: per-bucket counts).
MAX_MARKS = 1000
#: Significant digits kept in the page.
DIGITS = 5


def floats(values: np.ndarray, digits: int = DIGITS) -> list[float | None]:
    """Finite values rounded to ``digits`` significant digits; ``None`` for the rest."""
    out: list[float | None] = []
    for v in np.asarray(values, dtype=np.float64).tolist():
        out.append(float(f"{v:.{digits}g}") if math.isfinite(v) else None)
    return out


def ints(values: np.ndarray) -> list[int]:
    """Counts as plain ints."""
    return np.asarray(values, dtype=np.int64).tolist()


def clip_window(n_steps: int) -> int:
    """Trailing window of the clip rate: 50 steps, or 0.2% of a long run."""
    return max(50, n_steps // 500)


def run_series(run: RunData, grid: Grid) -> dict[str, Any]:
    """The run's chart series on ``grid``; columns the run never recorded are left out."""
    s = run.steps
    step = s["step"]
    at = Bucketed.place(grid, step)
    out: dict[str, Any] = {"count": ints(at.reduce(np.ones(step.size), "count"))}
    norm = s["total_norm"]
    for how in ("min", "max", "mean"):
        out[f"norm_{how}"] = floats(at.reduce(norm, how))
    out["norm_nonfinite"] = ints(at.reduce(norm, "nonfinite"))
    loss = s["loss"]
    if np.isfinite(loss).any():
        for how in ("min", "max", "mean"):
            out[f"loss_{how}"] = floats(at.reduce(loss, how))
        out["loss_nonfinite"] = ints(at.reduce(loss, "nonfinite"))
    if np.isfinite(s["lr"]).any():
        out["lr"] = floats(at.reduce(s["lr"], "mean"))
    if np.isfinite(s["loss_scale"]).any():
        out["loss_scale"] = floats(at.reduce(s["loss_scale"], "min"))
    threshold = s["threshold"]
    if np.isfinite(threshold).any():
        out["threshold"] = floats(at.reduce(threshold, "max"))
    clipped = s["clipped"].astype(np.float64)
    if clipped.any() or np.isfinite(threshold).any():
        out["clip_coef"] = floats(at.reduce(s["clip_coef"], "min"))
        window = clip_window(step.size)
        out["clip_rate"] = floats(at.reduce(rolling_mean(clipped, window), "mean"))
        out["clip_window"] = window
    out["clipped"] = ints(at.reduce(clipped, "sum"))
    out["skipped"] = ints(at.reduce(s["skipped"], "sum"))
    out["skip_steps"] = ints(step[s["skipped"]][:MAX_MARKS])
    out["nonfinite_steps"] = ints(step[~np.isfinite(norm)][:MAX_MARKS])
    return out
