"""The page's text sections as escaped HTML: verdicts, side-by-side summary, findings,
events and run metadata. Every user string goes through :func:`.text.text`."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from ..health import Finding
from ..schema import Event, EventKind
from .data import RunData
from .text import duration, fmt, pct, text
from .verdict import Summary, top_findings

MAX_FINDINGS = 200  # findings shown per run (most severe first)
MAX_EVENTS = 200  # other events shown per run (the latest)
MAX_CONFIG = 100  # config entries shown
MAX_DETAILS = 12  # payload fields shown per event


def _badge(label: str, run: int, runs: int) -> str:
    if runs < 2:
        return ""
    return f'<span class="run-chip c{run % 8}">{text(label, 80)}</span> '


def verdicts(labels: Sequence[str], summaries: Sequence[Summary]) -> str:
    """One card per run: its name, its verdict, and the numbers behind it."""
    cards = []
    for i, (label, s) in enumerate(zip(labels, summaries)):
        v = s.verdict
        loss = f"final loss {fmt(s.final_loss)}" if s.final_window else "no loss recorded"
        cards.append(
            f'<div class="verdict {escape(v.state)}" data-run="{i}">'
            f'<span class="run-name c{i % 8}">{text(label, 80)}</span>'
            f"<b>{escape(v.text)}</b>"
            f'<span class="sub">{s.steps} steps · {escape(loss)}</span></div>'
        )
    return f'<div class="verdicts">{"".join(cards)}</div>'


def summary_table(labels: Sequence[str], summaries: Sequence[Summary]) -> str:
    """Headline numbers, one column per run."""

    def best(s: Summary) -> str:
        return f"{fmt(s.best_loss)} at step {s.best_step}" if s.best_step is not None else "–"

    def final(s: Summary) -> str:
        if not s.final_window:
            return "–"
        return f"{fmt(s.final_loss)} (mean of last {s.final_window} steps)"

    def span(s: Summary) -> str:
        return f"{s.steps} ({s.first_step}–{s.last_step})" if s.steps else "0"

    def rate(s: Summary) -> str:
        v = s.steps_per_second
        return "–" if v != v else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"

    rows: list[tuple[str, Any]] = [
        ("verdict", lambda s: s.verdict.text),
        ("final loss", final),
        ("best loss", best),
        ("steps", span),
        ("duration", lambda s: duration(s.wall_seconds)),
        ("steps/s", rate),
        ("median total norm", lambda s: fmt(s.median_norm)),
        ("clipped steps", lambda s: pct(s.clipped_share)),
        ("skipped steps", lambda s: str(s.skipped)),
        ("non-finite steps", lambda s: str(s.nonfinite)),
    ]
    head = "".join(
        f'<th><span class="run-name c{i % 8}">{text(label, 80)}</span></th>'
        for i, label in enumerate(labels)
    )
    body = "".join(
        f"<tr><th>{escape(name)}</th>" + "".join(f"<td>{escape(get(s))}</td>" for s in summaries)
        for name, get in rows
    )
    note = (
        '<p class="sub">Duration: from the store\'s creation (the first recorded step) to '
        "its last write.</p>"
    )
    return f'<table class="summary"><tr><th></th>{head}</tr>{body}</table>{note}'


def _range(f: Finding, last_step: int | None) -> str:
    a, b = f.steps
    if last_step is not None and b >= last_step:
        return f"steps {a}–{b}, ongoing" if b > a else f"step {a}, ongoing"
    return f"steps {a}–{b}" if b > a else f"step {a}"


def finding_html(f: Finding, run: int, runs: int, label: str, last_step: int | None) -> str:
    """One finding with its range, evidence and advice; clicking it highlights the range."""
    params = ", ".join(text(p, 200) for p in f.params[:10])
    if len(f.params) > 10:
        params += f" … (+{len(f.params) - 10})"
    evidence = "".join(
        f"<tr><th>{text(k, 80)}</th><td>"
        f"{text(fmt(float(v)) if isinstance(v, (int, float)) else v, 120)}</td></tr>"
        for k, v in list(f.evidence.items())[:20]
    )
    advice = "".join(f"<li>{text(a)}</li>" for a in f.advice[:10])
    sev = escape(f.severity.value)
    a, b = f.steps
    return (
        f'<div class="finding {sev}" tabindex="0" role="button" data-run="{run}" '
        f'data-start="{int(a)}" data-end="{int(b)}">'
        f"{_badge(label, run, runs)}"
        f'<span class="sev">{sev}</span> <b>{text(f.kind.value, 40)}</b> · '
        f'<span class="range">{escape(_range(f, last_step))}</span>'
        f"<div>{text(f.message)}</div>"
        + (f'<div class="params">{params}</div>' if params else "")
        + (f'<table class="evidence">{evidence}</table>' if evidence else "")
        + (f"<ul>{advice}</ul>" if advice else "")
        + "</div>"
    )


def top_findings_html(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    """The few findings to read first, across runs."""
    ranked = [
        (f, i)
        for i, run in enumerate(runs)
        for f in top_findings(run.findings, 3 if len(runs) == 1 else 2)
    ]
    if not ranked:
        return ""
    ranked.sort(key=lambda item: (-item[0].severity.rank, item[0].steps[0]))
    items = "".join(
        finding_html(f, i, len(runs), labels[i], runs[i].last_step).replace(
            'class="finding ', 'class="finding brief ', 1
        )
        for f, i in ranked[:4]
    )
    return (
        '<h3>Read first</h3><p class="sub">Click a finding to see its range on the charts.</p>'
        + items
    )


def findings_section(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    """Every run's findings, most severe first, bounded."""
    parts = []
    for i, run in enumerate(runs):
        head = _badge(labels[i], i, len(runs))
        if not run.findings:
            parts.append(
                f'<p class="empty">{head}No findings: the health rules saw nothing wrong.</p>'
            )
            continue
        ranked = sorted(run.findings, key=lambda f: (-f.severity.rank, f.steps[0]))
        shown = ranked[:MAX_FINDINGS]
        counts: dict[str, int] = {}
        for f in run.findings:
            counts[f.severity.value] = counts.get(f.severity.value, 0) + 1
        tally = ", ".join(f"{v} {escape(k)}" for k, v in sorted(counts.items()))
        source = (
            " (replayed: this run recorded no findings while training)"
            if run.findings_replayed
            else ""
        )
        more = f" Showing {len(shown)}." if len(shown) < len(run.findings) else ""
        parts.append(
            f'<p class="sub">{head}{len(run.findings)} findings ({tally}){source}.{more}</p>'
            + "".join(finding_html(f, i, len(runs), labels[i], run.last_step) for f in shown)
        )
    return "".join(parts)


def _detail(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, list):
        shown = ", ".join(str(v) for v in value[:5])
        return shown + (f" … (+{len(value) - 5})" if len(value) > 5 else "")
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_detail(v)}" for k, v in list(value.items())[:5])
    return str(value)


def event_details(event: Event) -> str:
    """An event's payload as readable ``key: value`` lines (empty values left out)."""
    data = event.data if isinstance(event.data, dict) else {"data": event.data}
    items = [(k, v) for k, v in data.items() if v not in (None, [], {}, "")][:MAX_DETAILS]
    return "".join(
        f'<div><span class="key">{text(k, 60)}</span> {text(_detail(v), 300)}</div>'
        for k, v in items
    )


def events_section(
    runs: Sequence[RunData], labels: Sequence[str], plotted: frozenset[str] = frozenset()
) -> str:
    """Events other than findings (skips, rewinds), the latest first, as a table.

    Kinds in ``plotted`` have a section of their own and are only counted here.
    """
    rows, total, hidden = [], 0, 0
    for i, run in enumerate(runs):
        events = [e for e in run.events if not EventKind.is_finding(e.kind)]
        hidden += sum(e.kind in plotted for e in events)
        events = [e for e in events if e.kind not in plotted]
        total += len(events)
        for e in events[-MAX_EVENTS:][::-1]:
            run_cell = f"<td>{_badge(labels[i], i, len(runs))}</td>" if len(runs) > 1 else ""
            rows.append(
                f"<tr>{run_cell}<td>{int(e.step)}</td><td>{text(e.kind, 80)}</td>"
                f"<td>{text(e.message)}</td><td>{event_details(e)}</td></tr>"
            )
    note = (
        f'<p class="sub">{hidden} per-step summary events are plotted above, not listed.</p>'
        if hidden
        else ""
    )
    if not rows:
        return note + '<p class="empty">No other events were recorded.</p>'
    run_head = "<th>run</th>" if len(runs) > 1 else ""
    return (
        note + f'<p class="sub">{total} events; the latest {len(rows)} shown.</p>'
        f'<table class="events"><tr>{run_head}<th>step</th><th>kind</th><th>what</th>'
        f"<th>details</th></tr>{''.join(rows)}</table>"
    )


def meta_section(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    """Each run's metadata: versions, sizes, configuration."""
    parts = []
    for i, run in enumerate(runs):
        m = run.meta
        keys = (
            "created",
            "resumed",
            "gradguard_version",
            "torch_version",
            "python_version",
            "schema_version",
        )
        rows = [(k, m.get(k)) for k in keys if k in m]
        rows += [
            ("parameter tensors", len(run.names)),
            ("layers (modules)", len(run.layers)),
            ("snapshots", int(run.snapshot_steps.size)),
            ("store", run.path),
        ]
        config = m.get("config") or {}
        items = (
            list(config.items())[:MAX_CONFIG] if isinstance(config, dict) else [("config", config)]
        )
        table = "".join(f"<tr><th>{text(k, 80)}</th><td>{text(v)}</td></tr>" for k, v in rows)
        conf = "".join(
            f"<tr><th>{text(k, 80)}</th><td><code>{text(v)}</code></td></tr>" for k, v in items
        )
        title = f"<h3>{text(labels[i], 80)}</h3>" if len(runs) > 1 else ""
        parts.append(
            f'<div class="meta">{title}<table>{table}</table><h3>Configuration</h3>'
            + (f"<table>{conf}</table>" if conf else '<p class="empty">none recorded</p>')
            + "</div>"
        )
    return f'<div class="metas">{"".join(parts)}</div>'
