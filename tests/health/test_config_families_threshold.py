"""Configuration, the family table, family inference and threshold advice."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch import nn

from gradguard.health import (
    FAMILIES,
    HealthConfig,
    HealthMonitor,
    get_family,
    infer_family,
    recommend_threshold,
)
from gradguard.schema import HostBatch


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
    ],
)
def test_invalid_config_raises_value_error_naming_the_argument(field, value):
    with pytest.raises(ValueError, match=field):
        HealthConfig(**{field: value})


def test_config_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="sustain"):
        HealthConfig(sustain=2.5)
    with pytest.raises(TypeError, match="group_by_module"):
        HealthConfig(group_by_module="yes")
    with pytest.raises(TypeError, match="config"):
        HealthMonitor({"family": "cnn"})


def test_family_defaults_and_overrides():
    for row in FAMILIES:
        config = HealthConfig(family=row.name)
        assert config.healthy_range == row.healthy_range
        assert config.explode_above == row.explode_above
        assert row.clip_range[0] <= row.clip_range[1]
    assert get_family("transformer").clip_range == (1.0, 2.0)
    assert get_family("cnn").clip_range == (5.0, 10.0)
    assert get_family("rnn").clip_range == (5.0, 10.0)
    assert get_family("embedding").clip_range[0] >= 10.0
    custom = HealthConfig(family="transformer", healthy_range=(0.1, 3.0), explode_above=7)
    assert custom.healthy_range == (0.1, 3.0)
    assert custom.explode_above == 7.0
    assert custom.replace(sustain=9).sustain == 9
    with pytest.raises(ValueError, match="sustain"):
        custom.replace(sustain=0)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)


class Recsys(nn.Module):
    def __init__(self):
        super().__init__()
        self.users = nn.Embedding(1000, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


class TextTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(5000, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)


@pytest.mark.parametrize(
    ("model", "family"),
    [
        (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, 16), 1, enable_nested_tensor=False
            ),
            "transformer",
        ),
        (nn.Sequential(nn.Linear(8, 8), SelfAttention()), "transformer"),
        (TextTransformer(), "transformer"),
        (Recsys(), "embedding"),
        (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 400)), "default"),
        (nn.LSTM(4, 8), "rnn"),
        (nn.Sequential(nn.GRU(4, 8)), "rnn"),
        (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten()), "cnn"),
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh()), "default"),
    ],
)
def test_infer_family(model, family):
    assert infer_family(model) == family
    assert HealthConfig.for_model(model).family == family
    assert HealthConfig.for_model(model, family="cnn").family == "cnn"


# --------------------------------------------------------------------- threshold advice


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


def test_only_origin_imports_torch():
    import ast
    import pathlib

    import gradguard.health as health

    for path in pathlib.Path(health.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        imported |= {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        }
        assert ("torch" in imported) == (path.name == "origin.py"), path.name
