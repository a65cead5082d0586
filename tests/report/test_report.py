"""The HTML report: content, escaping, bounded size, downsampling that keeps spikes."""

from __future__ import annotations

import html
import re
import time

import numpy as np
import pytest

from gradguard.record.store import RunStore
from gradguard.report import MAX_REPORT_BYTES, build_report, load_run, render_report
from gradguard.report.data import group_layers
from gradguard.report.heatmap import MAX_COLUMNS, bounded_layers
from gradguard.report.png import encode_png
from gradguard.report.sample import envelope, rolling_mean
from tests.report.runs import EVIL, NAN_STEP, recorded_run_dir, write_synthetic


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return recorded_run_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def page(run_dir):
    return render_report(run_dir)


def test_envelope_keeps_every_spike_and_the_minimum():
    rng = np.random.default_rng(1)
    values = rng.uniform(0.5, 1.5, 100_003)
    spikes = rng.choice(values.size, 17, replace=False)
    values[spikes] = 1e3 + np.arange(17)
    values[5] = 1e-9
    env = envelope(np.arange(values.size), values, 2000)
    assert len(env) <= 2000
    assert env.start[0] == 0 and env.end[-1] == values.size - 1
    # every spike value is the max of the bucket that holds its step
    for i in spikes:
        bucket = np.searchsorted(env.start, i, side="right") - 1
        assert env.high[bucket] >= values[i]
    assert env.low.min() == pytest.approx(1e-9)
    assert np.nanmax(env.high) == values.max()


def test_envelope_flags_nonfinite_without_letting_them_into_the_band():
    values = np.array([1.0, 2.0, np.nan, 3.0, np.inf, 4.0])
    env = envelope(np.arange(6), values, 3)
    assert env.nonfinite.tolist() == [False, True, True]
    assert env.high.tolist() == [2.0, 3.0, 4.0]


def test_rolling_mean_matches_a_direct_window():
    x = np.random.default_rng(2).integers(0, 2, 500).astype(float)
    got = rolling_mean(x, 50)
    want = [x[max(0, i - 49) : i + 1].mean() for i in range(500)]
    assert np.allclose(got, want)


def test_group_layers_combines_tensors_per_module_in_model_order():
    names = ("b.weight", "b.bias", "a.weight", "c")
    norms = np.array([[3.0, 4.0, 1.0, 2.0]])
    layers, grouped = group_layers(names, norms)
    assert layers == ("b", "a", "c")
    assert grouped.tolist() == [[5.0, 1.0, 2.0]]


def test_bounded_layers_merges_by_max_and_keeps_order():
    labels = [f"l{i}" for i in range(1000)]
    norms = np.arange(1000, dtype=float)[None, :]
    out_labels, out = bounded_layers(labels, norms, rows=300)
    assert len(out_labels) == out.shape[1] <= 300
    assert out_labels[0].startswith("l0 … ") and "layers)" in out_labels[0]
    assert np.all(np.diff(out[0]) > 0) and out[0, -1] == 999


def test_png_encoder_writes_a_valid_header():
    data = encode_png(np.zeros((3, 5, 3), dtype=np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 5 and int.from_bytes(data[20:24], "big") == 3


def test_report_has_every_section_and_no_external_resource(page):
    for section in ("total-norm", "clip-rate", "heatmap", "latest-layers", "findings", "meta"):
        assert f'id="{section}"' in page
    assert "<script" not in page  # the page runs nothing
    assert not re.search(r"""(src|href)=["']https?:""", page)
    assert "@import" not in page and "url(http" not in page
    assert 'class="threshold"' in page  # the clip threshold line
    assert 'class="clip-mark"' in page and 'class="skip-mark"' in page
    assert "data:image/png;base64," in page  # the heatmap


def test_report_shows_findings_from_the_rules_and_metadata(run_dir, page):
    run = load_run(run_dir)
    kinds = {f.kind.value for f in run.findings}
    assert "nonfinite" in kinds and "dead_layer" in kinds
    nonfinite = next(f for f in run.findings if f.kind.value == "nonfinite")
    assert nonfinite.steps[0] == NAN_STEP
    for f in run.findings:
        assert html.escape(f.message) in page
        for advice in f.advice[:1]:
            assert html.escape(advice) in page
    with RunStore.open(run_dir) as store:
        meta = store.meta()
    assert html.escape(meta["torch_version"]) in page
    assert f"<td>{len(meta['names'])}</td>" in page


def test_user_strings_are_escaped(page):
    assert EVIL not in page
    assert html.escape(EVIL) in page
    assert f"<th>note</th><td><code>{html.escape(EVIL)}</code></td>" in page  # config value


def test_build_report_writes_next_to_the_store(run_dir):
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    assert path.stat().st_size < MAX_REPORT_BYTES


def test_million_step_run_stays_under_the_size_bound(tmp_path):
    n = 1_000_000
    names = [f"block{i}.{w}" for i in range(30) for w in ("weight", "bias")]
    t0 = time.perf_counter()
    truth = write_synthetic(tmp_path / "big", n, names)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = build_report(tmp_path / "big", tmp_path / "big.html")
    built = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"\n1M steps: write {written:.1f} s, report {built:.1f} s, {size / 1e3:.0f} kB")
    assert size < MAX_REPORT_BYTES
    assert built < 60
    page = path.read_text()
    assert f"{n} steps in 2000 buckets" in page
    # the spikes survive downsampling: the chart's top decade reaches 1e4
    env = envelope(np.arange(n), truth["total_norm"])
    for i in truth["spikes"]:
        bucket = np.searchsorted(env.start, i, side="right") - 1
        assert env.high[bucket] == pytest.approx(1e4)
    assert ">1e4</text>" in page
    # and each spike is drawn as a min-max stroke reaching the top of the plot (y = 16)
    strokes = re.search(r'class="norm-range" d="([^"]+)"', page).group(1)
    assert strokes.count("V16.0") >= len(truth["spikes"])
    assert f"{n // 50} snapshots in {MAX_COLUMNS} columns" in page


def test_many_layers_are_bounded(tmp_path):
    names = [f"m{i}.weight" for i in range(2000)]
    write_synthetic(tmp_path / "wide", 600, names, every=3, batch=600)
    page = render_report(tmp_path / "wide")
    assert len(page.encode()) < MAX_REPORT_BYTES
    assert re.search(r"m0 … m\d+ \(\d+ layers\)", page)


def test_findings_stored_as_events_are_shown_once(tmp_path):
    from gradguard.health import Finding, Kind, Severity

    names = ["a.weight", "b.weight"]
    write_synthetic(tmp_path / "ev", 300, names, every=10, batch=300)
    stored = Finding(
        Kind.LOSS_STALL,
        Severity.WARNING,
        (40, 90),
        ("b.weight",),
        {"improvement": 0.001},
        ("Lower the <lr>.",),
        "loss flat & stuck",
    )
    store = RunStore(tmp_path / "ev")
    store.start(names)
    store.write_events([stored.to_event(), stored.to_event()])
    store.close()
    run = load_run(tmp_path / "ev")
    assert sum(f.message == stored.message for f in run.findings) == 1
    page = render_report(tmp_path / "ev")
    assert "loss flat &amp; stuck" in page and "Lower the &lt;lr&gt;." in page
