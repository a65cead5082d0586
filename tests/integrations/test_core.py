"""HookStep: a skipped step leaves every torch optimizer untouched; imports stay lazy."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradguard import ClipNorm, Guard, Monitor, SkipNonFinite, chain
from gradguard.integrations._core import HookStep, check_skippable, innermost

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
