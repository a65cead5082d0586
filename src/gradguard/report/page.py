"""The report page: one offline HTML file holding its data, its chart library and its script.

The charts are drawn by uPlot (vendored in ``assets/``, MIT, see ``uPlot.LICENSE``) and
``assets/report.js``, both inlined. A Content-Security-Policy allows exactly those two
scripts (by hash) and the page's own style, and no network at all. The runs' numbers
travel as JSON in a ``<script type="application/json">`` block (data, never executed)
with ``<``, ``>`` and ``&`` escaped, so no name can close the element; the script
shows every user string with ``textContent`` or on a canvas, never as markup.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from .data import RunData
from .heatmap import heatmap_payload
from .per_sample import KIND as PER_SAMPLE
from .per_sample import (
    PerSampleSeries,
    per_sample_payload,
    per_sample_series,
    per_sample_summary,
)
from .sample import BUCKETS, Grid
from .sections import (
    events_section,
    findings_section,
    meta_section,
    summary_table,
    top_findings_html,
    verdicts,
)
from .series import run_series
from .text import script_json, text
from .verdict import Summary, summarize

ASSETS = Path(__file__).parent / "assets"
UPLOT_VERSION = "1.6.32"


@functools.cache
def asset(name: str) -> str:
    """A vendored file's text."""
    return (ASSETS / name).read_text(encoding="utf-8")


def csp_hash(source: str) -> str:
    """The CSP source expression allowing an inline element with exactly ``source``."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def run_labels(paths: Sequence[str]) -> list[str]:
    """Short, distinct names for runs: the run directory's name, with parents as needed."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    parts = [p[:-1] if p and p[-1].endswith(".db") else p for p in parts]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) or "run" for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def payload(
    runs: Sequence[RunData],
    labels: Sequence[str],
    summaries: Sequence[Summary],
    per_sample: Sequence[PerSampleSeries | None],
    grid: Grid,
) -> dict[str, Any]:
    """Everything the script draws, per run, on the shared step grid."""
    out: dict[str, Any] = {
        "x": grid.start.tolist(),
        "x_end": grid.end.tolist(),
        "uplot": UPLOT_VERSION,
        "runs": [],
    }
    for run, label, summary, dp in zip(runs, labels, summaries, per_sample):
        out["runs"].append(
            {
                "label": label,
                "first_step": int(run.steps["step"][0]) if run.n_steps else None,
                "last_step": run.last_step,
                "lost_at": summary.verdict.lost_at,
                "verdict": summary.verdict.state,
                "series": run_series(run, grid),
                "layers": heatmap_payload(run),
                "per_sample": per_sample_payload(dp, grid) if dp is not None else None,
            }
        )
    return out


def _section(sid: str, title: str, content: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{content}</section>'


CHARTS = (
    '<div class="toolbar"><button type="button" id="reset-zoom">reset zoom</button>'
    '<label>loss smoothing <input type="range" id="smoothing" min="0" max="0.99" '
    'step="0.01" value="0.6"><output id="smoothing-value">0.60</output></label>'
    '<span class="hint">Drag across a chart to zoom every chart; double-click to reset. '
    "Hover for values; click a legend entry to hide a series.</span></div>"
    '<div id="panels"></div>'
)
LAYERS = (
    '<div class="toolbar" id="layer-controls"></div><div id="heatmap"></div>'
    '<h3 id="history-title">Norm history of a layer</h3><div id="layer-history"></div>'
)


def render(runs: Sequence[RunData], labels: Sequence[str] | None = None) -> str:
    """The whole page for one run, or several runs compared on the same axes."""
    labels = list(labels) if labels is not None else run_labels([r.path for r in runs])
    dp = [per_sample_series(r.events) for r in runs]
    observed = [d.steps for d in dp if d is not None]
    grid = Grid.over([r.steps["step"] for r in runs] + observed, BUCKETS)
    summaries = [summarize(r) for r in runs]
    data = payload(runs, labels, summaries, dp, grid)
    sections = [
        _section(
            "summary",
            "Summary",
            verdicts(labels, summaries)
            + f'<div class="overview"><div>{summary_table(labels, summaries)}</div>'
            + f"<div>{top_findings_html(runs, labels)}</div></div>",
        ),
        _section("charts", "Training", CHARTS),
    ]
    if any(d is not None for d in dp):
        cards = "".join(
            (f"<h3>{text(label, 80)}</h3>" if len(runs) > 1 else "") + per_sample_summary(d)
            for label, d in zip(labels, dp)
            if d is not None
        )
        sections.append(
            _section(
                "per-sample", "Per-example gradient norms", cards + '<div id="dp-panels"></div>'
            )
        )
    plotted = frozenset({PER_SAMPLE}) if any(d is not None for d in dp) else frozenset()
    sections += [
        _section("layers", "Per-layer gradient norms", LAYERS),
        _section("findings", "Findings", findings_section(runs, labels)),
        _section("events", "Events", events_section(runs, labels, plotted)),
        _section("meta", "Runs" if len(runs) > 1 else "Run", meta_section(runs, labels)),
    ]
    style = asset("uPlot.min.css") + asset("report.css")
    scripts = [asset("uPlot.iife.min.js"), asset("report.js")]
    policy = (
        "default-src 'none'; "
        f"script-src {' '.join(csp_hash(s) for s in scripts)}; "
        f"style-src {csp_hash(style)}; img-src data:; base-uri 'none'; form-action 'none'"
    )
    title = "gradguard report: " + (" vs ".join(labels) if len(runs) > 1 else runs[0].path)
    where = " · ".join(text(r.path) for r in runs)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        f"<title>{text(title)}</title><style>{style}</style></head><body>"
        f'<header><h1>gradguard report</h1><div class="sub">{where}</div></header>'
        '<noscript><p class="empty">The charts need JavaScript; the tables below do not.'
        "</p></noscript>"
        + "".join(sections)
        + f'<script type="application/json" id="gg-data">{script_json(data)}</script>'
        + "".join(f"<script>{s}</script>" for s in scripts)
        + "</body></html>"
    )
