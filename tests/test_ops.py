"""One policy update, several back-ends: host math (NumPy) and device math (torch) take
the same decisions (bit for bit where only + - * / are involved: torch's CPU ``sqrt`` and
``log10`` are not always correctly rounded, NumPy's are), and the host shortcuts round
like the ufuncs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.ops import NUMPY, TORCH
from gradguard.policies import StepInputs

POLICIES = {
    "ClipNorm": lambda: gg.ClipNorm(0.7),
    "ClipTensorNorm": lambda: gg.ClipTensorNorm(0.3),
    "SkipNonFinite": gg.SkipNonFinite,
    "ZClip": lambda: gg.ZClip(warmup_steps=6),
    "ZClip capped": lambda: gg.ZClip(warmup_steps=6, max_norm=3.0, warmup_max_norm=1.5),
    "AutoClip": lambda: gg.AutoClip(percentile=30.0),
    "AutoClip binned": lambda: gg.AutoClip(percentile=70.0, exact_until=12),
    "AutoClip window": lambda: gg.AutoClip(percentile=50.0, history=9),
    "SkipSpike": lambda: gg.SkipSpike(sigma=3.0, window=10, min_history=4),
    "AdaptiveTensorClip": lambda: gg.AdaptiveTensorClip(warmup_steps=5, warmup_max_norm=2.0),
    "default": gg.default_policy,
}


def trajectory(seed: int, steps: int = 60) -> list[list[float]]:
    """Per-step norms of three tensors: log-normal, with spikes, NaN and inf."""
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.normal(0.0, 0.6, size=(steps, 3))).astype(np.float32).tolist()
    rows[20] = [40.0, 1.0, 2.0]
    rows[31][1] = math.nan
    rows[32][0] = math.inf
    rows[45] = [9.0, 9.0, 9.0]
    return rows


def run(policy, rows, xp) -> list[tuple]:
    out = []
    for step, row in enumerate(rows):
        norms = torch.tensor(row, dtype=torch.float32)
        total = torch.linalg.vector_norm(norms)
        if xp is NUMPY:
            inputs = StepInputs(NUMPY.f32(total.item()), norms.numpy(), NUMPY, step)
        else:
            inputs = StepInputs(total, norms, TORCH, step)
        d = policy.decide(inputs)
        out.append(
            tuple(
                None if v is None else np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
                for v in d.arrays()
            )
        )
    return out


#: Policies whose updates use only correctly rounded operations.
EXACT = {"ClipNorm", "ClipTensorNorm", "SkipNonFinite", "AutoClip", "AutoClip window"}


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_host_and_device_math_decide_alike(name, seed):
    rows = trajectory(seed)
    host, device = run(POLICIES[name](), rows, NUMPY), run(POLICIES[name](), rows, TORCH)
    for step, (h, d) in enumerate(zip(host, device, strict=True)):
        for field, x, y in zip(("scale", "tensor_scale", "skip", "reason", "threshold"), h, d):
            assert (x is None) == (y is None), (step, field)
            if x is None:
                continue
            assert x.dtype == y.dtype, (step, field)
            if name in EXACT or x.dtype == bool:
                np.testing.assert_array_equal(x, y, err_msg=f"step {step}, {field}")
            else:
                np.testing.assert_allclose(x, y, rtol=1e-6, err_msg=f"step {step}, {field}")


@pytest.mark.parametrize("name", ["ZClip", "AutoClip binned", "SkipSpike", "AdaptiveTensorClip"])
def test_state_moves_between_host_and_device_mid_run(name):
    """A checkpoint taken on one path resumes on the other with the same decisions."""
    rows = trajectory(3)
    reference = run(POLICIES[name](), rows, NUMPY)
    first = POLICIES[name]()
    run(first, rows[:25], NUMPY)
    second = POLICIES[name]()
    second.load_state_dict(first.state_dict())
    tail = run(second, rows[25:], TORCH)
    for x, y in zip(reference[25:], tail, strict=True):
        for a, b in zip(x, y):
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "value", [0.0, -0.0, 1.5, 3e38, 1e-45, math.inf, -math.inf, math.nan, -2.0, 7.25e-3]
)
def test_host_scalar_shortcuts_round_like_the_ufuncs(value):
    x = np.float32(value)
    other = np.float32(0.3)
    with np.errstate(all="ignore"):
        pairs = [
            (NUMPY.sqrt(x), np.sqrt(x)),
            (NUMPY.reciprocal(x), np.reciprocal(x)),
            (NUMPY.minimum(x, other), np.minimum(x, other)),
            (NUMPY.maximum(x, other), np.maximum(x, other)),
            (NUMPY.minimum(x, 0.1), np.minimum(x, np.float32(0.1))),
            (NUMPY.isfinite(x), np.isfinite(x)),
            (NUMPY.isnan(x), np.isnan(x)),
            (NUMPY.logical_not(NUMPY.isfinite(x)), np.logical_not(np.isfinite(x))),
            (NUMPY.where(NUMPY.isfinite(x), x, 0.0), np.where(np.isfinite(x), x, np.float32(0))),
        ]
    for got, want in pairs:
        assert type(got) is type(np.asarray(want)[()]), (got, want)
        np.testing.assert_array_equal(got, want)


def test_device_cond_runs_both_branches_and_selects():
    seen = []

    def branch(tag):
        def run(x):
            seen.append(tag)
            return (x * 2 if tag == "a" else x * 3), 7

        return run

    x = torch.tensor(2.0)
    out, counter = TORCH.cond(torch.tensor(True), branch("a"), branch("b"), x)
    assert sorted(seen) == ["a", "b"] and out.item() == 4.0 and counter == 7
    seen.clear()
    out, _ = NUMPY.cond(np.bool_(False), branch("a"), branch("b"), np.float32(2.0))
    assert seen == ["b"] and out == 6.0
