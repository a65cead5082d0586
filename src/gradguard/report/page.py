"""The report page: sections assembled from a :class:`RunData` into one HTML string."""

from __future__ import annotations

import json
import math
from html import escape

import numpy as np

from ..health import Finding
from ..schema import EventKind
from .data import RunData
from .heatmap import bounded_layers, heatmap
from .per_sample import KIND as PER_SAMPLE
from .per_sample import per_sample_section, per_sample_series
from .sample import BUCKETS, any_per_bucket, envelope, rolling_mean
from .svg import HEIGHT, WIDTH, Frame, bar_chart, envelope_paths, flag_marks, fmt, log_bounds, svg

MAX_FINDINGS = 200  # findings shown in full (most severe first)
MAX_EVENTS = 200  # other events shown (the latest)
MAX_TEXT = 500  # characters of any one user string
MAX_CONFIG = 100  # config entries shown

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1240px;color:#1d2330;
background:#fafbfc}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #dde;padding-bottom:4px}.sub{color:#667}.chart{width:100%;height:auto;
background:#fff;border:1px solid #e3e6ec;border-radius:4px}.plot-bg{fill:#fff}
.grid{stroke:#eceef3;stroke-width:1}.tick{font-size:11px;fill:#556}.axis-label{font-size:12px;
fill:#334}.norm-band{fill:#8fb3e8;fill-opacity:.55;stroke:none}.norm-line{fill:none;
stroke:#1f4f9c;stroke-width:1.2}.norm-range{stroke:#6f98d8;stroke-width:1.2;fill:none}
.rate-range{stroke:#e9a04f;stroke-width:1.2;fill:none}.rate-band{fill:#f2b36b;fill-opacity:.5;stroke:none}
.rate-line{fill:none;stroke:#c0650c;stroke-width:1.2}.threshold{fill:none;stroke:#d62d2d;
stroke-width:1.4;stroke-dasharray:6 4}.clip-mark{stroke:#e08a00;stroke-width:1.2}
.skip-mark{stroke:#b00020;stroke-width:2}.nonfinite-mark{stroke:#b00020;stroke-width:3}
.bar{fill:#4a7fcf}.bar.bad{fill:#d62d2d}.heat{image-rendering:pixelated}
.legend span{display:inline-block;margin-right:18px;font-size:12px}.sw{display:inline-block;
width:18px;height:3px;vertical-align:middle;margin-right:5px}table{border-collapse:collapse;
font-size:13px}td,th{border:1px solid #e3e6ec;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f1f3f7}.cards{display:grid;grid-template-columns:repeat(6,1fr);
gap:10px}.card{background:#fff;border:1px solid #e3e6ec;border-radius:4px;padding:8px 10px}
.card b{display:block;font-size:18px}.finding{background:#fff;border:1px solid #e3e6ec;
border-left:5px solid #999;border-radius:4px;padding:8px 12px;margin:8px 0}
.finding.critical{border-left-color:#b00020}.finding.warning{border-left-color:#e08a00}
.finding.info{border-left-color:#4a7fcf}.sev{font-weight:600;text-transform:uppercase;
font-size:12px}.params{font-family:ui-monospace,monospace;font-size:12px;color:#334}
.empty{color:#667;font-style:italic}code{font-family:ui-monospace,monospace}
.dp-band{fill:#c9b6ea;fill-opacity:.6;stroke:none}.dp-range{stroke:#ad93dc;stroke-width:1.2;
fill:none}.dpiqr-band{fill:#8a63c9;fill-opacity:.55;stroke:none}.dpiqr-range{stroke:#7b55bd;
stroke-width:1;fill:none}.dp-median{fill:none;stroke:#3d1f73;stroke-width:1.4}.dp-clip{fill:none;
stroke:#e3001b;stroke-width:2.4;stroke-dasharray:9 4}h3{font-size:14px;margin:16px 0 6px}
"""


def text(value: object, limit: int = MAX_TEXT) -> str:
    """A user value as escaped, length-bounded text."""
    s = value if isinstance(value, str) else json.dumps(value, default=repr)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return escape(s)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "–"


def summary(run: RunData) -> str:
    """Headline numbers of the run."""
    s = run.steps
    n = run.n_steps
    norms = s["total_norm"]
    finite = norms[np.isfinite(norms)]
    cards = [
        ("steps", str(n)),
        ("last step", str(int(s["step"][-1])) if n else "–"),
        ("median total norm", fmt(float(np.median(finite))) if finite.size else "–"),
        ("clipped", _pct(float(s["clipped"].mean())) if n else "–"),
        ("skipped steps", str(int(s["skipped"].sum())) if n else "0"),
        ("non-finite steps", str(int(n - finite.size)) if n else "0"),
    ]
    return (
        '<div class="cards">'
        + "".join(f'<div class="card">{escape(k)}<b>{escape(v)}</b></div>' for k, v in cards)
        + "</div>"
    )


def norm_chart(run: RunData, buckets: int = BUCKETS) -> str:
    """Total norm on a log scale: min/max band, mean line, threshold, clip/skip marks."""
    s = run.steps
    if run.n_steps == 0:
        return '<p class="empty">No steps were recorded.</p>'
    env = envelope(s["step"], s["total_norm"], buckets)
    thr = envelope(s["step"], s["threshold"], buckets)
    lo, hi = log_bounds(env.low, env.high, thr.high)
    frame = Frame(float(env.start[0]), float(env.end[-1]), lo, hi, log=True)
    body = frame.axes("total grad norm (log)")
    body += envelope_paths(frame, env, "norm")
    xs = (frame.x(thr.start) + frame.x(thr.end)) / 2
    ok = np.isfinite(thr.high)
    for a, b in _runs(ok):
        pts = " ".join(
            f"{x:.1f},{y:.1f}" for x, y in zip(xs[a:b].tolist(), frame.y(thr.high[a:b]).tolist())
        )
        if b - a == 1:
            pts += f" {xs[a] + 2:.1f},{float(frame.y(thr.high[a])):.1f}"
        body.append(
            f'<polyline class="threshold" points="{pts}"><title>clip threshold</title></polyline>'
        )
    bottom = HEIGHT - 34 - 7
    body += flag_marks(
        frame, env, any_per_bucket(s["clipped"], buckets), "clip-mark", bottom, "clipped step(s)"
    )
    body += flag_marks(
        frame, env, any_per_bucket(s["skipped"], buckets), "skip-mark", 16, "skipped step(s)"
    )
    body += flag_marks(frame, env, env.nonfinite, "nonfinite-mark", 24, "non-finite norm")
    legend = (
        '<div class="legend"><span><i class="sw" style="background:#8fb3e8"></i>'
        'min–max per bucket</span><span><i class="sw" style="background:#1f4f9c"></i>'
        'mean</span><span><i class="sw" style="background:#d62d2d"></i>clip threshold'
        '</span><span><i class="sw" style="background:#e08a00"></i>clipped (bottom ticks)'
        '</span><span><i class="sw" style="background:#b00020"></i>skipped / non-finite '
        f"(top ticks)</span><span>{run.n_steps} steps in {len(env)} buckets</span></div>"
    )
    return svg(frame, body, "total gradient norm over steps") + legend


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def clip_rate_chart(run: RunData, buckets: int = BUCKETS) -> str:
    """Rolling share of clipped steps."""
    s = run.steps
    if run.n_steps == 0:
        return '<p class="empty">No steps were recorded.</p>'
    window = max(50, run.n_steps // 500)
    rate = rolling_mean(s["clipped"].astype(np.float64), window)
    env = envelope(s["step"], rate, buckets)
    frame = Frame(
        float(env.start[0]), float(env.end[-1]), 0.0, 1.0, log=False, width=WIDTH, height=200
    )
    body = frame.axes("clip rate") + envelope_paths(frame, env, "rate")
    return (
        svg(frame, body, "rolling clip rate")
        + f'<p class="sub">Share of clipped steps over a trailing window of {window} steps.</p>'
    )


def layer_sections(run: RunData) -> tuple[str, str]:
    """The heatmap and the latest per-layer bar chart."""
    if run.layer_norms.size == 0:
        empty = '<p class="empty">No per-layer snapshots were recorded.</p>'
        return empty, empty
    heat = heatmap(run.snapshot_steps, run.layers, run.layer_norms)
    labels, latest = bounded_layers(run.layers, run.layer_norms[-1:])
    bars = bar_chart(labels, latest[0], "latest per-layer gradient norms")
    step = int(run.snapshot_steps[-1])
    return heat, f'<p class="sub">Snapshot at step {step}, layers in model order.</p>' + bars


def _value(v: object) -> object:
    return fmt(float(v)) if isinstance(v, (int, float)) else v


def finding_html(f: Finding) -> str:
    """One finding with its evidence and advice."""
    params = ", ".join(text(p, 200) for p in f.params[:10])
    if len(f.params) > 10:
        params += f" … (+{len(f.params) - 10})"
    evidence = "".join(
        f"<tr><th>{text(k, 80)}</th><td>{text(_value(v), 120)}</td></tr>"
        for k, v in list(f.evidence.items())[:20]
    )
    advice = "".join(f"<li>{text(a)}</li>" for a in f.advice[:10])
    sev = escape(f.severity.value)
    return (
        f'<div class="finding {sev}"><span class="sev">{sev}</span> '
        f"<b>{text(f.kind.value, 40)}</b> · steps {f.steps[0]}–{f.steps[1]}"
        f"<div>{text(f.message)}</div>"
        + (f'<div class="params">{params}</div>' if params else "")
        + (f"<table>{evidence}</table>" if evidence else "")
        + (f"<ul>{advice}</ul>" if advice else "")
        + "</div>"
    )


def findings_section(run: RunData) -> str:
    """Findings, most severe first, bounded."""
    if not run.findings:
        return '<p class="empty">No findings: the health rules saw nothing wrong.</p>'
    ranked = sorted(run.findings, key=lambda f: (-f.severity.rank, f.steps[0]))
    shown = ranked[:MAX_FINDINGS]
    counts: dict[str, int] = {}
    for f in run.findings:
        counts[f.severity.value] = counts.get(f.severity.value, 0) + 1
    head = ", ".join(f"{v} {escape(k)}" for k, v in sorted(counts.items()))
    more = (
        f'<p class="sub">Showing {len(shown)} of {len(run.findings)}.</p>'
        if len(shown) < len(run.findings)
        else ""
    )
    return (
        f'<p class="sub">{len(run.findings)} findings ({head}).</p>'
        + more
        + "".join(finding_html(f) for f in shown)
    )


def events_section(run: RunData, *, plotted: frozenset[str] = frozenset()) -> str:
    """Events other than findings (skips, configuration changes), the latest first.

    Kinds in ``plotted`` have a section of their own and are only counted here.
    """
    events = [e for e in run.events if not EventKind.is_finding(e.kind)]
    hidden = sum(e.kind in plotted for e in events)
    events = [e for e in events if e.kind not in plotted] if hidden else events
    note = (
        f'<p class="sub">{hidden} per-step summary events are plotted above, not listed.</p>'
        if hidden
        else ""
    )
    if not events:
        return note + '<p class="empty">No other events were recorded.</p>'
    shown = events[-MAX_EVENTS:][::-1]
    rows = "".join(
        f"<tr><td>{e.step}</td><td>{text(e.kind, 80)}</td><td>{text(e.message)}</td>"
        f"<td><code>{text(e.data, 300)}</code></td></tr>"
        for e in shown
    )
    return (
        note + f'<p class="sub">{len(events)} events; the latest {len(shown)} shown.</p>'
        f"<table><tr><th>step</th><th>kind</th><th>message</th><th>data</th></tr>{rows}"
        "</table>"
    )


def meta_section(run: RunData) -> str:
    """Run metadata: versions, sizes, configuration."""
    m = run.meta
    rows = [
        (k, m.get(k))
        for k in (
            "created",
            "resumed",
            "gradguard_version",
            "torch_version",
            "python_version",
            "schema_version",
        )
        if k in m
    ]
    rows += [
        ("parameter tensors", len(run.names)),
        ("layers (modules)", len(run.layers)),
        ("snapshots", int(run.snapshot_steps.size)),
        ("store", run.path),
    ]
    config = m.get("config") or {}
    items = list(config.items())[:MAX_CONFIG] if isinstance(config, dict) else [("config", config)]
    table = "".join(f"<tr><th>{text(k, 80)}</th><td>{text(v)}</td></tr>" for k, v in rows)
    conf = "".join(
        f"<tr><th>{text(k, 80)}</th><td><code>{text(v)}</code></td></tr>" for k, v in items
    )
    return f"<table>{table}</table><h3>Configuration</h3>" + (
        f"<table>{conf}</table>" if conf else '<p class="empty">none recorded</p>'
    )


def render(run: RunData) -> str:
    """The whole report page."""
    heat, bars = layer_sections(run)
    title = f"gradguard report: {run.path}"
    dp = per_sample_series(run.events)
    sections = [
        ("summary", "Summary", summary(run)),
        ("total-norm", "Total gradient norm", norm_chart(run)),
        ("clip-rate", "Clip rate", clip_rate_chart(run)),
    ]
    if dp is not None:
        sections.append(("per-sample", "Per-example gradient norms", per_sample_section(dp)))
    plotted = frozenset({PER_SAMPLE}) if dp is not None else frozenset()
    sections += [
        ("heatmap", "Per-layer norms over steps", heat),
        ("latest-layers", "Latest per-layer norms", bars),
        ("findings", "Findings", findings_section(run)),
        ("events", "Events", events_section(run, plotted=plotted)),
        ("meta", "Run", meta_section(run)),
    ]
    body = "".join(
        f'<section id="{sid}"><h2>{escape(h)}</h2>{content}</section>'
        for sid, h, content in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{text(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>gradguard report</h1><div class="sub">{text(run.path)}</div>{body}'
        "</body></html>"
    )
