"""The family table and inferring a model's family from its modules."""

from __future__ import annotations

import pytest
from torch import nn

from gradguard.health import FAMILIES, HealthConfig, get_family, infer_family


def test_the_table_follows_the_seeds():
    for row in FAMILIES:
        config = HealthConfig(family=row.name)
        assert config.healthy_range == row.healthy_range
        assert config.explode_above == row.explode_above
        assert row.clip_range[0] <= row.clip_range[1]
    assert get_family("transformer").clip_range == (1.0, 2.0)
    assert get_family("cnn").clip_range == (5.0, 10.0)
    assert get_family("rnn").clip_range == (5.0, 10.0)
    assert get_family("embedding").clip_range[0] >= 10.0
    with pytest.raises(ValueError, match="family"):
        get_family("mlp-ish")


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
