"""The report's per-example gradient norm section, from PerSampleMonitor events."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.privacy import PerSampleMonitor, PerSampleNorms
from gradguard.privacy.monitor import EVENT_KIND
from gradguard.record.store import RunStore
from gradguard.report import render_report
from gradguard.report.per_sample import KIND, per_sample_payload, per_sample_series
from gradguard.report.sample import Grid
from gradguard.schema import Event
from tests.report.runs import EVIL, write_synthetic

torch.set_num_threads(1)

STEPS = 60
CLIP = 1.5


def record_dp_run(path, quantiles=(0.1, 0.25, 0.5, 0.75, 0.9), clip=CLIP):
    """A real Recorder + PerSampleMonitor over STEPS steps of lognormal per-example norms."""
    recorder = gg.Recorder(path, log_every=8)
    monitor = PerSampleMonitor(
        recorder, quantiles=quantiles, release_exact_statistics_not_private=True
    )
    recorder.start(["w"], [(1,)])
    rng = np.random.default_rng(3)
    kept = []
    try:
        for step in range(STEPS):
            values = rng.lognormal(mean=0.2 - step / STEPS, size=(32, 2))
            kept.append(np.sqrt((values**2).sum(1)))
            norms = PerSampleNorms(torch.tensor(values, dtype=torch.float32), ("a", "b"))
            monitor.observe(step, norms, clip_norm=clip)
            recorder.record(
                step,
                total_norm=1.0,
                clipped_norm=1.0,
                clip_coef=1.0,
                threshold=1.0,
                skipped=0,
                reason=0,
            )
    finally:
        recorder.close()
    return kept


def page_data(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="gg-data">(.*?)</script>', page, re.S)
    return json.loads(block.group(1))


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp") / "run"
    kept = record_dp_run(path)
    return path, kept


def test_the_report_kind_is_the_monitors():
    assert KIND == EVENT_KIND


def test_series_read_from_recorded_events_match_the_norms(dp_run):
    path, kept = dp_run
    with RunStore.open(path) as store:
        series = per_sample_series(store.events())
    assert series is not None and len(series) == STEPS
    assert series.steps.tolist() == list(range(STEPS))
    assert series.labels == ("0.1", "0.25", "0.5", "0.75", "0.9")
    want = np.array([np.quantile(k, 0.5) for k in kept])
    np.testing.assert_allclose(series.column("0.5"), want, rtol=1e-5)
    np.testing.assert_allclose(
        series.fraction_clipped, [(k > CLIP).mean() for k in kept], rtol=1e-6
    )
    assert (series.clip_norm == CLIP).all() and (series.examples == 32).all()


def test_dp_run_report_has_the_section_with_every_step_and_the_clip_line(dp_run):
    path, kept = dp_run
    page = render_report(path)
    assert 'id="per-sample"' in page and "Per-example gradient norms" in page
    assert '<div id="dp-panels">' in page
    dp = page_data(page)["runs"][0]["per_sample"]
    assert dp["outer"] == ["0.1", "0.9"] and len(dp["outer_low"]) == STEPS
    np.testing.assert_allclose(dp["median"], [np.quantile(k, 0.5) for k in kept], rtol=1e-4)
    np.testing.assert_allclose(dp["inner_high"], [np.quantile(k, 0.75) for k in kept], rtol=1e-4)
    assert dp["clip_norm"] == [CLIP] * STEPS
    assert f"{STEPS} per-step summary events are plotted above" in page
    assert "per-example grad norms over 32" not in page  # no event row for them


def test_without_a_clip_norm_there_is_no_clip_line_and_no_fraction(tmp_path):
    record_dp_run(tmp_path / "run", quantiles=(0.5,), clip=None)
    dp = page_data(render_report(tmp_path / "run"))["runs"][0]["per_sample"]
    assert "clip_norm" not in dp and "fraction_clipped" not in dp and "inner_low" not in dp
    assert len(dp["median"]) == STEPS


def test_a_run_without_per_sample_events_has_no_section(tmp_path):
    write_synthetic(tmp_path / "plain", 300, ["a.weight"], every=10, batch=300)
    page = render_report(tmp_path / "plain")
    assert 'id="per-sample"' not in page and "Per-example gradient norms" not in page
    assert page_data(page)["runs"][0]["per_sample"] is None


def test_strings_in_per_sample_events_are_escaped_and_bad_values_skipped(tmp_path):
    names = ["a.weight"]
    write_synthetic(tmp_path / "ev", 50, names, every=10, batch=50)
    store = RunStore(tmp_path / "ev")
    store.start(names)
    events = [
        Event(
            s,
            KIND,
            EVIL,
            {
                "n": EVIL,
                "clip_norm": EVIL,
                "fraction_clipped": None,
                "quantiles": {"0.5": 1.0 + s, EVIL: 3.0, "7": 2.0, "0.9": "x"},
                "exact": [EVIL, "n"],
            },
        )
        for s in range(10)
    ]
    store.write_events(events)
    store.close()
    page = render_report(tmp_path / "ev")
    assert EVIL not in page
    head = page.split('id="events"')[0]
    # the hostile name is shown only as text: as a field marked exact, never as a value
    assert head.count(html.escape(EVIL)) == 1 and f"{html.escape(EVIL)}, n — computed" in head
    series = per_sample_series(events)
    assert series.labels == ("0.5", "0.9")  # only quantile labels in [0, 1]
    assert np.isnan(series.column("0.9")).all() and np.isnan(series.clip_norm).all()
    dp = page_data(page)["runs"][0]["per_sample"]
    assert dp["median"][:10] == [1.0 + s for s in range(10)]


def test_fields_marked_exact_are_labelled_not_private(tmp_path):
    events = [
        Event(
            s,
            KIND,
            "m",
            {
                "n": 32,
                "clip_norm": 1.0,
                "fraction_clipped": 0.25,
                "quantiles": {"0.5": 1.0},
                "exact": ["n", "fraction_clipped"],
            },
        )
        for s in range(5)
    ]
    series = per_sample_series(events)
    assert series.exact == {"n", "fraction_clipped"}
    names = ["a.weight"]
    write_synthetic(tmp_path / "run", 5, names, every=1, batch=5)
    store = RunStore(tmp_path / "run")
    store.start(names)
    store.write_events(events)
    store.close()
    page = render_report(tmp_path / "run")
    section = page.split('id="per-sample"')[1].split("</section>")[0]
    cards = re.findall(r'<div class="card">(.*?)<b>', section)
    marked = {re.sub(r"<.*", "", c) for c in cards if "not private" in c}
    assert marked == {"examples per step", "mean fraction clipped"}
    assert "not covered by the privacy guarantee" in section
    assert page_data(page)["runs"][0]["per_sample"]["exact"] == ["fraction_clipped", "n"]
    # without the list, nothing is labelled
    plain = per_sample_series([Event(0, KIND, "m", {"quantiles": {"0.5": 1.0}})])
    assert plain.exact == frozenset()


def test_100k_per_sample_events_keep_their_spike(tmp_path):
    n = 100_000
    steps = np.arange(n)
    med = np.exp(np.random.default_rng(4).normal(0.0, 0.3, n))
    med[n // 3] = 1e5
    events = [
        Event(
            int(s),
            KIND,
            "m",
            {"n": 256, "clip_norm": 1.0, "quantiles": {"0.5": med[s], "0.9": med[s] * 3}},
        )
        for s in steps
    ]
    series = per_sample_series(events)
    grid = Grid.over([steps])
    dp = per_sample_payload(series, grid)
    assert len(dp["outer_high"]) == len(grid) == 2000
    assert max(v for v in dp["outer_high"] if v is not None) == pytest.approx(3e5)
    assert dp["outer_high"][grid.locate([n // 3])[0]] == pytest.approx(3e5)


def test_observed_steps_beyond_the_recorded_steps_widen_the_axis(tmp_path):
    names = ["a.weight"]
    write_synthetic(tmp_path / "run", 5, names, every=1, batch=5)
    store = RunStore(tmp_path / "run", resume="latest")  # add to the same run
    store.start(names)
    store.write_events([Event(s, KIND, "m", {"quantiles": {"0.5": float(s)}}) for s in range(10)])
    store.close()
    d = page_data(render_report(tmp_path / "run"))
    assert d["x"] == list(range(10))
    assert d["runs"][0]["per_sample"]["median"] == [float(s) for s in range(10)]
    assert d["runs"][0]["series"]["count"] == [1] * 5 + [0] * 5


def test_a_private_by_default_run_shows_the_released_clip_numbers_labelled(tmp_path):
    """The default (private) monitor records only DP-released numbers: the section still
    shows the clip norm and the share clipped, labelled as noised / expected."""
    path = tmp_path / "run"
    recorder = gg.Recorder(path, log_every=4)
    monitor = PerSampleMonitor(recorder)
    recorder.start(["w"], [(1,)])
    try:
        for step in range(8):
            norms = PerSampleNorms(torch.rand(16, 1) + 1.0, ("w",))
            monitor.observe(
                step, norms, clip_norm=1.5, noisy_unclipped_fraction=0.75, expected_size=16.0
            )
            recorder.record(
                step,
                total_norm=1.0,
                clipped_norm=1.0,
                clip_coef=1.0,
                threshold=1.0,
                skipped=0,
                reason=0,
            )
    finally:
        recorder.close()
    with RunStore.open(path) as store:
        series = per_sample_series(store.events())
    assert series.exact == frozenset()
    assert series.released == {"fraction_clipped", "n"}
    assert np.allclose(series.fraction_clipped, 0.25)
    assert np.allclose(series.examples, 16.0)
    assert np.allclose(series.clip_norm, 1.5)
    section = render_report(path).split('id="per-sample"')[1].split("</section>")[0]
    cards = dict(re.findall(r'<div class="card">(.*?)<b>(.*?)</b>', section))
    labelled = {re.sub(r"<.*", "", k): (k, v) for k, v in cards.items()}
    assert labelled["latest clip norm"][1] == "1.5"
    assert labelled["mean fraction clipped"][1] == "25.0%"
    assert ">noised<" in labelled["mean fraction clipped"][0]
    assert ">expected<" in labelled["examples per step"][0]
    assert "not private" not in section
