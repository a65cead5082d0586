"""The per-example independence probe: what moves for the other examples when one changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradguard.privacy.independence import (
    BACKWARD,
    MIXES,
    PROBE_EXAMPLES,
    Inconclusive,
    independence_problems,
    probe_inputs,
)

torch.set_num_threads(1)


def per_sample_norm_of_example_0(opacus, net: nn.Module, x, y) -> float:
    model = opacus.GradSampleModule(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn.functional.cross_entropy(model(x), y).backward()
    norm = torch.cat([p.grad_sample[0].reshape(-1) for p in model.parameters()]).norm()
    model._close()
    return norm.item()


@pytest.mark.parametrize("layer", ["batchnorm", "groupnorm"])
def test_batchnorm_without_affine_mixes_examples_and_the_probe_names_it(layer):
    # the audit's finding: with BatchNorm1d(affine=False), which Opacus's validator passes,
    # changing example 5 moves example 0's per-sample gradient norm
    opacus = pytest.importorskip("opacus")
    norm = nn.BatchNorm1d(6, affine=False) if layer == "batchnorm" else nn.GroupNorm(2, 6)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    changed = x.clone()
    changed[5] += 3.0
    before = per_sample_norm_of_example_0(opacus, net, x, y)
    after = per_sample_norm_of_example_0(opacus, net, changed, y)
    found = independence_problems(net, x)
    if layer == "batchnorm":
        assert abs(after - before) > 0.05 * before
        assert (found[0].name, found[0].module, found[0].reason) == ("1", "BatchNorm1d", MIXES)
    else:
        assert after == pytest.approx(before, rel=1e-6)
        assert found == []


def test_batch_statistics_are_named_as_buffers_written_from_the_batch():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    found = independence_problems(model, torch.randn(5, 4))
    assert [(p.name, p.reason == MIXES) for p in found] == [("1", True), ("1", False)]
    assert "buffer 'running_mean', 'running_var' from the batch" in found[1].reason
    assert "num_batches_tracked" not in found[1].reason  # counts batches, not data


class MixesAtTheRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        h = self.linear(x)
        return h - h.mean(0)


class MixGradients(torch.autograd.Function):
    """Identity forward; the backward subtracts the batch mean of the gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad - grad.mean(0, keepdim=True)


class BackwardMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.second(torch.tanh(MixGradients.apply(self.first(x))))


def test_mixing_outside_any_sub_module_is_named_at_the_model():
    (problem,) = independence_problems(MixesAtTheRoot(), torch.randn(5, 4))
    assert (problem.name, problem.module, problem.reason) == ("", "MixesAtTheRoot", MIXES)


def test_mixing_in_a_backward_pass_is_caught_by_the_gradients():
    (problem,) = independence_problems(BackwardMixer(), torch.randn(5, 4))
    assert (problem.name, problem.module, problem.reason) == ("", "BackwardMixer", BACKWARD)


def test_the_innermost_mixing_module_is_named_not_its_containers():
    class Centre(nn.Module):
        def forward(self, x):
            return x - x.mean(0)

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Sequential(Centre())))
    assert [p.name for p in independence_problems(model, torch.randn(4, 4))] == ["1.1.0"]


def test_token_inputs_are_changed_to_another_example():
    class PoolOverBatch(nn.Module):
        def forward(self, x):
            return x + x.amax(0)

    model = nn.Sequential(nn.Embedding(20, 4), PoolOverBatch())
    tokens = torch.randint(0, 20, (6, 3), generator=torch.Generator().manual_seed(0))
    assert [p.name for p in independence_problems(model, tokens)] == ["1"]
    assert independence_problems(nn.Sequential(nn.Embedding(20, 4)), tokens) == []


def test_per_example_models_with_dropout_and_attention_pass():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.3, batch_first=True)
    assert independence_problems(layer, torch.randn(5, 4, 8)) == []
    mlp = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.LayerNorm(16), nn.Linear(16, 2))
    assert independence_problems(mlp, torch.randn(6, 4)) == []


def test_an_input_whose_dimension_0_is_not_the_batch_is_inconclusive():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.raises(Inconclusive, match=r"'self_attn' \(MultiheadAttention\)"):
        independence_problems(layer, torch.randn(5, 8))  # 2-D: one unbatched sequence
    lstm = nn.LSTM(4, 4)  # time-major
    with pytest.raises(Inconclusive, match="LSTM"):
        independence_problems(lstm, torch.randn(5, 2, 4))


def test_an_opacus_wrapped_model_is_probed_without_touching_its_hooks():
    opacus = pytest.importorskip("opacus")
    model = opacus.GradSampleModule(
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 2))
    )
    found = independence_problems(model, torch.randn(5, 4))
    assert [p.name for p in found] == ["1", "1"]  # mixes, and writes running statistics
    assert model.hooks_enabled
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_probe_inputs_follow_the_first_layer():
    (linear, linear_3d) = list(probe_inputs(nn.Sequential(nn.Flatten(), nn.Linear(10, 2))))
    assert linear.shape == (PROBE_EXAMPLES, 10) and linear_3d.shape == (PROBE_EXAMPLES, 5, 10)
    conv = list(probe_inputs(nn.Sequential(nn.Conv2d(3, 4, 3))))
    assert conv[0].shape == (PROBE_EXAMPLES, 3, 32, 32) and len(conv) > 1
    (tokens,) = probe_inputs(nn.Embedding(11, 3))
    assert tokens.dtype == torch.int64 and int(tokens.max()) < 11
    assert list(probe_inputs(nn.Sequential(nn.ReLU()))) == []
