"""Policies on plain tensors: hand-computed trajectories, state round trips, bad input."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.policies import Decision
from gradguard.schema import SkipReason
from tests.conftest import forbid_host_sync


def stats_for(total: float, n: int = 1):
    """GradStats of n tensors whose global norm is ``total`` (equal split)."""
    params = []
    for _ in range(n):
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.tensor([float(total) / math.sqrt(n)], dtype=torch.float32)
        params.append(p)
    return gg.measure(params), params


def run(policy, norms):
    """Feed a norm trajectory; return per-step (scale, skip, threshold) as floats."""
    out = []
    for value in norms:
        stats, params = stats_for(value)
        d = policy.decide(stats, params)
        out.append(
            (
                1.0 if d.scale is None else d.scale.item(),
                False if d.skip is None else bool(d.skip),
                math.inf if d.threshold is None else d.threshold.item(),
            )
        )
    return out


def test_clip_norm_coefficient_is_torchs():
    stats, params = stats_for(5.0)
    d = gg.ClipNorm(2.0).decide(stats, params)
    assert d.scale.item() == pytest.approx(2.0 / (5.0 + 1e-6))
    assert d.threshold.item() == 2.0
    stats, params = stats_for(1.0)
    assert gg.ClipNorm(2.0).decide(stats, params).scale.item() == 1.0


def test_clip_norm_refuses_a_different_norm_type():
    stats, params = stats_for(1.0)
    with pytest.raises(ValueError, match="norm_type"):
        gg.ClipNorm(1.0, norm_type=1.0).decide(stats, params)


def test_autoclip_follows_numpy_percentile_of_all_past_norms():
    rng = np.random.default_rng(0)
    norms = list(rng.lognormal(0.0, 1.0, size=60))
    norms[20] = math.nan  # never enters the history
    steps = run(gg.AutoClip(percentile=25.0), norms)
    history = []
    for value, (scale, _, threshold) in zip(norms, steps, strict=True):
        if math.isfinite(value):
            history.append(value)
        expected = np.percentile(history, 25.0)
        assert threshold == pytest.approx(expected, rel=1e-5)
        if math.isfinite(value):
            assert scale == pytest.approx(min(expected / (value + 1e-6), 1.0), rel=1e-5)


def test_autoclip_unbounded_history_stays_within_a_bin_of_exact_in_constant_memory():
    rng = np.random.default_rng(5)
    norms = list(rng.lognormal(-1.0, 1.5, size=3000))
    norms[100] = math.nan
    norms[2000] = math.inf
    policy = gg.AutoClip(percentile=10.0, exact_until=64)
    steps = run(policy, norms)
    finite = [v for v in norms if math.isfinite(v)]
    for checkpoint in (63, 500, 2999):
        seen = [v for v in norms[: checkpoint + 1] if math.isfinite(v)]
        exact = np.percentile(seen, 10.0)
        assert steps[checkpoint][2] == pytest.approx(exact, rel=0.015), checkpoint
    state = policy.state_dict()
    assert state["buffer"] is None and state["bins"].numel() == 4000
    assert state["bins"].sum().item() == len(finite)


def test_autoclip_window_keeps_only_recent_norms():
    norms = [100.0] * 10 + [1.0] * 10
    steps = run(gg.AutoClip(percentile=50.0, history=5), norms)
    assert steps[-1][2] == pytest.approx(1.0)
    assert steps[9][2] == pytest.approx(100.0)


def zclip_reference(norms, alpha=0.97, z=2.5, warmup=25, eps=1e-6):
    """ZClip written from the paper's formulas, on floats."""
    buffer, mean, var, scales = [], None, None, []
    for g in norms:
        if not math.isfinite(g):
            scales.append(None)
            continue
        if mean is None:
            buffer.append(g)
            if len(buffer) == warmup:
                mean = sum(buffer) / warmup
                var = sum((x - mean) ** 2 for x in buffer) / warmup
            scales.append(1.0)
            continue
        std = var**0.5
        score = (g - mean) / (std + eps)
        effective = g
        if score > z:
            effective = mean + z * z * std / score
        scales.append(min(effective / (g + 1e-6), 1.0))
        mean = alpha * mean + (1 - alpha) * effective
        var = alpha * var + (1 - alpha) * (effective - mean) ** 2
    return scales


def test_zclip_matches_reference_trajectory_and_ignores_nonfinite():
    rng = np.random.default_rng(1)
    norms = list(1.0 + 0.1 * rng.standard_normal(80))
    norms[40] = 25.0  # spike
    norms[55] = math.inf
    norms[60] = math.nan
    norms[70] = 8.0
    expected = zclip_reference(norms)
    steps = run(gg.ZClip(), norms)
    for got, want in zip(steps, expected, strict=True):
        if want is not None:
            assert got[0] == pytest.approx(want, rel=1e-4)
    assert steps[40][0] < 0.1 and steps[70][0] < 0.5


def test_zclip_caps_warmup_and_hard_cap():
    steps = run(gg.ZClip(warmup_steps=5, warmup_max_norm=2.0), [10.0] * 3)
    assert steps[0][0] == pytest.approx(0.2, rel=1e-5)
    capped = run(gg.ZClip(warmup_steps=2, max_norm=3.0), [1.0, 1.1, 1.05, 50.0])
    assert capped[-1][0] <= 3.0 / 50.0 + 1e-6


def test_zclip_takes_warmup_statistics_from_the_capped_norms():
    policy = gg.ZClip(warmup_steps=3, warmup_max_norm=10.0)
    steps = run(policy, [100.0, 200.0, 300.0])
    assert [s[0] for s in steps] == pytest.approx([0.1, 0.05, 10.0 / 300.0], rel=1e-4)
    assert float(policy.state_dict()["mean"]) == pytest.approx(10.0)  # not 200: what was applied
    uncapped = gg.ZClip(warmup_steps=3)
    run(uncapped, [100.0, 200.0, 300.0])
    assert float(uncapped.state_dict()["mean"]) == pytest.approx(200.0)


def test_adaptive_tensor_clip_trajectory():
    policy = gg.AdaptiveTensorClip(relative=1.5, beta=0.5, warmup_steps=2, warmup_max_norm=None)
    p = torch.nn.Parameter(torch.zeros(1))
    q = torch.nn.Parameter(torch.zeros(1))
    values = [(1.0, 2.0), (1.0, 2.0), (1.0, 10.0), (1.0, float("nan"))]
    ema = None
    for a, b in values:
        p.grad, q.grad = torch.tensor([a]), torch.tensor([b])
        d = policy.decide(gg.measure([p, q]), [p, q])
        if ema is None:
            ema = [a, b]
            assert d.tensor_scale is None
            ema = [0.5 * e + 0.5 * v for e, v in zip(ema, (a, b), strict=True)]
            continue
        if d.tensor_scale is None:  # still warming up
            ema = [0.5 * e + 0.5 * v for e, v in zip(ema, (a, b), strict=True)]
            continue
        coef = d.tensor_scale.tolist()
        for i, v in enumerate((a, b)):
            if math.isfinite(v):
                want = min(1.5 * ema[i] / (v + 1e-6), 1.0)
                assert coef[i] == pytest.approx(want, rel=1e-5)
                ema[i] = 0.5 * ema[i] + 0.5 * v * want
            else:
                assert coef[i] == 1.0
    assert policy.state_dict()["ema"].tolist()[1] == pytest.approx(ema[1], rel=1e-5)


def test_skip_nonfinite():
    stats, params = stats_for(float("nan"))
    d = gg.SkipNonFinite().decide(stats, params)
    assert bool(d.skip) and int(d.reason) == SkipReason.NONFINITE
    stats, params = stats_for(1.0)
    assert not bool(gg.SkipNonFinite().decide(stats, params).skip)


def test_skip_spike_skips_outliers_and_recovers_from_a_regime_change():
    rng = np.random.default_rng(2)
    norms = list(1.0 + 0.05 * rng.standard_normal(60))
    norms[45], norms[47] = 20.0, 15.0  # a cluster: the first spike must not hide the second
    norms += [5.0 + 0.05 * x for x in rng.standard_normal(60)]  # lasting 5x shift at step 60
    steps = run(gg.SkipSpike(sigma=6.0, window=32), norms)
    skipped = [i for i, s in enumerate(steps) if s[1]]
    assert skipped[:2] == [45, 47]
    shift = [i for i in skipped if i >= 60]
    assert 0 < len(shift) <= 12, shift  # some skips, then the new scale is accepted
    assert not any(s[1] for s in steps[80:])


def test_skip_spike_ignores_nonfinite_in_history():
    norms = [1.0, 1.1, 0.9] * 10 + [math.nan, math.inf] + [1.0, 30.0]
    steps = run(gg.SkipSpike(window=64, min_history=10), norms)
    assert steps[-1][1] is True
    assert steps[-4][1] is False  # NaN itself is not the spike rule's business


def test_chain_composes_scales_skips_and_thresholds():
    stats, params = stats_for(10.0, n=2)
    policy = gg.chain(gg.SkipNonFinite(), gg.ClipNorm(5.0), gg.ClipNorm(2.0))
    d = policy.decide(stats, params)
    assert d.scale.item() == pytest.approx((5 / (10 + 1e-6)) * min(2 / (10 + 1e-6), 1), rel=1e-6)
    assert d.threshold.item() == 2.0
    assert not bool(d.skip)
    with pytest.raises(ValueError, match="policies"):
        gg.chain()
    with pytest.raises(TypeError, match=r"policies\[1\]"):
        gg.chain(gg.ClipNorm(1.0), "clip")


def decisions_after(policy, norms):
    return [(s, k, t) for s, k, t in run(policy, norms)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: gg.AutoClip(percentile=30.0),
        lambda: gg.AutoClip(percentile=30.0, history=7),
        lambda: gg.AutoClip(percentile=30.0, exact_until=15),  # switches to bins mid-run
        lambda: gg.ZClip(warmup_steps=5),
        lambda: gg.SkipSpike(window=16, min_history=4),
        lambda: gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_steps=4), gg.SkipSpike(window=8)),
    ],
)
def test_state_round_trip_mid_run_gives_identical_decisions(make):
    rng = np.random.default_rng(3)
    norms = list(rng.lognormal(0.0, 0.5, size=40))
    norms[12], norms[30] = 40.0, math.nan
    original = make()
    run(original, norms[:20])
    saved = original.state_dict()
    tail = run(original, norms[20:])
    resumed = make()
    resumed.load_state_dict(saved)
    assert repr(run(resumed, norms[20:])) == repr(tail)  # repr: NaN == NaN


def test_policies_make_no_host_sync():
    policy = gg.chain(
        gg.SkipNonFinite(),
        gg.ZClip(warmup_steps=2, max_norm=10.0),
        gg.SkipSpike(window=4, min_history=2),
        gg.AutoClip(history=8),
        gg.AutoClip(exact_until=2),  # binned after two steps
        gg.ClipTensorNorm(3.0),
        gg.AdaptiveTensorClip(warmup_steps=1),
    )
    stats_list = [stats_for(v, n=3) for v in (1.0, 2.0, 1.5, 30.0, 1.2)]
    with forbid_host_sync():
        for stats, params in stats_list:
            d = policy.decide(stats, params)
    assert isinstance(d, Decision)


class TestBadInput:
    @pytest.mark.parametrize(
        ("make", "name"),
        [
            (lambda: gg.ClipNorm(-1.0), "max_norm"),
            (lambda: gg.ClipNorm(float("nan")), "max_norm"),
            (lambda: gg.ClipValue(-0.1), "clip_value"),
            (lambda: gg.ClipTensorNorm(float("inf")), "max_norm"),
            (lambda: gg.AGC(clip_factor=0.0), "clip_factor"),
            (lambda: gg.AutoClip(percentile=150.0), "percentile"),
            (lambda: gg.AutoClip(history=0), "history"),
            (lambda: gg.AutoClip(exact_until=0), "exact_until"),
            (lambda: gg.ZClip(alpha=1.0), "alpha"),
            (lambda: gg.ZClip(z_thresh=-1.0), "z_thresh"),
            (lambda: gg.ZClip(warmup_steps=0), "warmup_steps"),
            (lambda: gg.AdaptiveTensorClip(relative=0.5), "relative"),
            (lambda: gg.AdaptiveTensorClip(beta=0.0), "beta"),
            (lambda: gg.SkipSpike(sigma=0.0), "sigma"),
            (lambda: gg.SkipSpike(window=10, min_history=11), "min_history"),
        ],
    )
    def test_invalid_hyper_parameters_fail_at_construction(self, make, name):
        with pytest.raises(ValueError, match=name):
            make()

    def test_wrong_types(self):
        with pytest.raises(TypeError, match="max_norm"):
            gg.ClipNorm("1.0")
        with pytest.raises(TypeError, match="warmup_steps"):
            gg.ZClip(warmup_steps=2.5)

    @pytest.mark.parametrize(
        "policy", [gg.ClipNorm(1.0), gg.ZClip(), gg.AutoClip(), gg.SkipNonFinite(), gg.AGC()]
    )
    def test_empty_gradient_list_is_named(self, policy):
        p = torch.nn.Parameter(torch.zeros(2))
        stats = gg.measure([p])
        with pytest.raises(ValueError, match="no gradients"):
            policy.decide(stats, [p])

    def test_load_foreign_state(self):
        with pytest.raises(KeyError, match="lacks"):
            gg.ZClip().load_state_dict({"_buffer": None})


class LossState(NamedTuple):
    best: Any  # the lowest finite loss so far


class SkipLossJump(gg.Policy):
    """README's loss-aware policy: skip a step whose loss is over 10x the lowest seen."""

    State = LossState

    def init(self, inputs, xp):
        return LossState(xp.scalar(math.inf, inputs.total_norm))

    def update(self, state, inputs, xp):
        loss = inputs.loss
        best = xp.where(xp.isfinite(loss), xp.minimum(state.best, loss), state.best)
        skip = loss > 10 * state.best
        return Decision(skip=skip, reason=xp.code(SkipReason.POLICY, loss)), LossState(best)


@pytest.mark.parametrize("host_math", [True, False])
def test_a_policy_can_see_the_loss_the_lr_and_the_step(host_math):
    seen = []

    class Spy(gg.Policy):
        def update(self, state, inputs, xp):
            seen.append((float(inputs.loss), inputs.lr, inputs.step))
            return Decision(), state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, gg.chain(Spy(), SkipLossJump()), host_math=host_math)
    skipped = []
    for scale in [1.0, 1.0, 1.0, 100.0, 1.0]:
        optimizer.zero_grad()
        loss = model(torch.randn(8, 3)).pow(2).mean() * scale
        loss.backward()
        skipped.append(guard.step(optimizer, loss=loss).is_skipped())
    assert skipped == [False, False, False, True, False]
    assert [s for _, _, s in seen] == [0, 1, 2, 3, 4]
    assert all(lr == pytest.approx(0.05) for _, lr, _ in seen)
    assert seen[3][0] > 10 * min(v for v, _, _ in seen[:3])
    state = guard.policy.policies[1].state_dict()
    assert float(state["best"]) == pytest.approx(min(v for v, _, _ in seen if v < 1e3))
