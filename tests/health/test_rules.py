"""Each health rule on synthetic series: fires when it should, once, silent otherwise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.health import RULES, HealthConfig, HealthMonitor, Kind, Severity, diagnose
from gradguard.health.signals import ClipActivity, NormBaseline
from gradguard.schema import HostBatch, SkipReason

INF = math.inf


def batch(
    norms, *, start=0, threshold=INF, loss=None, skipped=None, reason=None, names=(), snapshots=()
):
    n = len(norms)
    steps = list(range(start, start + n))
    columns = {
        "total_norm": [float(v) for v in norms],
        "threshold": [float(threshold)] * n,
        "clipped": [float(v > threshold) for v in norms],
        "loss": list(loss) if loss is not None else [math.nan] * n,
        "skipped": list(skipped) if skipped is not None else [0.0] * n,
        "reason": list(reason) if reason is not None else [0.0] * n,
    }
    return HostBatch(
        steps, columns, tuple(names), [s for s, _ in snapshots], [list(r) for _, r in snapshots]
    )


def kinds(findings):
    return [f.kind for f in findings]


def noisy(level, n, seed=0, spread=0.1):
    rng = np.random.default_rng(seed)
    return (level * np.exp(rng.normal(0.0, spread, n))).tolist()


def run(*batches, config=None, order=None):
    monitor = HealthMonitor(config, order=order)
    out = []
    for b in batches:
        out.extend(monitor.update(b))
    return out


def test_every_kind_has_one_rule_spec():
    assert sorted(r.kind for r in RULES) == sorted(k.value for k in Kind)
    assert all(r.advice and r.condition for r in RULES)


def test_healthy_series_is_silent():
    assert run(batch(noisy(0.5, 400), threshold=1.0, loss=np.linspace(2, 1, 400))) == []


# ----------------------------------------------------------------------------- non-finite


class FakeOrder:
    def __init__(self, order):
        self.order = order

    def first_nonfinite(self, names):
        return next((n for n in self.order if n in set(names)), None)


def test_nonfinite_names_origin_in_backward_order():
    names = ("l0.weight", "l1.weight", "l2.weight", "l3.weight")
    norms = [*noisy(0.5, 20), math.nan]
    snap = (20, [math.nan, math.nan, math.inf, 0.3])
    order = FakeOrder(["l3.weight", "l2.weight", "l1.weight", "l0.weight"])
    found = run(batch(norms, names=names, snapshots=[snap]), order=order)
    assert kinds(found) == [Kind.NONFINITE]
    finding = found[0]
    assert finding.severity is Severity.CRITICAL
    assert finding.steps == (20, 20)
    assert finding.params[0] == "l2.weight"
    assert finding.evidence["nonfinite_tensors"] == 3
    assert finding.evidence["origin_exact"] == 1.0
    assert "origin l2.weight" in finding.message


def test_nonfinite_without_order_or_snapshot_still_reported():
    found = run(batch([0.5] * 10 + [math.inf]))
    assert kinds(found) == [Kind.NONFINITE]
    assert found[0].params == ()
    assert any("per-tensor" in a for a in found[0].advice)


def test_nonfinite_skip_flag_counts_but_amp_overflow_does_not():
    code = float(SkipReason.NONFINITE)
    found = run(batch([0.5] * 5, skipped=[0, 0, 1, 0, 0], reason=[0, 0, code, 0, 0]))
    assert kinds(found) == [Kind.NONFINITE]
    amp = float(SkipReason.AMP_OVERFLOW)
    quiet = run(batch([0.5, 0.5, INF, 0.5], skipped=[0, 0, 1, 0], reason=[0, 0, amp, 0]))
    assert quiet == []


# ------------------------------------------------------------------------------ magnitude


def test_exploding_when_sustained_above_limit():
    found = run(batch(noisy(8.0, 30) + noisy(14.0, 10, seed=1)))
    assert kinds(found) == [Kind.EXPLODING]
    assert found[0].evidence["steps_above"] == 5
    assert found[0].steps[0] >= 30
    # just under the default limit of 10: silent
    assert run(batch(noisy(6.0, 60, spread=0.05))) == []


def test_exploding_on_order_of_magnitude_jump_below_limit():
    found = run(batch(noisy(0.01, 40) + noisy(0.5, 10, seed=1)))
    assert kinds(found) == [Kind.EXPLODING]
    assert found[0].evidence["peak_ratio"] >= 10
    assert found[0].steps[0] == 40


def test_spike_is_short_outlier_not_explosion():
    norms = noisy(0.5, 40)
    norms[30] = 9.0
    found = run(batch(norms))
    assert kinds(found) == [Kind.SPIKE]
    assert found[0].steps == (30, 30)
    assert found[0].severity is Severity.INFO
    norms[30] = 2.0  # 4× the median: ordinary noise
    assert run(batch(norms)) == []


def test_vanishing_total_norm():
    found = run(batch(noisy(1e-7, 20)))
    assert Kind.VANISHING in kinds(found)
    assert run(batch(noisy(1e-5, 20))) == []


def test_family_changes_the_exploding_limit():
    norms = noisy(14.0, 30)
    assert Kind.EXPLODING in kinds(run(batch(norms), config=HealthConfig(family="default")))
    assert run(batch(norms), config=HealthConfig(family="cnn")) == []


# -------------------------------------------------------------------------- layer rules

NAMES = ("l0.weight", "l0.bias", "l1.weight", "l2.weight")


def snaps(rows, start=0):
    return [(start + i, row) for i, row in enumerate(rows)]


def layer_run(rows, config=None):
    return run(batch(noisy(0.5, len(rows)), names=NAMES, snapshots=snaps(rows)), config=config)


def test_vanishing_layer_absolute_and_relative():
    found = layer_run([[1e-9, 1e-9, 1e-3, 1e-3]] * 3)
    assert kinds(found) == [Kind.VANISHING_LAYER]
    assert found[0].params == ("l0",)
    relative = layer_run([[1e-7, 0.0, 0.05, 1.0]] * 3)
    assert kinds(relative) == [Kind.VANISHING_LAYER]
    assert relative[0].evidence["min_share"] < 1e-5
    assert layer_run([[1e-3, 1e-3, 1e-2, 1e-1]] * 3) == []


def test_dead_layer_grouped_by_module():
    found = layer_run([[0.1, 0.1, 0.0, 0.2]] * 3)
    assert kinds(found) == [Kind.DEAD_LAYER]
    assert found[0].params == ("l1",)
    # a dead bias inside a live layer is not a dead layer...
    assert layer_run([[0.1, 0.0, 0.1, 0.2]] * 3) == []
    # ...unless the names are taken as layers themselves
    per_tensor = layer_run([[0.1, 0.0, 0.1, 0.2]] * 3, HealthConfig(group_by_module=False))
    assert per_tensor[0].params == ("l0.bias",)


def test_layer_ratio_between_adjacent_layers():
    found = layer_run([[1e-4, 0.0, 0.1, 0.2]] * 3)
    assert kinds(found) == [Kind.LAYER_RATIO]
    assert found[0].params == ("l0", "l1")
    assert found[0].evidence["max_ratio"] == pytest.approx(1000.0)
    assert layer_run([[0.01, 0.0, 0.1, 0.2]] * 3) == []


def test_layer_conditions_need_to_be_sustained():
    # one bad snapshot among good ones: tensor_sustain=2 keeps it quiet
    assert layer_run([[0.1, 0.1, 0.0, 0.2], [0.1, 0.1, 0.1, 0.2]] * 2) == []


# ----------------------------------------------------------------------- clip activity


def test_clipping_never_acts():
    found = run(batch(noisy(0.5, 150), threshold=10.0))
    assert kinds(found) == [Kind.CLIP_INACTIVE]
    evidence = found[0].evidence
    assert evidence["idle_share"] >= 0.9
    assert 0.5 < evidence["recommended_threshold"] < 1.0
    assert run(batch(noisy(0.5, 150), threshold=1.0)) == []


def test_clipping_almost_always_acts():
    found = run(batch(noisy(4.0, 150), threshold=1.0))
    assert kinds(found) == [Kind.CLIP_SATURATED]
    assert any("learning rate" in a for a in found[0].advice)
    assert found[0].evidence["clipped_share"] >= 0.9


def test_norm_hovering_at_threshold():
    found = run(batch(noisy(1.0, 150, spread=0.08), threshold=1.0))
    assert kinds(found) == [Kind.CLIP_HOVERING]
    assert any("learning rate" in a for a in found[0].advice)


def test_no_threshold_means_no_clip_rules():
    assert run(batch(noisy(0.01, 300))) == []


# --------------------------------------------------------------------------- loss stall


def test_large_gradients_while_loss_stalls():
    rng = np.random.default_rng(3)
    flat = (2.0 + 0.01 * rng.normal(size=300)).tolist()
    found = run(batch(noisy(7.0, 300), loss=flat))
    assert kinds(found) == [Kind.LOSS_STALL]
    assert found[0].evidence["improvement"] < 0.01
    falling = np.linspace(3.0, 1.0, 300).tolist()
    assert run(batch(noisy(7.0, 300), loss=falling)) == []
    assert run(batch(noisy(0.5, 300), loss=flat)) == []


# --------------------------------------------------------------------- once, and re-arm


def test_each_finding_emitted_once_across_batches():
    monitor = HealthMonitor()
    found = []
    for i in range(20):
        found += monitor.update(batch(noisy(50.0, 50, seed=i), start=50 * i))
    assert kinds(found) == [Kind.EXPLODING]
    assert monitor.counts == {Kind.EXPLODING: 1}


def test_rearmed_after_condition_clears():
    config = HealthConfig(rearm_steps=20)
    series = noisy(20.0, 30) + noisy(1.0, 40, seed=1) + noisy(20.0, 30, seed=2)
    found = run(batch(series), config=config)
    assert kinds(found) == [Kind.EXPLODING, Kind.EXPLODING]
    # cleared for fewer steps than rearm_steps: still one finding
    short = noisy(20.0, 30) + noisy(1.0, 10, seed=1) + noisy(20.0, 30, seed=2)
    assert kinds(run(batch(short), config=config)) == [Kind.EXPLODING]


def test_monitor_state_is_bounded():
    monitor = HealthMonitor()
    for i in range(30):
        monitor.update(
            batch(noisy(0.5, 100, seed=i), start=100 * i, threshold=1.0, loss=[1.0] * 100)
        )
    config = monitor.config
    baseline = monitor.context.signal(NormBaseline)
    assert len(baseline) <= config.baseline_window
    assert len(monitor.context.signal(ClipActivity).window) <= config.clip_window
    stall = next(r for r in monitor.rules if r.kind == Kind.LOSS_STALL)
    assert len(stall._large) <= config.stall_window


def test_finding_event_round_trip():
    (finding,) = run(batch(noisy(0.5, 150), threshold=10.0))
    event = finding.to_event()
    assert event.kind == "health.clip_inactive"
    assert event.step == finding.steps[0]
    assert type(finding).from_event(event) == finding


# ------------------------------------------------------------------------------ offline


def test_diagnose_matches_online_and_accepts_numpy():
    series = noisy(0.5, 200) + noisy(30.0, 20, seed=1) + noisy(0.5, 50, seed=2)
    online = run(batch(series))
    offline = diagnose({"total_norm": np.asarray(series)}, np.arange(len(series)))
    assert offline == online
    assert Kind.EXPLODING in kinds(offline)


@settings(max_examples=25, deadline=None)
@given(
    chunk=st.integers(1, 90),
    seed=st.integers(0, 10_000),
    bursts=st.lists(st.tuples(st.integers(0, 280), st.floats(1e-9, 1e3)), max_size=4),
)
def test_diagnose_is_independent_of_chunking(chunk, seed, bursts):
    series = noisy(0.5, 300, seed=seed)
    for at, level in bursts:
        series[at : at + 6] = [level] * len(series[at : at + 6])
    names = ("a.weight", "b.weight")
    rows = [[series[s] * 1e-9, series[s]] for s in range(0, 300, 10)]
    args = (
        {"total_norm": series, "threshold": [2.0] * 300},
        range(300),
        names,
        range(0, 300, 10),
        rows,
    )

    def key(f):
        return (f.steps, f.kind.value, f.params)

    chunked = sorted(diagnose(*args, chunk=chunk), key=key)
    assert chunked == sorted(diagnose(*args, chunk=1000), key=key)


def test_diagnose_rejects_misaligned_columns():
    with pytest.raises(ValueError, match="total_norm"):
        diagnose({"total_norm": [1.0, 2.0]}, [0, 1, 2])
    with pytest.raises(ValueError, match="tensor_steps"):
        diagnose({"total_norm": [1.0]}, [0], ("a",), [0, 1], [[1.0]])
