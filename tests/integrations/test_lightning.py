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

torch.set_num_threads(1)

BATCH, N_BATCHES = 4, 12


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
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = net()
        self.nan_at = nan_at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if batch_idx == self.nan_at:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

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


def by_hand(steps: int, accumulate: int, max_norm: float | None, autocast: bool):
    """The same training written out: returns pre-clip norms and the final model."""
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    data_iter = iter(batches())
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            x, y = next(data_iter)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(x), y)
            (loss / accumulate).backward()
        grads = [p.grad for p in model.parameters()]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    return norms, model


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

    expected, reference = by_hand(steps, accumulate, max_norm, autocast=precision == "bf16-mixed")
    recorded = RunStore.open(tmp_path / "run").steps()
    assert list(recorded["step"]) == list(range(steps))
    assert list(recorded["total_norm"]) == pytest.approx(expected, rel=1e-6, abs=0)
    assert recorded["clipped"].any() and not recorded["clipped"].all()  # the clip acted sometimes
    for got, want in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # same clipping as torch's

    logged = [
        row["gradguard/total_norm"] for _, row in logger.rows if "gradguard/total_norm" in row
    ]
    assert logged == pytest.approx(expected, rel=1e-6)
    coefs = [row["gradguard/clip_coef"] for _, row in logger.rows if "gradguard/clip_coef" in row]
    assert min(coefs) < 1.0


def test_nan_step_is_skipped_bit_for_bit_and_training_goes_on(tmp_path):
    nan_at, steps = 4, 8
    snapshots: dict[str, object] = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[batch_idx] = (
                copy.deepcopy(pl_module.state_dict()),
                copy.deepcopy(trainer.optimizers[0].state_dict()),
            )

    callback = GradGuardCallback(chain(SkipNonFinite(), ClipNorm(1.0)), store=tmp_path / "r")
    module = Module(nan_at=nan_at)
    run = trainer(callback, max_steps=steps)
    run.callbacks.append(Watch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module)
    assert any("skipped (nonfinite)" in str(w.message) for w in caught)

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    params_before, optim_before = snapshots[nan_at]
    params_after, optim_after = snapshots[nan_at + 1]
    assert same(params_before, params_after)
    assert same(optim_before, optim_after)  # Adam's step count and moments untouched
    assert not same(snapshots[nan_at + 1][0], module.state_dict())  # later steps train
    assert all(math.isfinite(p.sum().item()) for p in module.parameters())
    assert run.global_step == steps

    recorded = RunStore.open(tmp_path / "r").steps()
    assert list(recorded["skipped"]) == [i == nan_at for i in range(steps)]
    assert recorded["reason"][nan_at] == 1  # SkipReason.NONFINITE


def test_trainer_clipping_makes_the_callback_monitor_and_warn(tmp_path):
    steps, clip_val = 6, 1.5
    callback = GradGuardCallback(ClipNorm(10.0), store=tmp_path / "m", log_every=1)
    module = Module()
    with pytest.warns(UserWarning, match="only measures"):
        trainer(callback, max_steps=steps, gradient_clip_val=clip_val).fit(module)
    assert callback.monitoring
    expected, reference = by_hand(steps, 1, clip_val, autocast=False)
    recorded = RunStore.open(tmp_path / "m").steps()
    assert list(recorded["total_norm"]) == pytest.approx(expected, rel=1e-6)  # pre-clip
    assert not recorded["clipped"].any()  # gradguard left the clipping to Lightning
    for got, want in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_both_clipping_warns_when_forced():
    callback = GradGuardCallback(ClipNorm(1.0), monitor_only=False, log=False)
    with pytest.warns(UserWarning, match="both gradguard and the Trainer"):
        trainer(callback, max_steps=1, gradient_clip_val=0.5).fit(Module())
    assert not callback.monitoring


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


def test_sharded_strategies_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    with pytest.raises(NotImplementedError, match="FSDPStrategy"):
        refuse_sharded(FSDPStrategy())
    refuse_sharded(SingleDeviceStrategy(device=torch.device("cpu")))  # no error
