"""The layer-dispersion and AMP-overflow rules on synthetic series."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradguard.health import RULES, HealthConfig, HealthMonitor, Kind, Severity
from gradguard.schema import HostBatch, SkipReason

AMP = float(SkipReason.AMP_OVERFLOW)


def run(*batches, config=None):
    monitor = HealthMonitor(config)
    out = []
    for b in batches:
        out.extend(monitor.update(b))
    return out, monitor


def kinds(findings):
    return [f.kind for f in findings]


def cv(row):
    a = np.asarray(row, dtype=float)
    return float(a.std() / a.mean())


# ------------------------------------------------------------------- layer dispersion


def layer_batch(rows, start=0):
    """One step per snapshot; layer i is the module ``l{i}`` with one tensor."""
    n = len(rows)
    names = tuple(f"l{i}.weight" for i in range(len(rows[0])))
    steps = list(range(start, start + n))
    columns = {"total_norm": [1.0] * n, "threshold": [math.inf] * n}
    return HostBatch(steps, columns, names, steps, [list(r) for r in rows])


def dominated(peak, layers=20):
    """``layers - 1`` layers at 1.0 and one in the middle at ``peak``."""
    row = [1.0] * layers
    row[layers // 2] = peak
    return row


def test_dispersed_layers_flagged_once_with_evidence():
    row = dominated(80.0)  # adjacent ratio 80 < layer_ratio 100: only dispersion sees it
    assert cv(row) > 3.0
    found, monitor = run(layer_batch([row] * 6), layer_batch([row] * 6, start=6))
    assert kinds(found) == [Kind.LAYER_DISPERSION]
    assert monitor.counts == {Kind.LAYER_DISPERSION: 1}
    (finding,) = found
    assert finding.severity is Severity.WARNING
    assert finding.steps == (0, 1)  # sustained for tensor_sustain=2 snapshots
    assert finding.params == ("l10", "l0")  # largest first, then smallest
    ev = finding.evidence
    assert ev["mean"] == pytest.approx(np.mean(row))
    assert ev["std"] == pytest.approx(np.std(row))
    assert ev["ratio"] == pytest.approx(cv(row))
    assert ev["largest_norm"] == 80.0 and ev["smallest_norm"] == 1.0
    assert ev["layers"] == 20 and ev["dispersion_ratio"] == 3.0
    assert any("AGC" in a for a in finding.advice)
    assert any("LayerNorm" in a for a in finding.advice)


def test_dispersion_near_miss_is_silent():
    row = dominated(40.0)
    assert 2.5 < cv(row) < 3.0
    assert run(layer_batch([row] * 10))[0] == []


def test_dispersion_must_be_sustained():
    bad, good = dominated(80.0), dominated(2.0)
    assert run(layer_batch([bad, good] * 5))[0] == []


def test_dispersion_rearmed_after_clearing():
    bad, good = dominated(80.0), dominated(2.0)
    rows = [bad] * 3 + [good] * 3 + [bad] * 3  # rearm_snapshots=3
    assert kinds(run(layer_batch(rows))[0]) == [Kind.LAYER_DISPERSION] * 2
    # one clear snapshot, plus the one that rebuilds the sustained run: not re-armed
    short = [bad] * 3 + [good] + [bad] * 3
    assert kinds(run(layer_batch(short))[0]) == [Kind.LAYER_DISPERSION]


def test_dispersion_threshold_is_configurable():
    row = dominated(40.0)
    found, _ = run(layer_batch([row] * 3), config=HealthConfig(dispersion_ratio=2.5))
    assert kinds(found) == [Kind.LAYER_DISPERSION]


def test_seed_ratio_five_is_unreachable_below_27_layers():
    # population std of n positive values is at most sqrt(n - 1) × their mean
    config = HealthConfig(dispersion_ratio=5.0, layer_ratio=1e9)
    extreme = dominated(1e4, layers=26)
    assert cv(extreme) < math.sqrt(25) == 5.0
    assert run(layer_batch([extreme] * 3), config=config)[0] == []
    deeper = dominated(1e4, layers=40)
    assert kinds(run(layer_batch([deeper] * 3), config=config)[0]) == [Kind.LAYER_DISPERSION]


def test_dispersion_leaves_adjacent_jumps_to_layer_ratio():
    row = dominated(1000.0)  # neighbours differ by 1000× > layer_ratio
    assert kinds(run(layer_batch([row] * 3))[0]) == [Kind.LAYER_RATIO]


def test_dispersion_ignores_dead_and_vanishing_layers():
    # 17 vanishing + 2 dead layers next to one live layer: raw CV is sqrt(19) ≈ 4.4,
    # but those layers are vanishing_layer's / dead_layer's findings, not dispersion
    row = [1e-9] * 17 + [0.0, 0.0] + [1.0]
    assert cv(row) > 3.0
    found = kinds(run(layer_batch([row] * 3))[0])
    assert Kind.LAYER_DISPERSION not in found
    assert set(found) == {Kind.VANISHING_LAYER, Kind.DEAD_LAYER}
    # live layers that disperse are still judged among themselves
    mixed = [1e-9] * 3 + dominated(80.0)
    found = kinds(run(layer_batch([mixed] * 3))[0])
    assert Kind.LAYER_DISPERSION in found and Kind.VANISHING_LAYER in found


def test_dispersion_groups_tensors_by_module():
    # weight and bias of each layer are combined before the spread is measured
    names = tuple(f"l{i}.{p}" for i in range(20) for p in ("weight", "bias"))
    per_layer = dominated(80.0)
    norms = [v / math.sqrt(2.0) for v in per_layer for _ in range(2)]
    batch = HostBatch([0, 1], {"total_norm": [1.0, 1.0]}, names, [0, 1], [norms, norms])
    (finding,) = run(batch)[0]
    assert finding.kind is Kind.LAYER_DISPERSION
    assert finding.params == ("l10", "l0")
    assert finding.evidence["layers"] == 20
    assert finding.evidence["largest_norm"] == pytest.approx(80.0)


# ---------------------------------------------------------------------- AMP overflow


def amp_batch(overflow, *, start=0, scale=None):
    n = len(overflow)
    columns = {
        "total_norm": [math.inf if o else 1.0 for o in overflow],
        "skipped": [float(o) for o in overflow],
        "reason": [AMP if o else 0.0 for o in overflow],
    }
    if scale is not None:
        columns["loss_scale"] = list(scale)
    return HostBatch(list(range(start, start + n)), columns)


def every(k, n, offset=0):
    return [(i + offset) % k == 0 for i in range(n)]


def test_frequent_amp_overflow_flagged_once_with_scale_trend():
    flags = [False] * 100 + every(10, 500)  # 10% after warm-up
    scale = np.geomspace(65536.0, 256.0, len(flags)).tolist()
    found, monitor = run(
        amp_batch(flags[:300], scale=scale[:300]),
        amp_batch(flags[300:], start=300, scale=scale[300:]),
    )
    assert kinds(found) == [Kind.AMP_OVERFLOW]
    assert monitor.counts == {Kind.AMP_OVERFLOW: 1}
    amp = next(r for r in monitor.rules if r.kind == Kind.AMP_OVERFLOW)
    assert len(amp._window) == monitor.config.amp_window  # bounded state
    (finding,) = found
    assert finding.severity is Severity.WARNING
    ev = finding.evidence
    assert ev["overflows"] == 11  # first count above 5% of 200
    assert ev["rate"] == pytest.approx(ev["overflows"] / ev["window"])
    assert ev["window"] <= 200 and ev["amp_overflow_rate"] == 0.05
    assert ev["loss_scale_trend"] < 1.0
    assert ev["loss_scale_last"] < ev["loss_scale_first"]
    assert ev["loss_scale_min"] == ev["loss_scale_last"]
    assert finding.steps[1] - finding.steps[0] + 1 == ev["window"]
    assert any("bfloat16" in a for a in finding.advice)
    assert any("growth_interval" in a for a in finding.advice)
    # the overflows are the scaler's business: no non-finite finding
    assert Kind.NONFINITE not in kinds(found)


def test_amp_overflow_near_miss_is_silent():
    flags = [False] * 100 + every(25, 800)  # 4% < 5%
    assert run(amp_batch(flags))[0] == []


def test_amp_calibration_overflows_in_warmup_are_ignored():
    flags = [True] * 20 + [False] * 80 + every(50, 400)  # scaler calibrates, then 2%
    assert run(amp_batch(flags))[0] == []
    # the same overflows counted without a warm-up exceed the rate
    found, _ = run(amp_batch(flags), config=HealthConfig(amp_warmup=0))
    assert kinds(found) == [Kind.AMP_OVERFLOW]


def test_amp_overflow_without_loss_scale_column():
    flags = [False] * 100 + every(5, 300)
    (finding,) = run(amp_batch(flags))[0]
    assert finding.kind is Kind.AMP_OVERFLOW
    assert not any(key.startswith("loss_scale") for key in finding.evidence)


def test_other_skips_are_not_amp_overflows():
    flags = [False] * 100 + every(5, 300)
    b = amp_batch(flags)
    b.columns["reason"] = [float(SkipReason.POLICY) if o else 0.0 for o in flags]
    b.columns["total_norm"] = [1.0] * len(flags)
    assert Kind.AMP_OVERFLOW not in kinds(run(b)[0])


def test_amp_overflow_rate_and_window_configurable():
    flags = [False] * 100 + every(25, 400)  # 4%
    config = HealthConfig(amp_overflow_rate=0.03, amp_window=100)
    assert kinds(run(amp_batch(flags), config=config)[0]) == [Kind.AMP_OVERFLOW]


# ---------------------------------------------------------------------------- config


def test_new_kinds_have_rule_specs():
    specs = {r.kind: r for r in RULES}
    assert specs[Kind.LAYER_DISPERSION].scope == "layer"
    assert specs[Kind.AMP_OVERFLOW].scope == "window"
    assert "dispersion_ratio" in specs[Kind.LAYER_DISPERSION].condition
    assert "amp_overflow_rate" in specs[Kind.AMP_OVERFLOW].condition


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("dispersion_ratio", 0.0, ValueError),
        ("dispersion_ratio", -1.0, ValueError),
        ("dispersion_ratio", math.nan, ValueError),
        ("dispersion_ratio", "5", TypeError),
        ("amp_overflow_rate", 0.0, ValueError),
        ("amp_overflow_rate", 1.5, ValueError),
        ("amp_window", 1, ValueError),
        ("amp_window", 200.0, TypeError),
        ("amp_warmup", -1, ValueError),
        ("amp_warmup", True, TypeError),
    ],
)
def test_config_validation_names_the_field(field, value, error):
    with pytest.raises(error, match=field):
        HealthConfig(**{field: value})


def test_config_defaults_and_zero_warmup():
    config = HealthConfig()
    assert config.dispersion_ratio == 3.0
    assert (config.amp_overflow_rate, config.amp_window, config.amp_warmup) == (0.05, 200, 100)
    assert HealthConfig(amp_warmup=0).amp_warmup == 0
