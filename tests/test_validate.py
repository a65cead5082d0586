"""Argument fuzzing: every public constructor either accepts a value or raises a
``TypeError``/``ValueError`` naming the argument, never an internal error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg
from gradguard import _validate as check

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e39, -1e39, 3.5e38, 1e-320, 0.5, 7, 1000]),
    st.text(max_size=4),
    st.builds(np.int64, st.integers(-100, 100)),
    st.builds(np.float32, st.floats(-1e3, 1e3)),
    st.builds(lambda v: torch.tensor(v), st.integers(-5, 50)),
    st.builds(lambda v: torch.tensor([v, v]), st.floats(0, 5)),
    st.lists(st.integers(0, 3), max_size=2),
)

#: (factory, argument) pairs: each factory takes the fuzzed value as that argument.
ARGUMENTS = [
    (lambda v: gg.ClipNorm(v), "max_norm"),
    (lambda v: gg.ClipNorm(1.0, norm_type=v), "norm_type"),
    (lambda v: gg.ClipValue(v), "clip_value"),
    (lambda v: gg.ClipTensorNorm(v), "max_norm"),
    (lambda v: gg.AGC(clip_factor=v), "clip_factor"),
    (lambda v: gg.AGC(eps=v), "eps"),
    (lambda v: gg.AutoClip(percentile=v), "percentile"),
    (lambda v: gg.AutoClip(history=v), "history"),
    (lambda v: gg.AutoClip(exact_until=v), "exact_until"),
    (lambda v: gg.ZClip(alpha=v), "alpha"),
    (lambda v: gg.ZClip(z_thresh=v), "z_thresh"),
    (lambda v: gg.ZClip(warmup_steps=v), "warmup_steps"),
    (lambda v: gg.ZClip(max_norm=v), "max_norm"),
    (lambda v: gg.ZClip(warmup_max_norm=v), "warmup_max_norm"),
    (lambda v: gg.ZClip(eps=v), "eps"),
    (lambda v: gg.AdaptiveTensorClip(relative=v), "relative"),
    (lambda v: gg.AdaptiveTensorClip(beta=v), "beta"),
    (lambda v: gg.AdaptiveTensorClip(warmup_steps=v), "warmup_steps"),
    (lambda v: gg.SkipSpike(sigma=v), "sigma"),
    (lambda v: gg.SkipSpike(window=v), "window"),
    (lambda v: gg.SkipSpike(window=64, min_history=v), "min_history"),
    (lambda v: gg.GradientNoise(eta=v, seed=0), "eta"),
    (lambda v: gg.GradientNoise(gamma=v, seed=0), "gamma"),
    (lambda v: gg.Guard(torch.nn.Linear(2, 2), log_every=v), "log_every"),
    (lambda v: gg.Guard(torch.nn.Linear(2, 2), norm_type=v), "norm_type"),
    (lambda v: gg.Guard(torch.nn.Linear(2, 2), health=v), "health"),
    (lambda v: gg.Guard(torch.nn.Linear(2, 2), fold_fused=v), "fold_fused"),
    (lambda v: gg.Guard(torch.nn.Linear(2, 2), accumulate_dtype=v), "accumulate_dtype"),
]


@pytest.mark.parametrize(
    ("make", "name"), ARGUMENTS, ids=[f"{i}-{a}" for i, (_, a) in enumerate(ARGUMENTS)]
)
@settings(max_examples=40, deadline=None)
@given(value=VALUES)
def test_a_bad_argument_is_named(make, name, value):
    try:
        make(value)
    except (TypeError, ValueError) as error:
        assert name in str(error), (name, value, error)


@settings(max_examples=60, deadline=None)
@given(value=VALUES)
def test_guard_step_arguments_are_named(value):
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    guard = gg.Guard(model)
    for call, name in (
        (lambda: guard.step(value), "optimizer"),
        (lambda: guard.step(optimizer, value), "scaler"),
        (lambda: guard.process(loss=value), "loss"),
        (lambda: guard.process(lr=value), "lr"),
    ):
        try:
            result = call()
        except (TypeError, ValueError) as error:
            assert name in str(error), (name, value, error)
        else:
            assert result is None or isinstance(result, gg.StepResult)
        for p in model.parameters():  # a fresh backward for the next call
            p.grad = torch.randn_like(p)


def test_integer_arguments_accept_numpy_and_tensor_integers():
    for value in (5, np.int64(5), np.int32(5), torch.tensor(5), torch.tensor([5])):
        assert check.positive_int("n", value) == 5
    for value in (5.0, True, torch.tensor(5.0), np.float64(5.0), "5"):
        with pytest.raises(TypeError, match="n must be an int"):
            check.positive_int("n", value)


def test_policy_thresholds_stay_within_float32():
    assert check.non_negative("max_norm", 3.4e38, float32=True) == 3.4e38
    with pytest.raises(ValueError, match="max_norm must be at most"):
        check.non_negative("max_norm", 1e39, float32=True)
    with pytest.raises(ValueError, match="eps must be at most"):
        check.positive("eps", 1e39, float32=True)
    assert check.non_negative("max_norm", 1e39) == 1e39  # elsewhere no float32 bound


def test_norm_types_as_torch_for_the_drop_ins():
    assert check.norm_type(-0.1, like_torch=True) == -0.1
    assert math.isinf(check.norm_type("-inf", like_torch=True))
    with pytest.raises(ValueError, match="norm_type"):
        check.norm_type(-0.1)
    with pytest.raises(ValueError, match="norm_type"):
        check.norm_type(float("nan"), like_torch=True)
