"""Clip-threshold advice from a window of unclipped norms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradguard.health import recommend_threshold
from gradguard.schema import HostBatch


def test_recommend_threshold_band_on_lognormal_window():
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(np.log(0.4), 0.3, 500))
    advice = recommend_threshold(norms)
    p95 = np.percentile(norms, 95)
    assert p95 <= advice.threshold <= 1.1 * p95
    assert 95.0 <= advice.percentile <= 100.0
    assert advice.expected_clip_rate <= 0.05
    assert advice.expected_clip_rate == pytest.approx(np.mean(norms > advice.threshold))
    assert advice.median <= advice.threshold <= 10 * advice.median
    assert advice.window == 500 and advice.ignored == 0 and not advice.capped


def test_recommend_threshold_ignores_and_counts_nonfinite():
    norms = [0.5] * 40 + [math.nan, math.inf, 1.0]
    advice = recommend_threshold(norms)
    assert advice.ignored == 2
    assert advice.window == 41
    assert "non-finite" in advice.reason


def test_recommend_threshold_caps_within_an_order_of_magnitude():
    norms = [0.1] * 80 + [100.0] * 20
    advice = recommend_threshold(norms)
    assert advice.capped
    assert advice.threshold == pytest.approx(1.0)
    assert "capped" in advice.reason


def test_recommend_threshold_reads_run_columns():
    columns = {"total_norm": list(np.linspace(0.1, 1.0, 100))}
    run = HostBatch(list(range(100)), columns)
    assert recommend_threshold(run) == recommend_threshold(columns["total_norm"])
    assert recommend_threshold(columns) == recommend_threshold(run)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"percentile": 40.0}, "percentile"),
        ({"percentile": 100.0}, "percentile"),
        ({"margin": 0.9}, "margin"),
        ({"max_ratio": 1.0}, "max_ratio"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_recommend_threshold_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        recommend_threshold([0.5] * 50, **kwargs)


def test_recommend_threshold_bad_windows():
    with pytest.raises(ValueError, match="min_samples"):
        recommend_threshold([0.5] * 5)
    with pytest.raises(ValueError, match="zero median"):
        recommend_threshold([0.0] * 50)
    with pytest.raises(ValueError, match="negative"):
        recommend_threshold([-1.0] * 50)
    with pytest.raises(TypeError, match="norms_or_run"):
        recommend_threshold(object())
