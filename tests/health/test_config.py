"""``HealthConfig``: the thresholds each rule and signal declares, gathered and validated."""

from __future__ import annotations

import math
import pickle

import pytest

from gradguard.health import RULES, HealthConfig, HealthMonitor, thresholds
from gradguard.health.config import SHARED
from gradguard.health.signals import SIGNALS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("family", "mlp-ish"),
        ("healthy_range", (5.0, 1.0)),
        ("healthy_range", (-1.0, 1.0)),
        ("explode_above", 0.0),
        ("vanish_total", -1e-6),
        ("vanish_layer", math.nan),
        ("vanish_layer_relative", 1.5),
        ("layer_ratio", 1.0),
        ("jump_factor", 0.5),
        ("jump_sustain", 0),
        ("baseline_window", 0),
        ("min_history", 100),
        ("sustain", 0),
        ("tensor_sustain", -1),
        ("rearm_steps", 0),
        ("clip_window", 1),
        ("clip_idle_below", 0.0),
        ("clip_idle_share", 1.0),
        ("clip_saturated_share", 2.0),
        ("hover_band", (1.1, 1.5)),
        ("hover_share", -0.1),
        ("stall_window", 2),
        ("stall_tolerance", 0.0),
        ("dispersion_ratio", -1.0),
        ("amp_overflow_rate", 1.5),
        ("amp_window", 1),
        ("divergence_factor", 1.0),
        ("lr_rise", 0.5),
        ("collapse_below", 0.0),
        ("loss_window", 2),
    ],
)
def test_a_bad_value_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HealthConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sustain", 2.5),
        ("group_by_module", "yes"),
        ("amp_window", 200.0),
        ("dispersion_ratio", "5"),
    ],
)
def test_a_wrong_type_raises_type_error_naming_the_field(field, value):
    with pytest.raises(TypeError, match=field):
        HealthConfig(**{field: value})


def test_unknown_fields_and_non_configs_are_refused():
    with pytest.raises(TypeError, match="unknown HealthConfig fields: \\['jump'\\]"):
        HealthConfig(jump=3)
    with pytest.raises(TypeError, match="config"):
        HealthMonitor({"family": "cnn"})


def test_every_threshold_is_declared_once_with_its_meaning():
    declared = [t for owner in (SHARED, *(s.thresholds for s in SIGNALS)) for t in owner]
    declared += [t for rule in RULES for t in rule.thresholds]
    names = [t.name for t in declared]
    assert len(names) == len(set(names))
    assert set(names) == set(thresholds())
    assert all(t.doc for t in declared)
    values = dict(HealthConfig())
    assert set(values) == {"family", *names}


def test_every_rule_names_the_thresholds_it_declares_in_its_condition():
    for rule in RULES:
        assert rule.condition and rule.advice and rule.kind
        for t in rule.thresholds:
            assert t.name in rule.condition, (rule.kind, t.name)


def test_family_defaults_overrides_and_replace():
    custom = HealthConfig(family="transformer", healthy_range=(0.1, 3.0), explode_above=7)
    assert custom.healthy_range == (0.1, 3.0) and custom.explode_above == 7.0
    assert custom.replace(sustain=9).sustain == 9
    assert custom.replace(sustain=9).healthy_range == (0.1, 3.0)
    with pytest.raises(ValueError, match="sustain"):
        custom.replace(sustain=0)
    with pytest.raises(AttributeError, match="immutable"):
        custom.sustain = 3
    with pytest.raises(AttributeError, match="no threshold 'nope'"):
        _ = custom.nope


def test_configs_compare_hash_and_pickle_by_value():
    a, b = HealthConfig(family="cnn", sustain=3), HealthConfig(family="cnn", sustain=3)
    assert a == b and hash(a) == hash(b) and a != HealthConfig(family="cnn")
    assert pickle.loads(pickle.dumps(a)) == a
    assert "sustain=3" in repr(a)
