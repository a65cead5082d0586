"""guard_gradients in a real Accelerate loop on CPU, against the same loop written in torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from gradguard import ClipNorm, Guard, SkipNonFinite, chain  # noqa: E402
from gradguard.integrations.accelerate import guard_gradients  # noqa: E402

torch.set_num_threads(1)
ACCUMULATE, BATCH, N_BATCHES, MAX_NORM = 2, 4, 12, 1.0


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * N_BATCHES, 6, generator=g)
    return x, (x[:, :1] * 3).tanh() + 0.1 * torch.randn(len(x), 1, generator=g)


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def accelerate_run(nan_at: int | None = None, mixed_precision: str = "no"):
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=ACCUMULATE, mixed_precision=mixed_precision
    )
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    guard = Guard(model, chain(SkipNonFinite(), ClipNorm(MAX_NORM)), health=False)
    norms, snapshots = [], []
    for i, (xb, yb) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(xb), yb)
            if i // ACCUMULATE == nan_at:
                loss = loss * float("nan")
            accelerator.backward(loss)
            result = guard_gradients(accelerator, guard, optimizer)
            assert (result is None) == (not accelerator.sync_gradients)
            if result is not None:
                norms.append(result.total_norm.item())
                state = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
                snapshots.append(state)
            optimizer.step()
            optimizer.zero_grad()
            if result is not None:
                snapshots[-1] = (*snapshots[-1], copy.deepcopy(model.state_dict()))
    return norms, model, optimizer, snapshots


def torch_run(autocast: bool = False):
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = data()
    norms = []
    for start in range(0, len(x), BATCH * ACCUMULATE):
        for j in range(ACCUMULATE):
            sl = slice(start + j * BATCH, start + (j + 1) * BATCH)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(x[sl]), y[sl])
            (loss / ACCUMULATE).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad()
    return norms, model


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_norms_and_training_equal_the_torch_loop(mixed_precision):
    norms, model, _, _ = accelerate_run(mixed_precision=mixed_precision)
    expected, reference = torch_run(autocast=mixed_precision == "bf16")
    assert len(norms) == N_BATCHES // ACCUMULATE
    assert norms == pytest.approx(expected, rel=1e-6)
    assert max(expected) > MAX_NORM > min(expected)  # clipped on some steps only
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_nan_step_is_skipped_bit_for_bit():
    nan_at = 2
    with pytest.warns(RuntimeWarning, match="skipped"):
        _, model, _, snapshots = accelerate_run(nan_at=nan_at)
    before, optim_state, after = snapshots[nan_at]
    assert all(torch.equal(before[k], after[k]) for k in before)
    next_before, next_optim_state, _ = snapshots[nan_at + 1]
    assert all(torch.equal(after[k], next_before[k]) for k in after)
    for state, next_state in zip(optim_state["state"].values(), next_optim_state["state"].values()):
        assert all(torch.equal(state[k], next_state[k]) for k in state)  # Adam step, moments
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(snapshots[-1][0]["0.weight"], snapshots[-1][2]["0.weight"])


def test_bad_arguments_are_named():
    accelerator = Accelerator(cpu=True)
    model = net()
    with pytest.raises(TypeError, match="guard"):
        guard_gradients(accelerator, model, None)
    with pytest.raises(TypeError, match="accelerator"):
        guard_gradients(object(), Guard(model, health=False), None)
