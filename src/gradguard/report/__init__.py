"""The HTML report of recorded runs: one self-contained, offline, interactive file.

One run, or several compared on the same axes (``gradguard report RUN_A RUN_B``): a
verdict per run (healthy, recovered from N incidents, lost at step N) with its headline
numbers; linked charts on one step axis (loss raw and smoothed, learning rate, total
norm with its threshold and clip/skip marks, clip rate and coefficient, AMP loss scale)
that zoom together, show values on hover and switch between log and linear; a
per-layer heatmap grouped by module with each layer's norm history; findings whose
range is highlighted on the charts when clicked; events as a table; run metadata.
Runs with ``per_sample`` events (:class:`gradguard.privacy.PerSampleMonitor`) get a
per-example gradient norm section.

Charts are drawn by the vendored uPlot library (MIT) and the page's own script, both
inlined and allowed by hash in a Content-Security-Policy that forbids any other script
and any network access; every user string is escaped.

Size bound: every series is reduced to at most 2,000 min/max buckets on a shared step
grid, the heatmap to 400 snapshot columns (fewer for very wide models) with 16-bit
log codes, and findings, events, config entries and strings are capped: a 1M-step,
1,000-tensor run makes a report of about 1 MB (``benchmarks/bench_report.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..record.store import StoreError, is_database
from .data import RunData, load_run, open_run
from .page import render

#: The documented upper bound of a report's size in bytes, for any run length.
MAX_REPORT_BYTES = 3_000_000

PathLike = str | os.PathLike[str]


def _paths(runs: PathLike | Sequence[PathLike]) -> list[PathLike]:
    if isinstance(runs, (str, os.PathLike)):
        return [runs]
    paths = list(runs)
    if not paths:
        raise ValueError("runs: give at least one run directory")
    return paths


def render_report(
    runs: PathLike | Sequence[PathLike],
    *,
    labels: Sequence[str] | None = None,
    rules: bool | None = None,
) -> str:
    """The report of one run (a run directory or ``.db`` file) or of several compared.

    ``labels`` name the runs (default: their directory names); ``rules`` as for
    :func:`load_run`.
    """
    paths = _paths(runs)
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels: got {len(labels)} labels for {len(paths)} runs")
    return render([load_run(p, rules=rules) for p in paths], labels)


def default_output(runs: Sequence[PathLike]) -> Path:
    """``<run dir>/report.html`` for one run; ``compare.html`` in the runs' common
    parent directory for several."""
    dirs = [Path(p).parent if Path(p).is_file() else Path(p) for p in runs]
    if len(dirs) == 1:
        return dirs[0] / "report.html"
    return Path(os.path.commonpath([os.path.abspath(d) for d in dirs])) / "compare.html"


def build_report(
    runs: PathLike | Sequence[PathLike],
    out: PathLike | None = None,
    *,
    labels: Sequence[str] | None = None,
    rules: bool | None = None,
) -> Path:
    """Write the report of ``runs`` to ``out`` (default: :func:`default_output`)."""
    paths = _paths(runs)
    path = Path(out) if out is not None else default_output(paths)
    if is_database(path):  # checked before any work: a typo must not cost a run
        raise StoreError(f"--out {str(path)!r} is a database (a run store); choose another file")
    html = render_report(paths, labels=labels, rules=rules)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


__all__ = [
    "MAX_REPORT_BYTES",
    "RunData",
    "build_report",
    "default_output",
    "load_run",
    "open_run",
    "render_report",
]
