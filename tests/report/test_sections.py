"""The page's text sections: readable events, finding ranges, side-by-side summaries."""

from __future__ import annotations

import html
import re

import numpy as np

from gradguard.health import Finding, Kind, Severity
from gradguard.report.sections import event_details, events_section, finding_html, verdicts
from gradguard.report.verdict import Summary, Verdict
from gradguard.schema import Event, SkipReason, skip_event
from tests.report.runs import EVIL
from tests.report.test_verdict import make_run


def test_a_skip_event_reads_as_fields_not_json():
    event = skip_event(160, SkipReason.NONFINITE, ["out.bias", "inp.weight"], "out.bias")
    details = event_details(event)
    assert '<span class="key">origin</span> out.bias' in details
    assert '<span class="key">nonfinite</span> out.bias, inp.weight' in details
    assert "ranks" not in details  # empty values are left out
    shown = re.sub(r"<[^>]+>", " ", details)
    assert "{" not in shown and '"' not in shown and "[" not in shown


def test_long_lists_are_shortened_and_strings_escaped():
    event = Event(3, "custom", EVIL, {"names": [f"p{i}" for i in range(40)], EVIL: EVIL})
    details = event_details(event)
    assert "p0, p1, p2, p3, p4 … (+35)" in details
    assert EVIL not in details and html.escape(EVIL) in details


def test_the_events_table_lists_each_run_and_counts_plotted_kinds():
    a, b = make_run(), make_run()
    a.events = [skip_event(5, SkipReason.POLICY), Event(6, "per_sample", "x", {})]
    b.events = [Event(9, "rewind", "restored step 3", {"to_step": 3})]
    page = events_section([a, b], ["first", "second"], plotted=frozenset({"per_sample"}))
    assert "1 per-step summary events are plotted above" in page
    assert page.count("<tr>") == 3  # header + two events
    assert "<th>run</th>" in page and "first</span>" in page and "second</span>" in page
    assert "restored step 3" in page and '<span class="key">to_step</span> 3' in page


def test_a_finding_shows_its_range_and_whether_it_is_still_open():
    f = Finding(Kind.EXPLODING, Severity.CRITICAL, (40, 90), (EVIL,), {"max": 1e9}, (), "boom")
    closed = finding_html(f, 0, 1, "run", last_step=200)
    assert 'data-start="40" data-end="90"' in closed and "steps 40–90<" in closed
    assert "ongoing" not in closed
    assert "steps 40–90, ongoing" in finding_html(f, 0, 1, "run", last_step=90)
    assert EVIL not in closed and html.escape(EVIL) in closed
    assert "1.00e+09" in closed


def test_verdict_cards_name_each_run_and_its_fate():
    def summary(state, text):
        v = Verdict(state, text)
        return Summary(10, 0, 9, np.nan, 5, np.nan, None, 1.0, 10.0, 0.0, 0, 0, 1.0, v)

    page = verdicts([EVIL, "b"], [summary("lost", "lost at step 4"), summary("healthy", "healthy")])
    assert '<div class="verdict lost" data-run="0">' in page and "<b>lost at step 4</b>" in page
    assert '<div class="verdict healthy" data-run="1">' in page
    assert EVIL not in page and html.escape(EVIL) in page
