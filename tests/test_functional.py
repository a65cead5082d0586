"""The drop-ins equal torch.nn.utils bit for bit; the extra clips follow their formulas."""

from __future__ import annotations

import math
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import gradguard as gg

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: torch accepts any order but NaN: negative ones, 0 and -inf too (drop-in promise).
NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf, "inf", -0.1, -2.0, 0.0, -math.inf, "-inf"]


@st.composite
def grad_sets(draw):
    """Random parameter lists: shapes, dtypes (possibly mixed), some grads None."""
    n = draw(st.integers(1, 6))
    mixed = draw(st.booleans())
    base = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    specs = []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(DTYPES)) if mixed else base
        has_grad = draw(st.integers(0, 4)) > 0
        specs.append((shape, dtype, has_grad))

    def build():
        g = torch.Generator().manual_seed(seed)
        params = []
        for shape, dtype, has_grad in specs:
            p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
            if has_grad:
                p.grad = (torch.randn(shape, generator=g) * scale).to(dtype)
            params.append(p)
        return params

    del gen
    return build


def grads(params):
    return [p.grad.clone() if p.grad is not None else None for p in params]


def assert_same_grads(a, b):
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype
            assert torch.equal(x, y) or (x.isnan().any() and torch.equal(x.isnan(), y.isnan()))


@settings(max_examples=60, deadline=None)
@given(
    build=grad_sets(),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 1e3]),
    foreach=st.sampled_from([None, True, False]),
)
def test_clip_grad_norm_matches_torch_bit_for_bit(build, norm_type, max_norm, foreach):
    ours, theirs = build(), build()
    total_ours = gg.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    total_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    assert total_ours.dtype == total_theirs.dtype
    assert torch.equal(total_ours, total_theirs) or (total_ours.isnan() and total_theirs.isnan())
    assert_same_grads(grads(ours), grads(theirs))


@settings(max_examples=40, deadline=None)
@given(
    build=grad_sets(), norm_type=st.sampled_from(NORM_TYPES), foreach=st.sampled_from([None, False])
)
def test_get_total_norm_and_clip_with_norm_match_torch(build, norm_type, foreach):
    ours, theirs = build(), build()
    gs_ours = [p.grad for p in ours if p.grad is not None]
    gs_theirs = [p.grad for p in theirs if p.grad is not None]
    n_ours = gg.get_total_norm(gs_ours, norm_type, foreach=foreach)
    n_theirs = torch.nn.utils.get_total_norm(gs_theirs, norm_type, foreach=foreach)
    assert torch.equal(n_ours, n_theirs)
    gg.clip_grads_with_norm_(ours, 0.25, n_ours, foreach=foreach)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.25, n_theirs, foreach=foreach)
    assert_same_grads(grads(ours), grads(theirs))


@settings(max_examples=40, deadline=None)
@given(
    build=grad_sets(),
    clip=st.sampled_from([0.0, 0.01, 0.5, 2.0]),
    foreach=st.sampled_from([None, True, False]),
)
def test_clip_grad_value_matches_torch_and_bounds_elements(build, clip, foreach):
    ours, theirs = build(), build()
    gg.clip_grad_value_(ours, clip, foreach=foreach)
    if all(p.grad is None for p in theirs):
        # torch raises an internal error here; gradguard does nothing, as for the norm clip.
        with pytest.raises(RuntimeError):
            torch.nn.utils.clip_grad_value_(theirs, clip, foreach=foreach)
        return
    torch.nn.utils.clip_grad_value_(theirs, clip, foreach=foreach)
    assert_same_grads(grads(ours), grads(theirs))
    for p in ours:
        if p.grad is not None and p.grad.numel():
            assert p.grad.abs().max().item() <= torch.tensor(clip, dtype=p.grad.dtype).item()


def test_single_tensor_empty_list_and_none_grads_like_torch():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3) * 10
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    assert torch.equal(gg.clip_grad_norm_(p, 1.0), torch.nn.utils.clip_grad_norm_(q, 1.0))
    assert torch.equal(p.grad, q.grad)
    assert torch.equal(gg.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    nograd = [torch.nn.Parameter(torch.randn(2))]
    assert gg.clip_grad_norm_(nograd, 1.0).item() == 0.0
    assert gg.get_total_norm([]).item() == 0.0


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        gg.clip_grad_norm_((p for p in []), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.clip_grad_norm_([], 1.0)  # a list is not a generator: no warning, as in torch


def test_error_if_nonfinite_raises_torchs_message():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    q = torch.nn.Parameter(torch.randn(3))
    q.grad = p.grad.clone()
    with pytest.raises(RuntimeError) as ours:
        gg.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_([q], 1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.get_total_norm([p.grad], error_if_nonfinite=True)


def test_norm_clip_keeps_direction_and_bounds_norm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 4)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 50
    before = torch.cat([p.grad.flatten() for p in params])
    total = gg.clip_grad_norm_(params, 2.0)
    after = torch.cat([p.grad.flatten() for p in params])
    assert total.item() == pytest.approx(before.norm().item(), rel=1e-6)
    assert after.norm().item() == pytest.approx(2.0, rel=1e-5)
    cosine = torch.nn.functional.cosine_similarity(before, after, dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)


def test_return_stats_hands_back_the_per_tensor_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    expected = [p.grad.norm().item() for p in model.parameters()]
    stats = gg.clip_grad_norm_(model.named_parameters(), 0.1, return_stats=True)
    assert stats.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert stats.norms.tolist() == pytest.approx(expected, rel=1e-6)
    assert stats.total_norm.item() == pytest.approx(
        math.sqrt(sum(x * x for x in expected)), rel=1e-6
    )


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_tensor_norms_clips_each_tensor_alone(norm_type):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(6, 3)) for _ in range(4)]
    scales = [0.01, 0.5, 10.0, 100.0]
    for p, s in zip(params, scales, strict=True):
        p.grad = torch.randn_like(p) * s
    before = [p.grad.clone() for p in params]
    stats = gg.clip_tensor_norms_(params, 1.0, norm_type)
    for b, p, n in zip(before, params, stats.norms.tolist(), strict=True):
        original = torch.linalg.vector_norm(b, norm_type).item()
        assert n == pytest.approx(original, rel=1e-6)
        expected = b * min(1.0 / (original + 1e-6), 1.0)
        torch.testing.assert_close(p.grad, expected)
        assert torch.linalg.vector_norm(p.grad, norm_type).item() <= 1.0 + 1e-5


def test_clip_tensor_norms_mixed_dtypes():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    a.grad = torch.full((3,), 10.0)
    b.grad = torch.full((3,), 0.1, dtype=torch.float64)
    gg.clip_tensor_norms_([a, b], 1.0)
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(b.grad, torch.full((3,), 0.1, dtype=torch.float64))


def agc_reference(param, grad, clip_factor, eps):
    """AGC written out row by row in float64, straight from the paper's formula."""
    w = param.detach().double()
    g = grad.double()
    if w.ndim <= 1:
        rows_w, rows_g = [w.flatten()], [g.flatten()]
    else:
        rows_w, rows_g = list(w.flatten(1)), list(g.flatten(1))
    out = []
    for rw, rg in zip(rows_w, rows_g, strict=True):
        limit = clip_factor * max(rw.norm().item(), eps)
        gn = rg.norm().item()
        out.append(rg * (limit / max(gn, 1e-6)) if gn > limit else rg)
    return torch.stack(out).reshape(g.shape) if w.ndim > 1 else out[0].reshape(g.shape)


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 3), (7,), ()])
def test_adaptive_clip_grad_matches_formula_per_output_unit(shape):
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(shape))
    g = (
        torch.randn(shape)
        * torch.logspace(-3, 0, steps=shape[0] if shape else 1).reshape(
            (-1,) + (1,) * (len(shape) - 1)
        )
        if shape
        else torch.randn(()) * 0.5
    )
    p.grad = g.clone()
    expected = agc_reference(p, g, 0.05, 1e-3)
    gg.adaptive_clip_grad_([p], clip_factor=0.05, eps=1e-3)
    torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-8)


def test_adaptive_clip_grad_reduces_over_input_dims_not_output():
    # Row 0 has a huge gradient, row 1 a tiny one: only row 0 may change.
    p = torch.nn.Parameter(torch.ones(2, 4))
    p.grad = torch.tensor([[10.0] * 4, [1e-4] * 4])
    gg.adaptive_clip_grad_([p], clip_factor=0.01)
    assert torch.equal(p.grad[1], torch.full((4,), 1e-4))
    assert p.grad[0].norm().item() == pytest.approx(0.01 * 2.0, rel=1e-4)


class TestBadInput:
    def param(self, grad=None):
        p = torch.nn.Parameter(torch.randn(3))
        p.grad = torch.randn(3) if grad is None else grad
        return p

    @pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
    def test_max_norm(self, bad):
        with pytest.raises(ValueError, match="max_norm"):
            gg.clip_grad_norm_([self.param()], bad)
        with pytest.raises(ValueError, match="max_norm"):
            gg.clip_tensor_norms_([self.param()], bad)
        with pytest.raises(ValueError, match="max_norm"):
            gg.clip_grads_with_norm_([self.param()], bad, torch.tensor(1.0))

    @pytest.mark.parametrize("bad", [-0.5, float("nan")])
    def test_clip_value(self, bad):
        with pytest.raises(ValueError, match="clip_value"):
            gg.clip_grad_value_([self.param()], bad)

    def test_max_norm_type(self):
        with pytest.raises(TypeError, match="max_norm"):
            gg.clip_grad_norm_([self.param()], "big")

    @pytest.mark.parametrize("bad", [float("nan"), "l2", None])
    def test_norm_type(self, bad):
        with pytest.raises((ValueError, TypeError), match="norm_type"):
            gg.clip_grad_norm_([self.param()], 1.0, bad)

    def test_agc_arguments(self):
        with pytest.raises(ValueError, match="clip_factor"):
            gg.adaptive_clip_grad_([self.param()], clip_factor=0.0)
        with pytest.raises(ValueError, match="eps"):
            gg.adaptive_clip_grad_([self.param()], eps=-1.0)

    def test_non_tensor_parameters(self):
        with pytest.raises(TypeError, match=r"parameters\[1\]"):
            gg.clip_grad_norm_([self.param(), 3.0], 1.0)
        with pytest.raises(TypeError, match="parameters"):
            gg.clip_grad_norm_(42, 1.0)

    def test_sparse_grad_is_named(self):
        emb = torch.nn.Embedding(10, 3, sparse=True)
        emb(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(TypeError, match=r"'weight'.*sparse"):
            gg.clip_grad_norm_(emb.named_parameters(), 1.0)
        with pytest.raises(TypeError, match="sparse"):
            gg.measure(emb)

    def test_complex_grads_are_measured_like_torch(self):
        p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
        p.grad = torch.randn(4, dtype=torch.complex64)
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        assert torch.equal(gg.clip_grad_norm_([p], 0.1), torch.nn.utils.clip_grad_norm_([q], 0.1))
        assert torch.equal(p.grad, q.grad)
        with pytest.raises(TypeError, match="complex"):
            gg.adaptive_clip_grad_([p])
