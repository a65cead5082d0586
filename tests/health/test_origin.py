"""Where non-finite gradients start: the backward order and the forward probe (torch)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard
from gradguard.health import BackwardOrder, HealthMonitor, Severity, find_nonfinite_forward
from gradguard.schema import HostBatch

pytestmark = pytest.mark.usefixtures("one_thread")


class Trapped(nn.Module):
    """Six tanh layers; after l3, ``where(h > 0, sqrt(h), 0)``: finite forward, NaN backward."""

    def __init__(self):
        super().__init__()
        for i in range(6):
            self.add_module(f"l{i}", nn.Linear(8, 8))

    def forward(self, x):
        for i in range(6):
            x = getattr(self, f"l{i}")(x)
            if i == 3:
                x = torch.where(x > 0, x.sqrt(), torch.zeros_like(x))
            elif i < 5:
                x = torch.tanh(x)
        return x


def test_backward_order_locates_the_nan_origin():
    torch.manual_seed(0)
    model = Trapped()
    order = BackwardOrder(model)
    assert order.attached and not order.learned
    x = torch.randn(32, 8)
    out = model(x)
    assert torch.isfinite(out).all()  # the forward pass looks healthy
    out.square().mean().backward()
    assert not order.attached  # hooks gone after the first full backward
    assert order.order[0].startswith("l5.")

    stats = gradguard.measure(model)
    bad = stats.nonfinite_names()
    upstream = [f"l{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sorted(bad) == sorted(upstream)  # the NaN reached everything upstream...
    assert bad[0].startswith("l0.")  # ...so registration order blames the first layer
    origin = order.first_nonfinite(bad)
    assert origin is not None and origin.startswith("l3.")
    assert order.first_nonfinite(stats.nonfinite) == origin
    assert order.first_nonfinite([]) is None

    host = stats.to_host()
    loss = out.square().mean().item()  # finite: the NaN was born in backward
    batch = HostBatch(
        [0], {"total_norm": [host.total_norm], "loss": [loss]}, host.names, [0], [host.norms]
    )
    (finding,) = [f for f in HealthMonitor(order=order).update(batch) if f.kind == "nonfinite"]
    assert finding.severity is Severity.CRITICAL
    assert finding.origin == origin and finding.params[0] == origin
    assert finding.evidence["nonfinite_tensors"] == 8


def test_backward_order_validates_flags():
    model = nn.Linear(2, 2)
    order = BackwardOrder(model)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="names_or_flags"):
        order.first_nonfinite([True])
    assert order.first_nonfinite([False, True]) == "bias"


class LogLayer(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_find_nonfinite_forward_names_first_bad_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), LogLayer(), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    assert find_nonfinite_forward(model, x) == "2"
    assert find_nonfinite_forward(model[:2], x) is None
    assert find_nonfinite_forward(model, torch.full((1, 4), math.nan)) == "<input>"


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.fixed = nn.Linear(4, 4).requires_grad_(False)  # frozen on purpose

    def forward(self, x):
        with torch.no_grad():
            h = self.frozen(x)  # by mistake: it still requires grad
        return self.head(h + self.fixed(x))


def test_unreached_names_parameters_that_require_grad_but_got_no_gradient():
    model = Detached()
    order = BackwardOrder(model)
    assert order.unreached() == ()  # nothing known before a backward
    model(torch.randn(2, 4)).sum().backward()
    assert order.attached  # some parameters never reported...
    model(torch.randn(2, 4))  # ...so the next forward completes the order
    assert not order.attached
    assert order.unreached() == ("frozen.weight", "frozen.bias")
