"""measure() and GradStats: per-tensor norms, names, non-finite flags, layer view, extras."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard as gg
from tests.conftest import forbid_host_sync


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
        nn.Linear(8, 3),
    )
    model(torch.randn(4, 6)).pow(2).sum().backward()
    return model


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
def test_norms_equal_per_tensor_vector_norm_and_total_equals_torch(norm_type):
    model = small_model()
    stats = gg.measure(model, norm_type)
    expected = [torch.linalg.vector_norm(p.grad, norm_type) for p in model.parameters()]
    assert torch.equal(stats.norms, torch.stack(expected))
    torch_total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type)
    assert torch.equal(stats.total_norm, torch_total)
    assert stats.names == tuple(n for n, _ in model.named_parameters())
    assert stats.shapes == tuple(p.shape for p in model.parameters())
    assert len(stats) == len(expected)


def test_mixed_dtypes_keep_parameter_order():
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(4, dtype=torch.float64))
    c = nn.Parameter(torch.randn(5))
    for p, s in ((a, 1.0), (b, 2.0), (c, 3.0)):
        p.grad = torch.full_like(p, s)
    stats = gg.measure([("a", a), ("b", b), ("c", c)])
    assert stats.names == ("a", "b", "c")
    assert stats.norms.tolist() == pytest.approx([math.sqrt(3), 4.0, 3 * math.sqrt(5)])


def test_parameters_without_grad_are_left_out_with_their_names():
    model = small_model()
    model[0].weight.grad = None
    stats = gg.measure(model)
    assert "0.weight" not in stats.names
    assert len(stats) == len(list(model.parameters())) - 1


def test_measure_without_any_gradient_is_empty_not_an_error():
    model = nn.Linear(2, 2)
    stats = gg.measure(model)
    assert len(stats) == 0
    assert stats.total_norm.item() == 0.0


def test_nonfinite_flags_and_names():
    model = small_model()
    model[2][0].weight.grad[1, 2] = float("nan")
    model[3].bias.grad[0] = float("inf")
    stats = gg.measure(model)
    flags = dict(zip(stats.names, stats.nonfinite.tolist(), strict=True))
    assert flags["2.0.weight"] and flags["3.bias"]
    assert sum(flags.values()) == 2
    assert stats.any_nonfinite.item()
    assert stats.nonfinite_names() == ["2.0.weight", "3.bias"]
    host = stats.to_host()
    assert host.nonfinite_names == ["2.0.weight", "3.bias"]


def test_nonfinite_names_without_names_use_positions():
    p = nn.Parameter(torch.randn(2))
    q = nn.Parameter(torch.randn(2))
    p.grad = torch.ones(2)
    q.grad = torch.tensor([float("nan"), 0.0])
    assert gg.measure([p, q]).nonfinite_names() == ["parameters[1]"]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_by_module_equals_norm_of_the_modules_gradients(norm_type):
    model = small_model()
    layers = gg.measure(model, norm_type).by_module()
    assert layers.names == ("0", "2.0", "2.1", "3")
    for name, value in zip(layers.names, layers.norms.tolist(), strict=True):
        module = model.get_submodule(name)
        flat = torch.cat([p.grad.flatten() for p in module.parameters(recurse=False)])
        assert value == pytest.approx(torch.linalg.vector_norm(flat, norm_type).item(), rel=1e-5)


def test_by_module_depth_groups_by_leading_components():
    model = small_model()
    layers = gg.measure(model).by_module(depth=1)
    assert layers.names == ("0", "2", "3")
    flat = torch.cat([p.grad.flatten() for p in model[2].parameters()])
    assert layers.norms[1].item() == pytest.approx(flat.norm().item(), rel=1e-5)
    with pytest.raises(ValueError, match="depth"):
        gg.measure(model).by_module(depth=0)


def test_extras_max_abs_and_zero_fraction():
    p = nn.Parameter(torch.zeros(4))
    q = nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.tensor([0.0, -5.0, 2.0, 0.0])
    q.grad = torch.tensor([[1.0, 3.0], [0.5, 0.0]])
    stats = gg.measure([p, q], max_abs=True, zero_fraction=True)
    assert stats.max_abs.tolist() == [5.0, 3.0]
    assert stats.zero_fraction.tolist() == [0.5, 0.25]
    host = stats.to_host()
    assert host.max_abs == [5.0, 3.0]
    assert host.zero_fraction == [0.5, 0.25]
    plain = gg.measure([p, q])
    assert plain.max_abs is None and plain.zero_fraction is None


def test_fp32_accumulation_avoids_fp16_overflow():
    p = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.full((4,), 60000.0, dtype=torch.float16)
    assert math.isinf(gg.measure([p]).total_norm.item())
    assert gg.measure([p], dtype=torch.float32).total_norm.item() == pytest.approx(120000.0)


def test_measure_makes_no_host_sync():
    model = small_model()
    with forbid_host_sync():
        stats = gg.measure(model, max_abs=True, zero_fraction=True)
        stats.by_module()
        _ = stats.nonfinite, stats.any_nonfinite
    assert stats.total_norm.item() > 0


def test_generator_input_and_single_tensor():
    model = small_model()
    from_gen = gg.measure(p for p in model.parameters())
    assert from_gen.names is None
    assert torch.equal(from_gen.norms, gg.measure(model).norms)
    single = gg.measure(model[0].weight)
    assert len(single) == 1


class TestBadInput:
    def test_empty(self):
        with pytest.raises(ValueError, match="parameters is empty"):
            gg.measure([])
        with pytest.raises(ValueError, match="parameters is empty"):
            gg.measure(nn.ReLU())

    def test_norm_type(self):
        with pytest.raises(ValueError, match="norm_type"):
            gg.measure(small_model(), float("nan"))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match=r"parameters\[0\]"):
            gg.measure(["weight"])

    def test_bad_pair(self):
        with pytest.raises(TypeError, match=r"parameters\[1\]"):
            gg.measure([("a", torch.zeros(1)), ("b", 3)])
