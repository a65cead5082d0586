"""The HTML report of a recorded run: one self-contained, offline file.

The page is plain HTML with inline CSS and inline SVG; the per-layer heatmap is an
inline PNG. Runs with ``per_sample`` events (:class:`gradguard.privacy.PerSampleMonitor`)
get a per-example gradient norm section: quantile bands, median, clip norm and the
fraction clipped over steps. The page runs no script at all (a Content-Security-Policy
forbids any), fetches nothing, and escapes every user string.

Size bound: every series is reduced to at most 2000 min/max buckets, the heatmap to
400 columns x 300 layer rows, and findings, events, config entries and strings are
capped, so the file stays **under 2 MB for any run length** (a 1M-step run included).
"""

from __future__ import annotations

import os
from pathlib import Path

from .data import RunData, load_run, open_run
from .page import render

#: The documented upper bound of a report's size in bytes.
MAX_REPORT_BYTES = 2_000_000


def render_report(run_dir: str | os.PathLike[str]) -> str:
    """The report of the run at ``run_dir`` (a run directory or ``.db`` file) as HTML."""
    return render(load_run(run_dir))


def build_report(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``<run dir>/report.html``)."""
    html = render_report(run_dir)
    if out is None:
        base = Path(run_dir)
        out = (base.parent if base.is_file() else base) / "report.html"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


__all__ = ["MAX_REPORT_BYTES", "RunData", "build_report", "load_run", "open_run", "render_report"]
