"""Guard: skipping loses nothing, AMP, accumulation, fused folding, checkpoints, host syncs."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.schema import SkipReason
from tests.conftest import forbid_host_sync


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def loss_of(model, step):
    x, y = batch(step)
    return (model(x) - y).pow(2).mean()


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict()["state"])
    return params, state


def assert_same(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b, strict=True):
        assert torch.equal(x, y)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name, value in state_a[key].items():
            other = state_b[key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (key, name)
            else:
                assert value == other


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_nonfinite_steps_leave_params_and_optimizer_state_bit_for_bit(opt_name):
    model = make_model()
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    guard = gg.Guard(model)
    names = [n for n, _ in model.named_parameters()]
    rng = random.Random(7)
    bad_steps = {3, 9, 10, 17}
    for step in range(20):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        poisoned = None
        if step in bad_steps:
            index = rng.randrange(len(names))
            poisoned = names[index]
            grad = list(model.parameters())[index].grad
            grad.view(-1)[rng.randrange(grad.numel())] = rng.choice([float("nan"), float("inf")])
        before = snapshot(model, optimizer)
        result = guard.step(optimizer)
        after = snapshot(model, optimizer)
        if poisoned is not None:
            assert bool(result.skipped)
            assert result.reason_label == "nonfinite"
            assert result.nonfinite_names() == [poisoned]
            assert_same(before, after)
        else:
            assert not bool(result.skipped)
            assert not torch.equal(before[0][0], after[0][0])
    for p in model.parameters():
        assert torch.isfinite(p).all()


def test_clip_norm_guard_equals_clip_grad_norm_then_step():
    ours, theirs = make_model(), make_model()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    guard = gg.Guard(ours, gg.ClipNorm(0.05))
    for step in range(10):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss_of(model, step).backward()
        result = guard.step(opt_ours)
        total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        opt_theirs.step()
        assert torch.equal(result.total_norm, total)
        assert result.clip_coef.item() == pytest.approx(min(0.05 / (total.item() + 1e-6), 1.0))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps, fused: torch.optim.Adam(ps, lr=1e-2, fused=fused),
        lambda ps, fused: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused),
        lambda ps, fused: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=fused),
    ],
)
def test_fused_folding_equals_unfused(make_opt):
    models = {fused: make_model() for fused in (False, True)}
    optimizers = {fused: make_opt(models[fused].parameters(), fused) for fused in (False, True)}
    policy = lambda: gg.chain(gg.SkipNonFinite(), gg.ClipNorm(0.1))  # noqa: E731
    guards = {fused: gg.Guard(models[fused], policy()) for fused in (False, True)}
    for step in range(15):
        for fused in (False, True):
            optimizers[fused].zero_grad()
            loss_of(models[fused], step).backward()
            if step == 6:
                next(models[fused].parameters()).grad[0, 0] = float("nan")
            result = guards[fused].step(optimizers[fused])
            assert bool(result.skipped) == (step == 6)
    for a, b in zip(models[False].parameters(), models[True].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    state_a = optimizers[False].state_dict()["state"]
    state_b = optimizers[True].state_dict()["state"]
    for key in state_a:
        for name, value in state_a[key].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, state_b[key][name], rtol=1e-5, atol=1e-6)


def test_fused_path_makes_no_host_sync_even_with_skip_policies():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    guard = gg.Guard(model, gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_steps=2)), host_math=False)
    for step in range(5):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        if step == 0:  # before the optimizer has state, a skip is decided on the host
            guard.step(optimizer)
            continue
        with forbid_host_sync():
            guard.step(optimizer)


def test_plain_path_syncs_only_for_a_skip_decision():
    model = make_model()
    # Plain SGD: torch's own single-tensor Adam reads its step counter with .item().
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    guard = gg.Guard(model, gg.ZClip(warmup_steps=2), host_math=False)  # clips, never skips
    for step in range(4):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        with forbid_host_sync():
            guard.step(optimizer)
    skipping = gg.Guard(model, gg.SkipNonFinite(), host_math=False)
    optimizer.zero_grad()
    loss_of(model, 9).backward()
    with pytest.raises(AssertionError, match="host sync"), forbid_host_sync():
        skipping.step(optimizer)


def test_accumulation_clips_once_on_the_summed_gradients():
    ours, theirs = make_model(), make_model()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    guard = gg.Guard(ours, gg.ClipNorm(0.05))
    for micro in range(4):
        with guard.accumulating():
            (loss_of(ours, micro) / 4).backward()
            assert guard.step(opt_ours) is None  # no-op inside the block
        (loss_of(theirs, micro) / 4).backward()
        if micro < 3:
            assert guard.step(opt_ours, sync=False) is None
    result = guard.step(opt_ours)
    total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
    opt_theirs.step()
    assert torch.equal(result.total_norm, total)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_amp_scaler_unscales_once_and_measures_real_gradients():
    model, reference = make_model(), make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(model, gg.ClipNorm(1e9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, 0)
    scaler.scale(loss).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = loss_of(reference, 0)
    ref_loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    result = guard.step(optimizer, scaler)
    scaler.update()
    assert result.total_norm.item() == pytest.approx(expected.item(), rel=1e-4)
    # The user may unscale first (e.g. to log): the guard must not unscale twice.
    optimizer.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    scaler.unscale_(optimizer)
    manual = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    result = guard.step(optimizer, scaler)
    scaler.update()
    assert torch.equal(result.total_norm, manual)


def test_amp_overflow_agrees_with_the_scaler_and_changes_nothing():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(model)
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        guard.step(optimizer, scaler)
        scaler.update()
    optimizer.zero_grad()
    scaler.scale(loss_of(model, 3)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    before = snapshot(model, optimizer)
    scale_before = scaler.get_scale()
    result = guard.step(optimizer, scaler)
    scaler.update()
    assert bool(result.skipped)
    assert int(result.reason) == SkipReason.AMP_OVERFLOW
    assert_same(before, snapshot(model, optimizer))
    assert scaler.get_scale() < scale_before  # the scaler saw its own overflow


@pytest.mark.parametrize("fused", [False, True])
def test_guard_state_round_trip_gives_identical_decisions(fused):
    def run(guard, model, optimizer, steps):
        out = []
        for step in steps:
            optimizer.zero_grad()
            (loss_of(model, step) * (30.0 if step % 7 == 0 else 1.0)).backward()
            r = guard.step(optimizer)
            out.append((r.clip_coef.item(), bool(r.skipped), r.threshold.item()))
        return out

    policy = lambda: gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_steps=5), gg.SkipSpike(window=8))  # noqa: E731
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    guard = gg.Guard(model, policy())
    run(guard, model, optimizer, range(12))
    checkpoint = copy.deepcopy(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "guard": guard.state_dict()}
    )
    tail = run(guard, model, optimizer, range(12, 30))
    model2 = make_model(seed=5)
    model2.load_state_dict(checkpoint["model"])
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=1e-3, fused=fused)
    optimizer2.load_state_dict(checkpoint["opt"])
    guard2 = gg.Guard(model2, policy())
    guard2.load_state_dict(checkpoint["guard"])
    assert run(guard2, model2, optimizer2, range(12, 30)) == tail


def test_policy_transforms_and_per_tensor_scales_are_applied(tmp_path):
    policy = gg.chain(gg.ClipValue(1e-3), gg.ClipTensorNorm(1e-3), gg.ClipNorm(2e-3))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gg.Guard(model, policy, store=tmp_path / "run")
    (loss_of(model, 0) * 100).backward()
    result = guard.step(optimizer)
    guard.close()
    for p in model.parameters():
        assert p.grad.abs().max().item() <= 1e-3 + 1e-9
        assert p.grad.norm().item() <= 1e-3 * (1 + 1e-4)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert result.clipped_norm.item() == pytest.approx(after.item(), rel=1e-5)
    assert result.clipped_norm.item() < result.total_norm.item()
    # Without a recorder the extra pass over the gradients is not paid for.
    unrecorded = gg.Guard(model, policy)
    optimizer.zero_grad()
    (loss_of(model, 1) * 100).backward()
    assert unrecorded.step(optimizer).clipped_norm.isnan()


class TestBadInput:
    def test_no_parameters(self):
        with pytest.raises(ValueError, match="model"):
            gg.Guard(nn.ReLU())

    def test_not_a_policy(self):
        with pytest.raises(TypeError, match="policy"):
            gg.Guard(make_model(), policy=1.0)

    def test_step_without_gradients(self):
        model = make_model()
        with pytest.raises(ValueError, match="backward"):
            gg.Guard(model).step(torch.optim.SGD(model.parameters(), lr=0.1))


def test_monitor_policy_changes_nothing_but_still_measures():
    ours, theirs = make_model(), make_model()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-7)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=1e-7)
    guard = gg.Guard(ours, gg.Monitor())
    for step in range(5):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            (loss_of(model, step) * 1e4).backward()  # huge gradients: still not clipped
        result = guard.step(opt_ours)
        opt_theirs.step()
        assert result.clip_coef.item() == 1.0 and not bool(result.skipped)
        assert result.total_norm.item() > 1.0
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


class TestNamedErrors:
    """Bad input to the API fails with an error naming the argument (issue 16, item 7)."""

    def _stepped(self, **kwargs):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_of(model, 0).backward()
        return model, optimizer, gg.Guard(model, **kwargs)

    def test_step_without_an_optimizer(self):
        _, _, guard = self._stepped()
        with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
            guard.step(None)

    def test_scaler_of_the_wrong_type(self):
        _, optimizer, guard = self._stepped()
        with pytest.raises(TypeError, match="scaler"):
            guard.step(optimizer, "yes")

    def test_loss_that_is_not_a_scalar(self):
        _, optimizer, guard = self._stepped()
        with pytest.raises(ValueError, match="loss must be a scalar"):
            guard.step(optimizer, loss=torch.ones(3))
        with pytest.raises(TypeError, match="loss"):
            guard.step(optimizer, loss="0.5")

    def test_integer_gradients(self):
        weight = torch.zeros(3, dtype=torch.long)
        weight.grad = torch.ones(3, dtype=torch.long)
        with pytest.raises(TypeError, match=r"parameters\[0\].*dtype torch.int64"):
            gg.Guard([weight]).measure()

    def test_health_of_the_wrong_type(self):
        with pytest.raises(TypeError, match="health"):
            gg.Guard(make_model(), health="yes")

    @pytest.mark.parametrize("bad", [0, -5, 2.5])
    def test_log_every_checked_without_a_store(self, bad):
        with pytest.raises((TypeError, ValueError), match="log_every"):
            gg.Guard(make_model(), log_every=bad)

    def test_load_state_dict_names_what_is_missing_or_wrong(self):
        guard = gg.Guard(make_model())
        with pytest.raises(KeyError, match=r"lacks \['policy', 'step'\]"):
            guard.load_state_dict({})
        state = guard.state_dict()
        with pytest.raises(ValueError, match="step"):
            guard.load_state_dict({**state, "step": -1})
        with pytest.raises(TypeError, match="state_dict must be a dict"):
            guard.load_state_dict([])

    def test_nan_policy_state_is_refused(self):
        model, optimizer, guard = self._stepped(policy=gg.ZClip(warmup_steps=2))
        guard.step(optimizer)
        state = guard.state_dict()
        state["policy"]["mean"] = torch.tensor(float("nan"))
        with pytest.raises(ValueError, match="ZClip: mean holds NaN"):
            gg.Guard(model, gg.ZClip(warmup_steps=2)).load_state_dict(state)

    def test_an_optimizer_with_other_parameters_is_named_at_the_first_step(self):
        model = make_model()
        extra = nn.Linear(3, 3)
        optimizer = torch.optim.SGD([*model.parameters(), *extra.parameters()], lr=0.1)
        loss_of(model, 0).backward()
        extra(torch.randn(2, 3)).sum().backward()
        with pytest.raises(ValueError, match="optimizer: it updates 2 parameter"):
            gg.Guard(model).step(optimizer)

    def test_parameters_the_optimizer_does_not_update_are_a_warning(self):
        model = make_model()
        optimizer = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
        loss_of(model, 0).backward()
        with pytest.warns(RuntimeWarning, match="not updated by this optimizer"):
            gg.Guard(model).step(optimizer)

    def test_two_steps_without_a_backward(self):
        model, optimizer, guard = self._stepped()
        guard.step(optimizer)
        with pytest.raises(RuntimeError, match="no backward since"):
            guard.step(optimizer)
        optimizer.zero_grad()
        loss_of(model, 1).backward()
        assert guard.step(optimizer) is not None

    def test_threshold_beyond_float32_fails_at_construction(self):
        for make in (
            lambda: gg.ClipNorm(1e39),
            lambda: gg.ZClip(max_norm=1e39),
            lambda: gg.ClipValue(1e39),
        ):
            with pytest.raises(ValueError, match="float32"):
                make()
        gg.clip_grad_norm_(make_model().parameters(), 1e39)  # the drop-in accepts what torch does

    def test_numpy_and_tensor_integers_are_integers(self):
        import numpy as np

        gg.Guard(make_model(), log_every=np.int64(10))
        assert gg.ZClip(warmup_steps=torch.tensor(5)).warmup_steps == 5
        assert gg.SkipSpike(window=np.int32(8), min_history=np.int64(4)).window == 8
        with pytest.raises(TypeError, match="warmup_steps"):
            gg.ZClip(warmup_steps=torch.tensor(5.0))


def test_gradient_noise_with_a_steep_decay_fades_out():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = gg.Guard(model, gg.GradientNoise(gamma=300.0, seed=0))
    for step in range(30):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        before = [p.grad.clone() for p in model.parameters()]
        guard.step(optimizer)
    assert guard.policy.std(29) == 0.0
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))


def test_mixed_fp64_and_bf16_gradients_are_measured_in_a_common_dtype():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    model[0].double()
    model[1].bfloat16()
    x = torch.randn(5, 4, dtype=torch.float64)
    model[1](model[0](x).bfloat16()).float().sum().backward()
    expected = torch.stack([p.grad.double().norm() for p in model.parameters()]).norm()
    guard = gg.Guard(model)
    result = guard.step(torch.optim.SGD(model.parameters(), lr=0.1))  # may clip in place
    assert result.total_norm.item() == pytest.approx(expected.item(), rel=1e-2)
    assert result.stats.norms.dtype == torch.float64


@pytest.mark.parametrize("host_math", [True, False])
def test_a_loss_that_still_requires_grad_is_taken_without_a_warning(host_math):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = gg.Guard(model, host_math=host_math)
    loss = loss_of(model, 0)
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor with grad becomes a float
        result = guard.step(optimizer, loss=loss)
    assert float(result.inputs.loss) == pytest.approx(loss.item())
