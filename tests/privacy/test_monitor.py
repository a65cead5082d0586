"""PerSampleMonitor: private by default (only what the DP mechanism released reaches the
store and sinks), exact per-example statistics only when released by name, and then
listed in ``data["exact"]``."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.privacy import (
    AdaptiveQuantileClip,
    PerSampleMonitor,
    PerSampleNorms,
    from_functional,
)
from tests.conftest import forbid_host_sync
from tests.privacy.runs import batch, dp_optimizer, make_private, record_step, small_model

torch.set_num_threads(1)

PRIVATE_KEYS = {"exact", "noised", "clip_norm", "expected_n", "noised_fraction_clipped"}


def dp_run(store, monitor_args):
    """A Poisson-sampled Opacus run (8 steps, 16 examples expected per step) with the
    adaptive clip and a monitor on a real Recorder."""
    opacus = pytest.importorskip("opacus")
    _, model, optimizer, loader = make_private(opacus, 1.0)
    recorder = gg.Recorder(store, log_every=4)
    recorder.start(
        [n for n, _ in model.named_parameters()], [tuple(p.shape) for p in model.parameters()]
    )
    monitor = PerSampleMonitor(recorder, **monitor_args)
    clip = AdaptiveQuantileClip(initial_clip=None, lr=0.3, seed=0)
    clip.attach(optimizer, monitor=monitor, model=model)
    sizes, bounds = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, (x, y) in enumerate(loader):
            sizes.append(len(x))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            bounds.append(float(optimizer.max_grad_norm))
            record_step(recorder, step)
    recorder.close()
    return gg.RunStore.open(store).events(kind="per_sample"), sizes, bounds, clip


def test_the_default_output_of_a_dp_run_holds_no_exact_per_example_statistic(tmp_path):
    events, sizes, bounds, _ = dp_run(tmp_path / "run", {})
    assert len(events) == len(sizes) == 8 and len(set(sizes)) > 1  # Poisson: sizes vary
    clip_norm = 1.0
    for event, bound in zip(events, bounds):
        data = event.data
        assert set(data) == PRIVATE_KEYS
        assert data["exact"] == [] and data["noised"] == ["noised_fraction_clipped"]
        assert data["expected_n"] == 16 and data["clip_norm"] == pytest.approx(clip_norm)
        # the message (what TensorBoard, W&B and MLflow receive) holds the clip norm and the
        # noised estimate only, never the realised batch size
        assert re.fullmatch(
            r"per-example grad norms, clip norm [0-9.e+-]+: about -?[0-9]+% clipped "
            r"\(noised count\)",
            event.message,
        ), event.message
        # the released fraction is the very draw that moved the clip: no extra privacy cost
        unclipped = 1.0 - data["noised_fraction_clipped"]
        clip_norm = clip_norm * math.exp(-0.3 * (unclipped - 0.5))
        assert bound == pytest.approx(clip_norm, rel=1e-5)
        clip_norm = bound


def test_released_exact_statistics_sit_beside_the_noised_ones_and_are_listed(tmp_path):
    args = {"quantiles": (0.5,), "release_exact_statistics_not_private": True}
    events, sizes, _, _ = dp_run(tmp_path / "run", args)
    for event, n in zip(events, sizes):
        data = event.data
        assert data["n"] == n  # the realised batch size: private under Poisson sampling
        assert data["exact"] == ["n", "fraction_clipped", "quantiles", "mean", "max"]
        assert data["noised"] == ["noised_fraction_clipped"]
        assert set(data) == PRIVATE_KEYS | set(data["exact"])
        assert "exact (not private)" in event.message and "(noised count)" in event.message


def test_a_plain_recorder_that_records_no_steps_loses_no_event(tmp_path):
    # the README's recipe for a published DP run: no Guard, a started Recorder, attach
    opacus = pytest.importorskip("opacus")
    model, optimizer = dp_optimizer(opacus, nn.Linear(4, 2), z=1.0, clip_norm=1.0, expected=8)
    recorder = gg.Recorder(tmp_path / "run", log_every=4)
    recorder.start([n for n, _ in model.named_parameters()])
    private = PerSampleMonitor(recorder)
    AdaptiveQuantileClip(initial_clip=None, count_noise_std=2.0, seed=0).attach(
        optimizer, monitor=private, model=model
    )
    for _ in range(7):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        optimizer.step()
    recorder.close()
    events = gg.RunStore.open(tmp_path / "run").events(kind="per_sample")
    assert [e.step for e in events] == list(range(7))
    assert all(set(e.data) == PRIVATE_KEYS for e in events)


def test_buffered_exact_statistics_drain_without_step_records(tmp_path):
    recorder = gg.Recorder(tmp_path / "run", log_every=2)
    recorder.start(["w"])
    monitor = PerSampleMonitor(recorder, release_exact_statistics_not_private=True)
    for step in range(6):
        monitor.observe(step, PerSampleNorms(torch.rand(5, 1)), 0.5)
    assert len(monitor._rows) == 2  # 4 drained to the recorder at 2 * log_every
    monitor.flush()
    recorder.close()
    events = gg.RunStore.open(tmp_path / "run").events(kind="per_sample")
    assert [e.step for e in events] == list(range(6))


def test_without_a_dp_release_a_private_monitor_records_nothing_and_says_why():
    monitor = PerSampleMonitor()
    norms = PerSampleNorms(torch.rand(8, 2))
    with pytest.warns(RuntimeWarning, match="release_exact_statistics_not_private=True"):
        monitor.observe(0, norms, clip_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        monitor.observe(1, norms, clip_norm=1.0)
    assert monitor.flush() == [] and monitor.history == []


def test_a_released_fraction_is_recorded_without_a_host_sync():
    monitor = PerSampleMonitor(every=2)
    norms = PerSampleNorms(torch.rand(8, 2))
    for step in range(4):
        with forbid_host_sync():
            monitor.observe(
                step,
                norms,
                2.0,
                noisy_unclipped_fraction=torch.tensor(0.25 * step),
                expected_size=8,
            )
    events = monitor.flush()
    assert [e.step for e in events] == [0, 2]
    assert [e.data["noised_fraction_clipped"] for e in events] == [1.0, 0.5]
    assert all(set(e.data) == PRIVATE_KEYS for e in events)


class TestBadArguments:
    def test_exact_options_need_the_flag_by_name(self):
        for kwargs in ({"quantiles": (0.5,)}, {"by_layer": True}):
            with pytest.raises(ValueError, match="release_exact_statistics_not_private=True"):
                PerSampleMonitor(**kwargs)

    def test_types_and_values(self):
        for kwargs, kind, name in [
            ({"release_exact_statistics_not_private": 1}, TypeError, "release_exact"),
            ({"by_layer": "yes"}, TypeError, "by_layer"),
            ({"every": 0}, ValueError, "every"),
            (
                {"quantiles": 0.5, "release_exact_statistics_not_private": True},
                TypeError,
                "quantiles",
            ),
            (
                {"quantiles": (1.5,), "release_exact_statistics_not_private": True},
                ValueError,
                "quantiles",
            ),
            (
                {"quantiles": (), "release_exact_statistics_not_private": True},
                ValueError,
                "quantiles",
            ),
        ]:
            with pytest.raises(kind, match=name):
                PerSampleMonitor(**kwargs)
        with pytest.raises(TypeError, match="recorder"):
            PerSampleMonitor("runs/x")

    def test_observe(self):
        monitor = PerSampleMonitor()
        norms = PerSampleNorms(torch.rand(4, 1))
        release = {"noisy_unclipped_fraction": 0.5, "expected_size": 4}
        for args, kwargs, kind, name in [
            ((-1, norms), release, ValueError, "step"),
            ((0, torch.rand(4)), release, TypeError, "norms"),
            ((0, norms, -1.0), release, ValueError, "clip_norm"),
            ((0, norms, math.nan), release, ValueError, "clip_norm"),
            ((0, norms), {"noisy_unclipped_fraction": 0.5}, ValueError, "expected_size"),
            (
                (0, norms),
                {"noisy_unclipped_fraction": 0.5, "expected_size": 0},
                ValueError,
                "expected_size",
            ),
        ]:
            with pytest.raises(kind, match=name):
                monitor.observe(*args, **kwargs)
        assert monitor.flush() == []


def test_released_exact_statistics_reach_the_store_at_the_recorders_flush(
    tmp_path,
):
    recorder = gg.Recorder(tmp_path / "run", log_every=4)
    monitor = PerSampleMonitor(
        recorder, quantiles=(0.5, 0.9), by_layer=True, release_exact_statistics_not_private=True
    )
    recorder.start(["w"], [(1,)])
    rng = np.random.default_rng(2)
    kept = []
    for step in range(8):
        values = rng.lognormal(size=(32, 2))
        kept.append(values)
        norms = PerSampleNorms(torch.tensor(values, dtype=torch.float32), ("a.weight", "b.bias"))
        with forbid_host_sync():
            monitor.observe(step, norms, clip_norm=1.5)
        record_step(recorder, step)
        # the summaries reach the store with the recorder's flushes, every 4 steps
        recorder.drain()  # written on the recorder's writer thread
        stored = gg.RunStore.open(tmp_path / "run").events(kind="per_sample")
        assert len(stored) == 4 * ((step + 1) // 4)
    recorder.close()
    events = gg.RunStore.open(tmp_path / "run").events(kind="per_sample")
    assert [e.step for e in events] == list(range(8))
    for event, values in zip(events, kept):
        total = np.sqrt((values**2).sum(1))
        data = event.data
        assert data["n"] == 32 and data["clip_norm"] == 1.5
        assert data["fraction_clipped"] == pytest.approx((total > 1.5).mean())
        assert data["quantiles"]["0.5"] == pytest.approx(np.quantile(total, 0.5), rel=1e-5)
        assert data["quantiles"]["0.9"] == pytest.approx(np.quantile(total, 0.9), rel=1e-5)
        assert data["max"] == pytest.approx(total.max(), rel=1e-6)
        layer_medians = np.median(values, axis=0)
        assert data["layers"]["a.weight"]["0.5"] == pytest.approx(layer_medians[0], rel=1e-5)
        assert data["layers"]["b.bias"]["0.5"] == pytest.approx(layer_medians[1], rel=1e-5)
        assert "clip norm 1.5: exact (not private) over 32" in event.message
        assert data["exact"] == ["n", "fraction_clipped", "quantiles", "mean", "max", "layers"]
        assert data["noised"] == []


def test_monitor_without_recorder_keeps_history_and_honours_every():
    monitor = PerSampleMonitor(quantiles=(0.5,), every=2, release_exact_statistics_not_private=True)
    for step in range(5):
        monitor.observe(step, PerSampleNorms(torch.full((4, 1), float(step))))
    events = monitor.flush()
    assert [e.step for e in events] == [0, 2, 4]
    assert [e.data["quantiles"]["0.5"] for e in events] == [0.0, 2.0, 4.0]
    assert events[0].data["fraction_clipped"] is None  # no clip norm given
    assert monitor.history == events


def test_per_sample_events_ride_a_guards_recorder_in_a_training_loop(tmp_path):
    # no Opacus: torch.func norms each step, recorded next to the guard's own steps
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, gg.ClipNorm(1.0), store=tmp_path / "run", log_every=5, health=False)
    monitor = PerSampleMonitor(
        guard.recorder, quantiles=(0.5,), release_exact_statistics_not_private=True
    )
    loss_fn = nn.CrossEntropyLoss()
    medians = []
    for step in range(10):
        x, y = batch(16)
        norms = from_functional(model, loss_fn, x, y)
        medians.append(np.median(norms.total.numpy()))
        monitor.observe(step, norms, clip_norm=1.0)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        guard.step(optimizer)
    guard.close()
    store = gg.RunStore.open(tmp_path / "run")
    assert len(store.steps()["step"]) == 10
    events = store.events(kind="per_sample")
    assert [e.step for e in events] == list(range(10))
    got = [e.data["quantiles"]["0.5"] for e in events]
    np.testing.assert_allclose(got, medians, rtol=1e-5)
