"""GradGuardCallback in a real Lightning Trainer on CPU, checked against a hand-written loop."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import Logger  # noqa: E402

from gradguard import ClipNorm, RunStore, SkipNonFinite, chain  # noqa: E402
from gradguard.integrations.lightning import GradGuardCallback, refuse_sharded  # noqa: E402
from tests.integrations._states import same  # noqa: E402

torch.set_num_threads(1)

BATCH, N_BATCHES, LR, GAMMA = 4, 12, 0.05, 0.8


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * N_BATCHES, 6, generator=g)
    y = (x[:, :1] * 3 - x[:, 1:2]).tanh() + 0.1 * torch.randn(BATCH * N_BATCHES, 1, generator=g)
    return x, y


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data()
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


class Module(L.LightningModule):
    def __init__(self, nan_at: int | None = None, scheduler: bool = False) -> None:
        super().__init__()
        self.net = net()
        self.nan_at = nan_at
        self.scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if batch_idx == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=LR)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def train_dataloader(self):
        x, y = data()
        dataset = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False)


class Capture(Logger):
    """A real Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def trainer(callback, logger=None, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    options.update(kwargs)
    return L.Trainer(**options)


def by_hand(steps: int, accumulate: int, max_norm: float | None, autocast: bool = False):
    """The same training written out: pre-clip norms, mean losses and the final model."""
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    data_iter = iter(batches())
    norms, losses = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for _ in range(accumulate):
            x, y = next(data_iter)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(x), y)
            (loss / accumulate).backward()
            total += loss.detach().item() / accumulate
        grads = [p.grad for p in model.parameters()]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
        losses.append(total)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    return norms, losses, model


def logged(logger: Capture, key: str) -> list[float]:
    return [row[key] for _, row in logger.rows if key in row]


@pytest.mark.parametrize(
    ("accumulate", "precision"),
    [(1, "32-true"), (3, "32-true"), (2, "bf16-mixed")],
)
def test_recorded_norms_equal_hand_computed_and_clipping_is_torchs(tmp_path, accumulate, precision):
    steps, max_norm = N_BATCHES // accumulate, 1.5
    callback = GradGuardCallback(ClipNorm(max_norm), store=tmp_path / "run", log_every=1)
    logger = Capture()
    module = Module()
    trainer(
        callback, logger, max_steps=steps, accumulate_grad_batches=accumulate, precision=precision
    ).fit(module)

    bf16 = precision == "bf16-mixed"
    expected, losses, reference = by_hand(steps, accumulate, max_norm, autocast=bf16)
    recorded = RunStore.open(tmp_path / "run").steps()
    assert list(recorded["step"]) == list(range(steps))  # trainer.global_step at each step
    assert list(recorded["total_norm"]) == pytest.approx(expected, rel=1e-6, abs=0)
    assert recorded["clipped"].any() and not recorded["clipped"].all()  # the clip acted sometimes
    assert list(recorded["loss"]) == pytest.approx(losses, rel=1e-6)  # the mean micro-batch loss
    assert list(recorded["lr"]) == [LR] * steps
    for got, want in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # same clipping as torch's
    assert logged(logger, "gradguard/total_norm") == pytest.approx(expected, rel=1e-6)
    assert [step for step, row in logger.rows if "gradguard/total_norm" in row] == list(
        range(steps)
    )  # the steps Lightning's loggers show are the recorded ones
    assert min(logged(logger, "gradguard/clip_coef")) < 1.0


@pytest.mark.parametrize("lr_on_skip", ["hold", "advance"])
def test_nan_step_is_skipped_bit_for_bit_with_one_rule_for_the_lr(tmp_path, lr_on_skip):
    nan_at, steps = 4, 8
    snapshots: dict[int, object] = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = (
                copy.deepcopy(pl_module.state_dict()),
                copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
            )

    callback = GradGuardCallback(
        chain(SkipNonFinite(), ClipNorm(1.0)),
        lr_on_skip=lr_on_skip,
        store=tmp_path / "r",
        log_every=3,
    )
    module = Module(nan_at=nan_at, scheduler=True)
    run = trainer(callback, max_steps=steps)
    run.callbacks.append(Watch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module)
    mine = [w for w in caught if "gradguard" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__  # one warning, at the fit line
    assert "step 4 skipped (nonfinite)" in str(mine[0].message)

    assert same(snapshots[nan_at], snapshots[nan_at + 1])  # parameters, Adam's step and moments
    assert not same(snapshots[nan_at + 1][0], module.state_dict())  # later steps train
    assert all(math.isfinite(p.sum().item()) for p in module.parameters())
    assert run.global_step == steps  # the skipped step counts, as an fp16 overflow does

    recorded = RunStore.open(tmp_path / "r").steps()
    assert list(recorded["skipped"]) == [i == nan_at for i in range(steps)]
    assert recorded["reason"][nan_at] == 1  # SkipReason.NONFINITE
    assert math.isnan(recorded["loss"][nan_at]) and math.isfinite(recorded["loss"][nan_at + 1])
    # The LR in force at each step: "hold" does not count the skipped step.
    updates = [i - (lr_on_skip == "hold" and i > nan_at) for i in range(steps)]
    assert list(recorded["lr"]) == pytest.approx([LR * GAMMA**u for u in updates], rel=1e-6)


def test_trainer_clipping_is_monitored_before_the_clip(tmp_path):
    steps, clip_val = 6, 2.0
    callback = GradGuardCallback(store=tmp_path / "m", log_every=1)
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing to warn about
        trainer(callback, max_steps=steps, gradient_clip_val=clip_val).fit(module)
    assert callback.monitoring
    expected, losses, reference = by_hand(steps, 1, clip_val)
    recorded = RunStore.open(tmp_path / "m").steps()
    assert list(recorded["total_norm"]) == pytest.approx(expected, rel=1e-6)  # pre-clip
    assert list(recorded["threshold"]) == [clip_val] * steps  # Lightning's clip, recorded
    coef = [min(1.0, clip_val / (n + 1e-6)) for n in expected]
    assert list(recorded["clip_coef"]) == pytest.approx(coef, rel=1e-6)
    assert 0 < recorded["clipped"].sum() < steps
    assert list(recorded["loss"]) == pytest.approx(losses, rel=1e-6)
    for got, want in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # Lightning clipped once


def test_taking_over_keeps_lightnings_clip_and_turns_its_own_off(tmp_path):
    steps, clip_val = 6, 1.5
    callback = GradGuardCallback(monitor_only=False, store=tmp_path / "g", log_every=1)
    module = Module()
    fit = trainer(callback, max_steps=steps, gradient_clip_val=clip_val)
    fit.fit(module)
    assert not callback.monitoring and fit.gradient_clip_val == clip_val  # restored after
    _, _, reference = by_hand(steps, 1, clip_val)
    for got, want in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    policy = RunStore.open(tmp_path / "g").meta()["config"]["policy"]
    assert "SkipNonFinite" in policy and "ClipNorm" in policy

    module = Module()
    with pytest.warns(RuntimeWarning, match="is turned off") as caught:
        trainer(GradGuardCallback(ClipNorm(1e9)), max_steps=steps, gradient_clip_val=clip_val).fit(
            module
        )
    assert caught[0].filename == __file__
    _, _, unclipped = by_hand(steps, 1, None)
    for got, want in zip(module.net.parameters(), unclipped.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # Lightning clipped nothing


class TwoOptimizers(L.LightningModule):
    """Manual optimization with a generator-like and a critic-like optimizer."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net()
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        for index, optimizer in enumerate((first, second)):
            loss = nn.functional.mse_loss(self.net(x), y) * (index + 1)
            if batch_idx == self.nan_at and index == 1:
                loss = loss * float("nan")
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        first = torch.optim.Adam(self.net[0].parameters(), lr=LR)
        second = torch.optim.SGD(self.net[2].parameters(), lr=LR, momentum=0.9)
        return first, second

    def train_dataloader(self):
        return Module().train_dataloader()


def test_several_optimizers_in_manual_optimization_each_get_a_guard(tmp_path):
    steps, nan_at = 5, 2
    module = TwoOptimizers(nan_at=nan_at)
    callback = GradGuardCallback(SkipNonFinite(), store=tmp_path / "two", log_every=1)
    logger = Capture()
    with pytest.warns(RuntimeWarning, match="skipped"):
        trainer(callback, logger, max_steps=2 * steps).fit(module)

    # By hand: the same two optimizers over the same batches.
    model = net()
    first = torch.optim.Adam(model[0].parameters(), lr=LR)
    second = torch.optim.SGD(model[2].parameters(), lr=LR, momentum=0.9)
    norms: list[list[float]] = [[], []]
    for batch_idx, (x, y) in enumerate(batches()[:steps]):
        for index, optimizer in enumerate((first, second)):
            optimizer.zero_grad()
            (nn.functional.mse_loss(model(x), y) * (index + 1)).backward()
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
            norms[index].append(math.nan if (batch_idx, index) == (nan_at, 1) else norm)
            if (batch_idx, index) != (nan_at, 1):
                optimizer.step()
    for got, want in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # the skip changed nothing

    for index in range(2):
        recorded = RunStore.open(tmp_path / "two" / f"optimizer{index}").steps()
        # Lightning counts every optimizer's step in global_step.
        assert list(recorded["step"]) == list(range(index, 2 * steps, 2))
        assert list(recorded["total_norm"]) == pytest.approx(norms[index], rel=1e-6, nan_ok=True)
        assert list(recorded["skipped"]) == [(i, index) == (nan_at, 1) for i in range(steps)]
        assert logged(logger, f"gradguard/optimizer{index}/total_norm") == pytest.approx(
            norms[index], rel=1e-6, nan_ok=True
        )
    assert callback.result_for(module.optimizers()[1]).step == 2 * steps - 1
    assert len(callback.guards) == 2


def test_lbfgs_is_refused_and_bad_arguments_are_named():
    class LBFGSModule(Module):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(TypeError, match="LBFGS"):
        trainer(GradGuardCallback(log=False), max_steps=1).fit(LBFGSModule())
    with pytest.raises(TypeError, match="monitor_only"):
        GradGuardCallback(monitor_only="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy"):
        GradGuardCallback(policy=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_on_skip"):
        GradGuardCallback(lr_on_skip="later")


def test_deepspeed_and_fsdp1_strategies_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    with pytest.raises(NotImplementedError, match="ModelParallelStrategy"):
        refuse_sharded(FSDPStrategy())
    refuse_sharded(SingleDeviceStrategy(device=torch.device("cpu")))  # no error


def test_ddp_and_fsdp2_on_two_ranks_match_one_process_and_skip_together():
    """DDPStrategy and ModelParallelStrategy (FSDP2) on 2 gloo ranks, one rank's NaN batch:
    norms equal the unsharded run, every rank skips the same step, rank 0 records."""
    from tests.integrations._workers import NAN_STEP, results

    for rank, found in enumerate(results(2)):
        runs = found["lightning"]
        reference = runs["reference"]
        for name in ("ddp", "fsdp2"):
            run = runs[name]
            assert run["skipped"] == [step + 1 == NAN_STEP for step in range(len(reference))]
            for got, want, skipped in zip(run["norms"], reference, run["skipped"]):
                assert math.isnan(got) if skipped else got == pytest.approx(want, rel=1e-5)
            for got, want in zip(run["params"], runs["reference_params"]):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
            assert run["recording"] == (rank == 0)
            if rank == 0:
                stored = run["stored"]
                assert stored["step"] == [0.0, 1.0, 2.0, 3.0]  # trainer.global_step
                assert stored["total_norm"] == pytest.approx(run["norms"], nan_ok=True)
                assert stored["skipped"] == [float(s) for s in run["skipped"]]


def test_one_callback_guards_a_second_fit_too():
    callback = GradGuardCallback(monitor_only=False, log=False, health=False)
    first = trainer(callback, max_steps=2, gradient_clip_val=1.5)
    first.fit(Module())
    guard = callback.guard
    second = trainer(callback, max_steps=3, gradient_clip_val=0.5)
    second.fit(Module())
    assert callback.guard is not guard and callback.last_result.step == 2
    assert "ClipNorm(max_norm=0.5" in repr(callback.guard.policy)  # the second Trainer's clip
    assert first.gradient_clip_val == 1.5 and second.gradient_clip_val == 0.5
