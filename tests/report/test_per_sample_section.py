"""The report's per-example gradient norm section, from PerSampleMonitor events."""

from __future__ import annotations

import html
import re
import time
from itertools import pairwise

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.privacy import PerSampleMonitor, PerSampleNorms
from gradguard.privacy.monitor import EVENT_KIND
from gradguard.record.store import RunStore
from gradguard.report import MAX_REPORT_BYTES, build_report, render_report
from gradguard.report.per_sample import KIND, per_sample_series
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


def polyline_points(page: str, cls: str) -> list[list[tuple[float, float]]]:
    lines = re.findall(rf'<polyline class="{cls}" points="([^"]+)"', page)
    return [[tuple(map(float, p.split(","))) for p in line.split()] for line in lines]


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
    path, _ = dp_run
    page = render_report(path)
    assert 'id="per-sample"' in page and "Per-example gradient norms" in page
    assert "<script" not in page
    assert f"{STEPS} observed steps in {STEPS} buckets" in page
    # one band over all steps: the polygon holds an upper and a lower point per step
    for cls in ("dp-band", "dpiqr-band"):
        band = re.findall(rf'<polygon class="{cls}" points="([^"]+)"', page)
        assert len(band) == 1 and len(band[0].split()) == 2 * STEPS
    # the median is one unbroken line through every observed step, left to right
    (median,) = polyline_points(page, "dp-median")
    assert len(median) == STEPS
    assert all(a[0] < b[0] for a, b in pairwise(median))
    # the clip norm is a flat line across the plot, inside the plot area
    (clip,) = polyline_points(page, "dp-clip")
    assert len(clip) == STEPS and len({y for _, y in clip}) == 1
    assert 16 <= clip[0][1] <= 260 - 34
    # the fraction clipped chart, and per_sample events plotted, not listed
    assert 'aria-label="fraction of examples clipped over steps"' in page
    assert f"{STEPS} per-step summary events are plotted above" in page
    assert "per-example grad norms over 32" not in page  # no event row for them


def test_without_a_clip_norm_there_is_no_clip_line_and_no_fraction(tmp_path):
    record_dp_run(tmp_path / "run", quantiles=(0.5,), clip=None)
    page = render_report(tmp_path / "run")
    assert 'id="per-sample"' in page
    assert 'class="dp-clip"' not in page and 'class="dpiqr-band"' not in page
    assert "No clip norm was recorded" in page
    assert len(polyline_points(page, "dp-median")[0]) == STEPS


def test_a_run_without_per_sample_events_has_no_section(tmp_path):
    write_synthetic(tmp_path / "plain", 300, ["a.weight"], every=10, batch=300)
    page = render_report(tmp_path / "plain")
    assert 'id="total-norm"' in page
    assert 'id="per-sample"' not in page and "Per-example gradient norms" not in page
    assert 'class="dp-' not in page


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
            },
        )
        for s in range(10)
    ]
    store.write_events(events)
    store.close()
    page = render_report(tmp_path / "ev")
    assert EVIL not in page and html.escape(EVIL) not in page.split('id="events"')[0]
    series = per_sample_series(events)
    assert series.labels == ("0.5", "0.9")  # only quantile labels in [0, 1]
    assert np.isnan(series.column("0.9")).all() and np.isnan(series.clip_norm).all()
    assert len(polyline_points(page, "dp-median")[0]) == 10


def test_100k_per_sample_events_stay_under_the_size_bound(tmp_path):
    n = 100_000
    names = [f"block{i}.weight" for i in range(10)]
    write_synthetic(tmp_path / "big", n, names, every=100)
    rng = np.random.default_rng(4)
    med = np.exp(rng.normal(0.0, 0.3, n))
    med[n // 3] = 1e5  # a one-step spike must survive downsampling
    t0 = time.perf_counter()
    store = RunStore(tmp_path / "big")
    store.start(names)
    for a in range(0, n, 25_000):
        store.write_events(
            [
                Event(
                    s,
                    KIND,
                    f"per-example grad norms over 256: median {med[s]:.3g}",
                    {
                        "n": 256,
                        "clip_norm": 1.0 + 0.5 * np.sin(s / 5000),
                        "fraction_clipped": float(rng.uniform()),
                        "quantiles": {
                            "0.1": med[s] / 3,
                            "0.25": med[s] / 2,
                            "0.5": med[s],
                            "0.75": med[s] * 2,
                            "0.9": med[s] * 3,
                        },
                        "mean": med[s],
                        "max": med[s] * 5,
                    },
                )
                for s in range(a, min(a + 25_000, n))
            ]
        )
    store.close()
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = build_report(tmp_path / "big", tmp_path / "big.html")
    built = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"\n100k events: write {written:.1f} s, report {built:.1f} s, {size / 1e3:.0f} kB")
    assert size < MAX_REPORT_BYTES
    page = path.read_text()
    assert f"{n} observed steps in 2000 buckets" in page
    assert f"{n} per-step summary events are plotted above" in page
    assert len(polyline_points(page, "dp-median")[0]) == 2000
    assert ">1e6</text>" in page  # the spike's q0.9 (3e5) sets the top decade
    # and its bucket's stroke is the highest one, at the spike's step (x pixels 70..1180)
    strokes = re.findall(
        r"M([\d.]+) [\d.]+V([\d.]+)", re.search(r'class="dp-range" d="([^"]+)"', page).group(1)
    )
    x, top = min(((float(x), float(y)) for x, y in strokes), key=lambda p: p[1])
    assert x == pytest.approx(70 + (n // 3) / (n - 1) * 1110, abs=1.0)
    assert top < 100  # far above the rest of the band
