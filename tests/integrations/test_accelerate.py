"""guard_gradients in a real Accelerate loop on CPU, against the same loop written in torch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from gradguard import ClipNorm, Guard, RunStore, SkipNonFinite, chain  # noqa: E402
from gradguard.integrations.accelerate import guard_gradients  # noqa: E402

torch.set_num_threads(1)
ACCUMULATE, BATCH, N_BATCHES, MAX_NORM, GAMMA = 2, 4, 12, 1.0, 0.5


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


def accelerate_run(
    nan_at: int | None = None,
    mixed_precision: str = "no",
    lr_on_skip: str = "hold",
    store=None,
):
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=ACCUMULATE, mixed_precision=mixed_precision
    )
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    policy = chain(SkipNonFinite(), ClipNorm(MAX_NORM))
    guard = Guard(model, policy, store=store, log_every=1, health=store is not None)
    run = Run()
    for i, (xb, yb) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(xb), yb)
            if i // ACCUMULATE == nan_at:
                loss = loss * float("nan")
            accelerator.backward(loss)
            result = guard_gradients(
                accelerator, guard, optimizer, loss=loss, lr_on_skip=lr_on_skip
            )
            assert (result is None) == (not accelerator.sync_gradients)
            if result is not None:
                run.norms.append(result.total_norm.item())
                run.before.append(copy.deepcopy((model.state_dict(), optimizer.state_dict())))
            optimizer.step()
            if result is not None:
                run.skipped.append(accelerator.optimizer_step_was_skipped)
                run.after.append(copy.deepcopy(model.state_dict()))
            scheduler.step()
            optimizer.zero_grad()
    guard.close()
    run.model, run.lr = model, scheduler.get_last_lr()[0]
    return run


class Run:
    def __init__(self) -> None:
        self.norms: list[float] = []
        self.before: list = []
        self.after: list = []
        self.skipped: list[bool] = []
        self.model = None
        self.lr = None


def torch_run(autocast: bool = False):
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    x, y = data()
    norms, losses = [], []
    for start in range(0, len(x), BATCH * ACCUMULATE):
        total = 0.0
        for j in range(ACCUMULATE):
            sl = slice(start + j * BATCH, start + (j + 1) * BATCH)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(x[sl]), y[sl])
            (loss / ACCUMULATE).backward()
            total += loss.detach().item() / ACCUMULATE
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        losses.append(total)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return norms, losses, model


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_norms_losses_and_training_equal_the_torch_loop(tmp_path, mixed_precision):
    run = accelerate_run(mixed_precision=mixed_precision, store=tmp_path / "run")
    expected, losses, reference = torch_run(autocast=mixed_precision == "bf16")
    assert len(run.norms) == N_BATCHES // ACCUMULATE
    assert run.norms == pytest.approx(expected, rel=1e-6)
    assert max(expected) > MAX_NORM > min(expected)  # clipped on some steps only
    for got, want in zip(run.model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    steps = RunStore.open(tmp_path / "run").steps()
    assert list(steps["loss"]) == pytest.approx(losses, rel=1e-5)  # mean micro-batch loss
    lrs = [0.05 * GAMMA**i for i in range(len(expected))]
    assert list(steps["lr"]) == pytest.approx(lrs, rel=1e-6)


@pytest.mark.parametrize("lr_on_skip", ["hold", "advance"])
def test_nan_step_is_skipped_bit_for_bit_and_accelerate_is_told(lr_on_skip):
    nan_at, steps = 2, N_BATCHES // ACCUMULATE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = accelerate_run(nan_at=nan_at, lr_on_skip=lr_on_skip)
    mine = [w for w in caught if "gradguard" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__  # at the guard_gradients line
    (params, optim), after = run.before[nan_at], run.after[nan_at]
    assert all(torch.equal(params[k], after[k]) for k in params)
    next_optim = run.before[nan_at + 1][1]
    for state, next_state in zip(optim["state"].values(), next_optim["state"].values()):
        assert all(torch.equal(state[k], next_state[k]) for k in state)  # Adam step, moments
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert not torch.equal(run.before[-1][0]["0.weight"], run.after[-1]["0.weight"])
    if lr_on_skip == "hold":  # Accelerate's own flag: its prepared scheduler holds the LR
        assert run.skipped == [i == nan_at for i in range(steps)]
        assert run.lr == pytest.approx(0.05 * GAMMA ** (steps - 1))
    else:
        assert not any(run.skipped)
        assert run.lr == pytest.approx(0.05 * GAMMA**steps)


def test_bad_arguments_are_named():
    accelerator = Accelerator(cpu=True)
    model = net()
    with pytest.raises(TypeError, match="guard"):
        guard_gradients(accelerator, model, None)
    with pytest.raises(TypeError, match="accelerator"):
        guard_gradients(object(), Guard(model, health=False), None)


def test_fsdp2_on_two_ranks_matches_ddp_and_skips_together():
    from tests.integrations._workers import NAN_STEP, STEPS, results

    expected_skips = [step + 1 == NAN_STEP for step in range(STEPS)]
    for rank, found in enumerate(results(2)):
        ddp, fsdp2 = found["accelerate"]["ddp"], found["accelerate"]["fsdp2"]
        assert fsdp2["sharded"] and not ddp["sharded"]
        assert fsdp2["norms"] == pytest.approx(ddp["norms"], rel=1e-5, nan_ok=True)
        for run in (ddp, fsdp2):
            assert run["skipped"] == expected_skips  # accelerator.optimizer_step_was_skipped
            assert run["recording"] == (rank == 0)
        for got, want in zip(fsdp2["params"], ddp["params"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
        if rank == 0:
            assert fsdp2["stored"]["total_norm"] == pytest.approx(fsdp2["norms"], nan_ok=True)
