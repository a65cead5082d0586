"""What the integrations share: skipped steps change nothing, one rule for modes and losses."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from gradguard import ClipNorm, FeedbackClip, Guard, Monitor, SkipNonFinite, chain
from gradguard.integrations._core import HookStep, check_skippable, innermost
from gradguard.policies import Chain

torch.set_num_threads(1)

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "adamw-single": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
}


def backward(model: nn.Module, poison: bool = False) -> None:
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    (loss * float("nan") if poison else loss).backward()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_skipped_step_changes_nothing_and_gradients_come_back(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = OPTIMIZERS[name](model.parameters())
    hook = HookStep(Guard(model, chain(SkipNonFinite(), ClipNorm(0.5)), health=False))
    for _ in range(2):  # build optimizer state first
        backward(model)
        assert hook.run(optimizer) is not None and not hook.skipped_last
        optimizer.step()
        optimizer.zero_grad()
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    backward(model, poison=True)
    grads = [p.grad for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="skipped"):
        result = hook.run(optimizer)
    assert hook.skipped_last and bool(result.skipped)
    optimizer.step()  # what the framework does next
    after = (model.state_dict(), optimizer.state_dict())
    assert all(torch.equal(before[0][k], after[0][k]) for k in after[0])
    for k, state in after[1]["state"].items():
        assert all(torch.equal(before[1]["state"][k][s], state[s]) for s in state)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # given back
    optimizer.zero_grad()
    backward(model)
    hook.run(optimizer)
    optimizer.step()
    assert not torch.equal(before[0]["0.weight"], model.state_dict()["0.weight"])


def test_clipping_at_the_hook_equals_torch_clip_grad_norm():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    hook = HookStep(Guard(model, ClipNorm(0.1), health=False))
    x = torch.randn(8, 4)
    model(x).sum().backward()
    twin(x).sum().backward()
    result = hook.run(torch.optim.SGD(model.parameters(), lr=0.1))
    total = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    assert torch.equal(result.total_norm, total)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_observe_changes_nothing_and_no_gradients_is_a_no_op():
    model = nn.Linear(3, 1)
    hook = HookStep(Guard(model, Monitor(), health=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert hook.run(optimizer) is None  # no backward yet
    model(torch.randn(2, 3) * 1e6).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    result = hook.run(optimizer)
    assert not hook.skipped_last and float(result.clip_coef) == 1.0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_wrapped_optimizers_are_unwrapped_and_lbfgs_refused():
    model = nn.Linear(2, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert innermost(Wrapper(Wrapper(inner))) is inner
    with pytest.raises(TypeError, match="optimizer"):
        innermost(object())
    with pytest.raises(TypeError, match="LBFGS"):
        check_skippable(torch.optim.LBFGS(model.parameters()))


def test_importing_gradguard_and_the_integrations_package_loads_no_framework():
    code = (
        "import sys, gradguard, gradguard.integrations, gradguard.integrations._core\n"
        "names = ('lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'deepspeed')\n"
        "print([n for n in names if n in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_one_rule_for_modes_in_every_integration():
    from gradguard.integrations._core import resolve_policy

    clip = ClipNorm(1.0)
    policy, monitoring = resolve_policy(None, None, clip, "max_grad_norm=1")
    assert monitoring and policy is clip  # the framework clips; gradguard describes it
    policy, monitoring = resolve_policy(None, False, clip, "max_grad_norm=1")
    assert not monitoring and isinstance(policy, Chain)
    assert [type(p).__name__ for p in policy.policies] == ["SkipNonFinite", "ClipNorm"]
    policy, monitoring = resolve_policy(None, None, None, "")
    assert not monitoring and "FeedbackClip" in repr(policy)  # nothing clipped before: the default
    mine = ClipNorm(5.0)
    with pytest.warns(RuntimeWarning, match=r"max_grad_norm=1\) is turned off.*ClipNorm\(1.0\)"):
        assert resolve_policy(mine, None, clip, "max_grad_norm=1") == (mine, False)
    kept = chain(SkipNonFinite(), ClipNorm(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's policy already clips there: no warning
        assert resolve_policy(kept, None, clip, "max_grad_norm=1") == (kept, False)
    policy, monitoring = resolve_policy(None, True, None, "")
    assert monitoring and isinstance(policy, Monitor)


def test_loss_window_sums_or_averages_on_the_device():
    from gradguard.integrations._core import LossWindow

    total = LossWindow(mean=False)
    for value in (0.5, 0.25):
        total.add(torch.tensor(value, requires_grad=True) * 1)
    taken = total.take()
    assert isinstance(taken, torch.Tensor) and not taken.requires_grad and float(taken) == 0.75
    assert total.take() is None  # the window starts again
    mean = LossWindow(mean=True)
    mean.add(1.0)
    mean.add(torch.tensor(3.0))
    assert float(mean.take()) == 2.0
    with pytest.raises(ValueError, match="loss must be a scalar"):
        mean.add(torch.ones(2))
    with pytest.raises(TypeError, match="loss"):
        mean.add("0.5")  # type: ignore[arg-type]


def test_an_opacus_dp_optimizer_is_named_and_pointed_to_gradguard_privacy():
    opacus = pytest.importorskip("opacus")
    model = opacus.GradSampleModule(nn.Linear(4, 1))
    dp = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=8,
    )
    with pytest.warns(RuntimeWarning, match="DPOptimizer.*non-private.*gradguard.privacy") as w:
        check_skippable(dp)  # what every integration runs on the optimizers it is given
    assert w[0].filename == __file__
    model(torch.randn(8, 4)).sum().backward()
    guard = Guard(model, Monitor(), health=False)
    with pytest.warns(RuntimeWarning, match="gradguard.privacy"):
        guard.step(dp)


def test_the_hook_tells_the_policy_that_sgd_steps_by_the_gradient():
    # FeedbackClip's unstable-step rule needs the weights' norm, given for SGD only
    def first_threshold(make_optimizer):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        weights = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
        # the size test alone: this checks what the hook tells the policy, not the loss
        policy = chain(SkipNonFinite(), FeedbackClip(step_overshoot=0.0))
        hook = HookStep(Guard(model, policy, health=False))
        (100 * model(torch.randn(8, 4))).pow(2).mean().backward()
        return float(hook.run(make_optimizer(model.parameters())).threshold), weights

    # and its momentum: a carried step of 10 % of the weights, 1 % a step at momentum 0.9
    threshold, weights = first_threshold(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert threshold == pytest.approx(0.01 * weights / 0.1, rel=1e-5)
    threshold, _ = first_threshold(lambda p: torch.optim.SGD(p, lr=0.1))
    assert threshold == pytest.approx(0.1 * weights / 0.1, rel=1e-5)
    threshold, _ = first_threshold(lambda p: torch.optim.Adam(p, lr=0.1))
    assert threshold == float("inf")
