"""Guard with recording: the store holds every step, skip events name the origin, findings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg


def deep_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Linear(16, 1),
    )


def test_store_holds_every_step_as_returned_and_skip_event_names_the_origin(tmp_path):
    model = deep_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = gg.Guard(model, store=tmp_path / "run", log_every=10)
    results, losses = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(35):
            x = torch.randn(8, 4)
            y = x.sum(1, keepdim=True)
            hidden = model[:4](x)
            if step == 17:
                # The sqrt trap: forward finite, backward NaN at this point, which then
                # spreads to every gradient upstream (layers 0 and 2), none downstream.
                hidden = torch.where(hidden > 0, hidden.clamp(min=0).sqrt() - hidden.sqrt(), 0.0)
            loss = (model[4:](hidden) - y).pow(2).mean()
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            results.append(guard.step(optimizer, loss=loss))
    guard.close()
    store = gg.RunStore.open(tmp_path / "run")
    steps = store.steps()
    assert steps["step"].tolist() == list(range(35))
    np.testing.assert_allclose(
        steps["total_norm"][:17], [r.total_norm.item() for r in results[:17]], rtol=1e-6
    )
    assert steps["skipped"].tolist() == [1 if i == 17 else 0 for i in range(35)]
    assert steps["reason"][17] == gg.record.SkipReason.NONFINITE
    np.testing.assert_allclose(steps["loss"], losses, rtol=1e-6)
    skips = store.events(kind="skip")
    assert len(skips) == 1
    assert skips[0].step == 17
    nonfinite = skips[0].data["nonfinite"]
    assert "0.weight" in nonfinite and "4.weight" not in nonfinite
    # The first NaN in backward order is layer 2's, not the registration-order "0.weight".
    assert skips[0].data["origin"] in ("2.weight", "2.bias")
    skip_warnings = [w for w in caught if "step 17 skipped" in str(w.message)]
    assert skip_warnings and skip_warnings[0].filename == __file__  # the user's line
    assert store.names() == tuple(n for n, _ in model.named_parameters())
    # the NaN step is snapshotted whole, off the every-10-steps schedule
    assert store.tensor_norms(extra=False)[0].tolist() == [0, 10, 20, 30]
    extra_steps, names, extra = store.tensor_norms(extra=True)
    assert extra_steps.tolist() == [17]
    norms = dict(zip(names, extra[0].tolist()))
    assert not math.isfinite(norms["0.weight"]) and not math.isfinite(norms["2.weight"])
    assert math.isfinite(norms["4.weight"]) and math.isfinite(norms["5.bias"])


def test_health_findings_reach_the_store_once(tmp_path):
    model = deep_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    guard = gg.Guard(model, gg.ClipNorm(1000.0), store=tmp_path / "run", log_every=25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(300):
            x = torch.randn(8, 4)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            guard.step(optimizer, loss=loss)
    guard.close()
    events = gg.RunStore.open(tmp_path / "run").events()
    # one episode (updates of it share its first step, and its key where the store keeps it)
    episodes = {(e.kind, e.step) for e in events if e.kind == "health.clip_inactive"}
    assert len(episodes) == 1  # threshold 1000 never acts


def test_recording_fault_never_stops_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model = deep_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = gg.Guard(model, store=blocker / "run", log_every=2)
        for _ in range(6):
            loss = model(torch.randn(4, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            assert guard.step(optimizer, loss=loss) is not None
        guard.close()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(loss.item())


PATHS = {
    "sgd, host": (lambda ps: torch.optim.SGD(ps, lr=0.05), True, False),
    "sgd, device": (lambda ps: torch.optim.SGD(ps, lr=0.05), False, False),
    "fused adamw, host": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), True, False),
    "fused adamw, device": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), False, False),
    "fused adamw, amp, device": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        False,
        True,
    ),
    "adam, amp, host": (lambda ps: torch.optim.Adam(ps, lr=1e-3), True, True),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_records_the_same_skip_event(tmp_path, path):
    """Fused or not, host or device decisions, AMP or not: one skip event per skipped
    step, with the reason, the non-finite names and their origin (issue 16, item 2)."""
    make_optimizer, host_math, amp = PATHS[path]
    model = deep_model()
    optimizer = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if amp else None
    guard = gg.Guard(model, store=tmp_path / "run", log_every=4, host_math=host_math)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(10):
            optimizer.zero_grad()
            loss = (model(torch.randn(8, 4)) - 1.0).pow(2).mean()
            (scaler.scale(loss) if amp else loss).backward()
            if step in (0, 6):  # the first step (no optimizer state yet) and a later one
                model[2].weight.grad[0, 0] = float("nan")
            result = guard.step(optimizer, scaler, loss=loss)
            if scaler is not None:
                scaler.update()
            assert result.is_skipped() == (step in (0, 6))
    guard.close()
    store = gg.RunStore.open(tmp_path / "run")
    events = store.events(kind="skip")
    assert [e.step for e in events] == [0, 6]
    for event in events:
        reason = "amp_overflow" if amp else "nonfinite"
        assert event.data["reason"] == reason
        assert event.data["nonfinite"][0] == "2.weight"
        assert event.data["origin"] in ("2.weight", "0.weight", "0.bias")
        assert event.data["ranks"] is None
    assert store.steps()["skipped"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 0]


def test_health_monitor_is_attached_and_reachable(tmp_path):
    guard = gg.Guard(deep_model(), store=tmp_path / "run")
    assert isinstance(guard.health, gg.health.HealthMonitor)
    assert gg.Guard(deep_model()).health is None  # nothing recorded: no rules run
    guard.close()
