"""The policy's device update run compiled (``Guard(compile=...)``, ``gradguard._compiled``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg
from gradguard import _compiled
from gradguard.ops import TORCH
from gradguard.policies import StepInputs
from gradguard.policies.feedback import FeedbackClip, initial_state


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Each test compiles from scratch and forgets failures of the others."""
    torch._dynamo.reset()
    saved = (_compiled._compiled, set(_compiled._failed))
    _compiled._compiled = None
    _compiled._failed.clear()
    yield
    _compiled._compiled, failed = saved
    _compiled._failed.clear()
    _compiled._failed.update(failed)
    torch._dynamo.reset()


def _use_backend(backend) -> None:
    _compiled._compiled = torch.compile(_compiled._pure_update, backend=backend, dynamic=False)


def _train(compile: bool | None, steps: int = 80, sgd: bool = False) -> np.ndarray:
    """A small run with a loss spike, a NaN gradient and a decaying LR; per step the
    threshold, clip coefficient and skip flag."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.StepLR(opt, 20, 0.5)
    guard = gg.Guard(model, host_math=False, compile=compile)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    out = []
    for i in range(steps):
        batch = torch.randint(0, 256, (32,))
        loss = ((model(x[batch]) - y[batch]) ** 2).mean() * (30.0 if i == 40 else 1.0)
        opt.zero_grad()
        loss.backward()
        if i == 60:
            next(model.parameters()).grad[0, 0] = float("nan")
        result = guard.step(opt, loss=loss)
        schedule.step()
        out.append((float(result.threshold), float(result.clip_coef), bool(result.skipped)))
    return np.array(out)


def _inputs(norm: float, loss: float, lr: float, gain: float | None = None) -> StepInputs:
    total = torch.tensor(norm)
    return StepInputs(
        total,
        total.reshape(1),
        TORCH,
        loss=torch.tensor(loss),
        lr=lr,
        weight_norm=None if gain is None else torch.tensor(5.0),
        step_gain=1.0 if gain is None else gain,
        compile=True,
    )


def test_the_feedback_update_traces_as_one_graph():
    policy = FeedbackClip()
    inputs = _inputs(1.0, 2.0, 1e-3)
    state = _compiled._unaliased(initial_state(TORCH, inputs.total_norm))
    explained = torch._dynamo.explain(_compiled._pure_update)(
        policy, state, inputs.total_norm, inputs.norms, inputs.loss, torch.tensor(1e-3),
        None, 1.0, 2.0,
    )  # fmt: skip
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_a_run_with_a_schedule_compiles_once():
    counter = CompileCounter()
    _use_backend(counter)
    policy = FeedbackClip()
    rng = np.random.default_rng(0)
    for step in range(30):
        # a new LR each step (a schedule), a spike, a NaN norm: one graph for all
        norm = (
            float("nan") if step == 20 else float(rng.uniform(0.5, 1.5)) * (9 if step == 10 else 1)
        )
        policy.decide(_inputs(norm, 2.0 - 0.01 * step, 1e-3 * (1 + step)))
    assert counter.frame_count == 1
    assert counter.op_count > 100  # the whole update is in it


def test_sgd_momentum_that_cycles_compiles_once():
    # OneCycleLR cycles SGD's momentum, so its gain changes at every step
    counter = CompileCounter()
    _use_backend(counter)
    policy = FeedbackClip()
    for step in range(12):
        momentum = 0.85 + 0.01 * step
        policy.decide(_inputs(1.0 + 0.05 * step, 2.0, 0.1, gain=1.0 / (1.0 - momentum)))
    assert counter.frame_count == 1


def test_compiled_decisions_match_the_op_by_op_ones():
    for sgd in (False, True):
        eager, compiled = _train(compile=False, sgd=sgd), _train(compile=True, sgd=sgd)
        assert np.array_equal(np.isfinite(eager[:, 0]), np.isfinite(compiled[:, 0]))
        finite = np.isfinite(eager[:, 0])
        np.testing.assert_allclose(compiled[finite, 0], eager[finite, 0], rtol=1e-5)
        np.testing.assert_allclose(compiled[:, 1], eager[:, 1], rtol=1e-5)
        assert np.array_equal(compiled[:, 2], eager[:, 2])
        assert (eager[:, 1] < 1).any() and eager[:, 2].sum() == 1  # it clipped and skipped


def test_a_failed_compile_warns_once_and_decides_op_by_op():
    calls = []

    def broken(graph, example_inputs):
        calls.append(1)
        raise RuntimeError("no compiler for this device")

    _use_backend(broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _train(compile=True, steps=30)
    eager = _train(compile=False, steps=30)
    assert np.array_equal(compiled, eager)
    messages = [str(w.message) for w in caught if "compiling FeedbackClip" in str(w.message)]
    assert len(messages) == 1 and "no compiler for this device" in messages[0]
    assert len(calls) == 1  # not tried again


class _Recording(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_under_a_dispatch_mode_the_update_runs_as_written():
    counter = CompileCounter()
    _use_backend(counter)
    policy = FeedbackClip()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _Recording():
            decision = policy.decide(_inputs(1.0, 2.0, 1e-3))
    assert torch.isinf(decision.threshold)  # the first step: no threshold yet
    assert counter.frame_count == 0 and not _compiled._failed


def test_compile_is_a_bool_or_none_and_defaults_to_cuda_with_triton():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="compile"):
        gg.Guard(model, compile="yes")  # type: ignore[arg-type]
    assert gg.Guard(model).compile is None
    assert not _compiled.by_default(torch.device("cpu"))
    assert _compiled.by_default(torch.device("cuda")) == _compiled._triton_installed()


def test_a_compiled_step_never_syncs_with_the_host(no_host_sync):
    policy = FeedbackClip()
    policy.decide(_inputs(1.0, 2.0, 1e-3))  # compiles
    inputs = [_inputs(1.0 + 0.1 * i, 2.0, 1e-3) for i in range(5)]
    with no_host_sync():
        for step in inputs:
            decision = policy.decide(step)
    assert float(decision.threshold) > 0
