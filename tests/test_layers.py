"""One grouping of parameters by owning module, shared by stats, health and the report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.health import HealthConfig, HealthMonitor
from gradguard.layers import group_index, module_of
from gradguard.report.data import group_layers
from gradguard.schema import HostBatch


def test_module_of():
    assert module_of("encoder.0.attn.weight") == "encoder.0.attn"
    assert module_of("encoder.0.attn.weight", depth=1) == "encoder"
    assert module_of("encoder.0.attn.weight", depth=9) == "encoder.0.attn"  # never the tensor
    assert module_of("pos_embedding") == "pos_embedding"  # held by the root: its own group


def test_group_index_keeps_model_order():
    groups, index = group_index(["b.weight", "a.weight", "b.bias", "scale"])
    assert groups == ("b", "a", "scale")
    assert index == (0, 1, 0, 2)


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_group_index_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match="depth"):
        group_index(["a.b"], depth)


def test_stats_health_and_report_group_a_bare_linear_alike():
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    stats = gg.measure(model)
    layers = stats.by_module()
    assert layers.names == ("weight", "bias")
    norms = np.array([stats.norms.tolist()])
    assert group_layers(("weight", "bias"), norms)[0] == layers.names
    # the health rules see the same two groups: one dead bias is one dead layer
    monitor = HealthMonitor(HealthConfig(tensor_sustain=1))
    batch = HostBatch(
        steps=[0],
        columns={"total_norm": [1.0]},
        names=("weight", "bias"),
        tensor_steps=[0],
        tensor_norms=[[1.0, 0.0]],
    )
    dead = [f for f in monitor.update(batch) if f.kind.value == "dead_layer"]
    assert [f.params for f in dead] == [("bias",)]
