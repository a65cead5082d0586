"""Signals computed with numpy agree with the plain computation they stand for."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradguard.health import HealthConfig
from gradguard.health.signals import LayerSnapshot
from gradguard.layers import module_of


def _plain_layers(names, norms, config):
    """Layers, norms, dead/vanishing flags and adjacent ratios, one layer at a time."""
    if config.group_by_module:
        sums: dict[str, float] = {}
        for name, norm in zip(names, norms):
            layer = module_of(name)
            sums[layer] = sums.get(layer, 0.0) + norm * norm
        layers, values = list(sums), [math.sqrt(s) for s in sums.values()]
    else:
        layers, values = list(names), list(norms)
    largest = max(values)
    dead = [v == 0.0 for v in values]
    low = [
        not d and (v < config.vanish_layer or v < config.vanish_layer_relative * largest)
        for v, d in zip(values, dead)
    ]
    weak = [d or w for d, w in zip(dead, low)]
    ratios = [
        1.0 if weak[i] or weak[i + 1] else max(a, b) / min(a, b)
        for i, (a, b) in enumerate(itertools.pairwise(values))
    ]
    return layers, values, largest, dead, low, ratios


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(1, 4), min_size=1, max_size=12),
    data=st.data(),
    by_module=st.booleans(),
)
def test_layer_snapshot_matches_a_plain_loop(groups, data, by_module):
    names = tuple(f"block{i}.p{j}" for i, size in enumerate(groups) for j in range(size))
    norm = st.one_of(st.just(0.0), st.floats(1e-12, 1e6), st.floats(1e-3, 10.0))
    norms = data.draw(st.lists(norm, min_size=len(names), max_size=len(names)))
    config = HealthConfig(group_by_module=by_module)
    snapshot = LayerSnapshot.build(7, names, np.array(norms), config)
    layers, values, largest, dead, low, ratios = _plain_layers(names, norms, config)
    assert snapshot.layers == tuple(layers)
    assert snapshot.values.tolist() == values  # bit for bit: findings quote these
    assert snapshot.largest == largest
    assert snapshot.dead.tolist() == dead and snapshot.low.tolist() == low
    assert snapshot.ratios.tolist() == ratios
    assert snapshot.pairs == tuple(itertools.pairwise(layers))
    limit = 100.0
    assert snapshot.adjacent_jump(limit) == any(r > limit for r in ratios)
