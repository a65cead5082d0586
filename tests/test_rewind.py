"""Rewind: snapshots, divergence detection, bit-exact restore, events, AMP, DDP."""

from __future__ import annotations

import copy
import math
import os
import socket
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard as gg
from benchmarks._state import assert_same
from gradguard.rewind import Rewind
from gradguard.schema import EventKind


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=gen)
    return x, x.sum(1, keepdim=True)


class _Run:
    """A small training run: model, fused AdamW, step-decay scheduler, ZClip guard."""

    def __init__(self, *, fused: bool = False, scaler: bool = False, policy=None, **rewind) -> None:
        self.model = _model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.7)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaler else None
        if policy is None:
            policy = gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_steps=2))
        self.guard = gg.Guard(self.model, policy)
        self.rewind = Rewind(
            self.model,
            self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            guard=self.guard,
            **rewind,
        )

    def step(self, step: int, poison: float | None = None, overflow: bool = False):
        x, y = _batch(step)
        loss = (self.model(x) - y).pow(2).mean()
        if poison is not None:
            loss = loss * poison
        self.optimizer.zero_grad()
        hook = self.model[0].weight.register_hook(lambda g: g * math.inf) if overflow else None
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if hook is not None:
            hook.remove()
        self.guard.step(self.optimizer, self.scaler, loss=loss)
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        return self.rewind.step(loss)

    def state(self) -> dict:
        """Everything a rewind restores, deep-copied."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "policy": self.guard.policy.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
            }
        )


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("fused", [False, True])
def test_restore_is_bit_exact_and_replays_like_a_twin(fused):
    run = _Run(fused=fused, every=5, check_every=1)
    for step in range(5):
        assert run.step(step) is None
    at_snapshot = run.state()
    for step in range(5, 8):
        assert run.step(step) is None
    event = run.step(8, poison=math.nan)
    assert event is not None and event.kind == EventKind.REWIND
    assert event.data["to_step"] == 5 and event.data["from_step"] == 9
    assert event.data["steps_lost"] == 4 and event.data["reason"] == "nonfinite"
    assert_same(run.state(), at_snapshot)
    # going on from the restored state trains exactly like a twin that stopped at step 5
    twin = _Run(fused=fused, every=5, check_every=1)
    for step in range(5):
        twin.step(step)
    for step in range(5, 12):
        run.step(step)
        twin.step(step)
    assert_same(run.state(), twin.state())


def test_feedback_clip_state_is_restored_but_keeps_its_lesson():
    feedback = gg.FeedbackClip()
    run = _Run(every=5, check_every=1, policy=gg.chain(gg.SkipNonFinite(), feedback))
    for step in range(5):
        assert run.step(step) is None
    at_snapshot = run.state()
    for step in range(5, 8):
        assert run.step(step) is None
    level = float(run.state()["policy"]["1"]["level"])  # held through the NaN step
    assert run.step(8, poison=math.nan) is not None
    restored = run.state()
    policy, saved = restored.pop("policy")["1"], at_snapshot.pop("policy")["1"]
    assert_same(restored, at_snapshot)  # model, optimizer, scheduler: bit for bit
    assert not math.isfinite(float(saved["ceiling"]))
    # the policy's state is the snapshot's, but for a ceiling: half of twice the typical
    # size the run had reached before the rewind
    expected = level + math.log(2.0) + math.log(0.5)
    assert float(policy.pop("ceiling")) == pytest.approx(expected, abs=1e-6)
    saved.pop("ceiling")
    assert_same(policy, saved)


def test_restores_gradscaler_state_under_amp():
    run = _Run(scaler=True, every=4, check_every=1)
    for step in range(4):
        run.step(step)
    at_snapshot = run.state()
    scale = run.scaler.get_scale()
    assert run.step(4, overflow=True) is None  # the scaler sees an overflow, halves its scale
    assert run.scaler.get_scale() == scale / 2
    run.step(5)
    event = run.step(6, poison=math.nan)
    assert event is not None
    assert_same(run.state(), at_snapshot)
    assert run.scaler.get_scale() == scale


def test_initial_snapshot_restores_an_empty_optimizer_state():
    run = _Run(every=100, check_every=1)
    initial = run.state()
    assert initial["optimizer"]["state"] == {}
    run.step(0)
    assert run.optimizer.state  # AdamW created its moments
    event = run.step(1, poison=math.nan)
    assert event is not None and event.data["to_step"] == 0
    assert_same(run.state(), initial)


def _loss_watcher(noise_scale: float):
    """A rewinder over a small SGD model that is only fed losses (snapshot every 50 steps,
    window 10, checked every 5), and a seeded noise of ``noise_scale``."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rewind = Rewind(model, optimizer, every=50, window=10, check_every=5)
    gen = torch.Generator().manual_seed(0)
    return rewind, lambda: noise_scale * torch.rand((), generator=gen)


def test_loss_divergence_confirmed_over_a_window_not_a_spike():
    rewind, noise = _loss_watcher(0.1)
    for _ in range(60):  # healthy: falling loss with noise, one 100x spike
        assert rewind.step(1.0 + noise()) is None
    assert rewind.step(100.0) is None
    for _ in range(9):
        assert rewind.step(1.0 + noise()) is None
    events = [rewind.step(3.0 + noise()) for _ in range(10)]  # the loss settles at 3x
    assert events[:-1] == [None] * 9  # confirmed once the window's median moved: step 80
    event = events[-1]
    assert event is not None and event.data["reason"] == "loss"
    assert event.data["from_step"] == 80 and event.data["to_step"] == 50
    assert event.data["loss"] == pytest.approx(3.05, abs=0.06)
    assert event.data["reference"] == pytest.approx(1.05, abs=0.06)
    for _ in range(100):  # healthy again after the rewind
        assert rewind.step(1.0 + noise()) is None


def test_noisy_loss_near_zero_never_rewinds():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rewind = Rewind(model, optimizer, every=20, window=20, check_every=1)
    gen = torch.Generator().manual_seed(1)
    for step in range(2000):  # heavy-tailed: mostly 1e-3, sometimes 50x
        level = 1e-3 * (1 + 49 * (torch.rand((), generator=gen) < 0.08).float())
        assert rewind.step(level * (0.5 + torch.rand((), generator=gen))) is None, step


def test_nonfinite_weights_rewind_at_the_next_snapshot():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rewind = Rewind(model, optimizer, every=10, check_every=10)
    for _ in range(10):
        assert rewind.step(1.0) is None
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight[0, 1] = math.nan
    events = [rewind.step(1.0) for _ in range(10)]
    assert events[:-1] == [None] * 9
    assert events[-1] is not None and events[-1].data["reason"] == "nonfinite"
    assert torch.equal(model.weight, saved)


def test_a_buffer_holding_inf_on_purpose_is_not_a_divergence():
    class Masked(nn.Module):  # a causal attention mask: -inf above the diagonal
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 1)
            mask = torch.triu(torch.full((4, 4), -math.inf), diagonal=1)
            self.register_buffer("mask", mask, persistent=False)

    model = Masked()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rewind = Rewind(model, optimizer, every=5, check_every=1)
    assert all(rewind.step(1.0) is None for _ in range(20))  # snapshots at 5, 10, 15, 20
    assert not rewind.events
    with torch.no_grad():
        model.linear.weight[0, 0] = math.nan  # a non-finite parameter still rewinds
    events = [rewind.step(1.0) for _ in range(5)]
    assert events[-1] is not None and events[-1].data["reason"] == "nonfinite"


def test_diverging_again_goes_further_back_and_gives_up_with_a_warning():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rewind = Rewind(model, optimizer, every=5, keep=2, check_every=1, patience=3)
    for _ in range(10):  # snapshots at 0, 5, 10: the newest two are kept
        rewind.step(1.0)
    first = rewind.step(math.nan)
    assert first.data["to_step"] == 10
    second = rewind.step(math.nan)  # again before a new snapshot: the older one
    assert second.data["to_step"] == 5
    third = rewind.step(math.nan)  # nothing older is kept: the oldest again
    assert third.data["to_step"] == 5
    with pytest.warns(RuntimeWarning, match="gave up after 3 rewinds"):
        assert rewind.step(math.nan) is None
    assert len(rewind.events) == 3


def test_policies_that_can_tighten_are_told(tmp_path):
    class Tightening(gg.ClipNorm):
        def __init__(self):
            super().__init__(1.0)
            self.limit = 1.0
            self.seen = []

        def state_dict(self):
            return {"limit": self.limit}

        def load_state_dict(self, state):
            self.limit = state["limit"]

        def rewound(self, previous):
            self.seen.append((previous, self.limit))
            self.limit = previous["limit"] / 2

    policy = Tightening()
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.chain(gg.SkipNonFinite(), policy), store=tmp_path / "run")
    rewind = Rewind(model, optimizer, guard=guard, every=5, check_every=1)
    for step in range(7):
        loss = model(torch.ones(1, 3)).pow(2).sum() * (math.nan if step == 6 else 1.0)
        optimizer.zero_grad()
        loss.backward()
        guard.step(optimizer, loss=loss)
        policy.limit = 1.0 + step / 10  # 1.4 at the snapshot (step 5), 1.6 at the rewind
        event = rewind.step(loss)
    assert event is not None
    # told the state it had before the restore, after its snapshot state was restored
    assert policy.seen == [({"limit": 1.6}, 1.4)]
    assert policy.limit == 0.8
    guard.close()
    stored = gg.RunStore.open(tmp_path / "run").events(kind=EventKind.REWIND)
    assert [e.data["to_step"] for e in stored] == [5]
    assert stored[0].data["steps_lost"] == 2 and stored[0].step == 7


def test_snapshot_bytes_counts_parameters_buffers_and_optimizer_state():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    rewind = Rewind(model, optimizer)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    assert rewind.snapshot_bytes == model_bytes + state_bytes


def test_host_storage_keeps_the_copies_on_the_cpu():
    run = _Run(every=3, check_every=1, storage="host")
    for step in range(3):
        run.step(step)
    at_snapshot = run.state()
    run.step(3)
    assert run.step(4, poison=math.nan) is not None
    assert_same(run.state(), at_snapshot)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be >= 1"),
        ({"keep": 1.5}, TypeError, "keep must be an int"),
        ({"storage": "gpu"}, ValueError, "storage must be one of"),
        ({"rise": 0.5}, ValueError, "rise must be >= 1"),
        ({"rise": math.nan}, ValueError, "rise must be a finite number"),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"relapse": -0.1}, ValueError, "relapse must be"),
        ({"relapse": math.nan}, ValueError, "relapse must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    model = nn.Linear(2, 1)
    with pytest.raises(error, match=match):
        Rewind(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_bad_model_and_optimizer_are_named():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="optimizer must be a torch Optimizer"):
        Rewind(model, "sgd")
    with pytest.raises(ValueError, match="model: there are no parameters"):
        Rewind([], torch.optim.SGD(model.parameters(), lr=0.1))


# -- DDP: two gloo ranks decide together ----------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        guard = gg.Guard(model)
        rewind = Rewind(model, optimizer, guard=guard, every=4, check_every=2)
        seen = []
        for step in range(12):
            x, y = _batch(100 * step + rank)
            loss = (model(x) - y).pow(2).mean()
            if rank == 1 and step == 6:
                loss = loss * math.nan  # only rank 1 sees it; its gradient is all-reduced
            optimizer.zero_grad()
            loss.backward()
            guard.step(optimizer, loss=loss)
            if step == 3:
                snapshot = copy.deepcopy(model.module.state_dict())
            event = rewind.step(loss)
            if event is not None:
                seen.append((step, dict(event.data), copy.deepcopy(model.module.state_dict())))
        final = {k: v.detach() for k, v in model.module.named_parameters()}
        torch.save(
            {"events": seen, "snapshot": snapshot, "final": final}, Path(out) / f"rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_rewind_together():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="gg-rewind-")
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, start_method="spawn")
    ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert [step for step, _, _ in r["events"]] == [7]  # the check after step 6's NaN
        _, data, state = r["events"][0]
        assert data["to_step"] == 4 and data["reason"] == "nonfinite"
        assert_same(state, r["snapshot"])
    # the ranks went on in step: the same parameters (BatchNorm statistics stay per rank)
    assert_same(ranks[0]["final"], ranks[1]["final"])


def _with_feedback(losses, compiled: bool = False, **settings):
    """Train a linear model under SkipNonFinite + FeedbackClip with a rewinder, feeding
    ``losses`` as the steps' losses; return (events per step, the FeedbackClip).
    ``compiled``: decide with the device math, FeedbackClip's update compiled."""
    from gradguard.policies.feedback import FeedbackClip

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    feedback = FeedbackClip()
    policy = gg.chain(gg.SkipNonFinite(), feedback)
    guard = gg.Guard(model, policy, host_math=not compiled, compile=compiled)
    rewind = Rewind(model, optimizer, guard=guard, every=10, check_every=5, **settings)
    events = []
    for value in losses:
        model(torch.randn(4, 3)).pow(2).mean().backward()
        guard.step(optimizer, loss=value)
        optimizer.zero_grad()
        events.append(rewind.step(value))
    return events, feedback


@pytest.mark.parametrize("compiled", [False, True], ids=["host", "compiled"])
def test_a_policy_divergence_rewinds_and_the_policy_keeps_the_lesson(compiled):
    # healthy for 30 steps, then the loss climbs: the policy confirms a divergence after
    # three elevated medians (step 34), the rewinder acts at its next check (35);
    # rise=100: the rewinder's own loss test stays silent, only the policy's signal acts;
    # the same with the update compiled (the restored state goes back into the graph)
    losses = [1.0 - 0.01 * i for i in range(30)] + [2.0, 4.0, 8.0, 16.0, 32.0]
    losses += [0.7] * 10 if compiled else []
    events, feedback = _with_feedback(losses, compiled, window=5, rise=100)
    fired = [(i, e) for i, e in enumerate(events) if e is not None]
    assert len(fired) == 1
    index, event = fired[0]
    assert index == 34 and event.data["reason"] == "loss" and event.data["to_step"] == 30
    state = feedback.state_dict()
    assert float(state["episodes"]) == 1
    assert math.isfinite(float(state["ceiling"]))  # tighter than before the divergence
    if compiled:
        from gradguard import _compiled

        assert type(feedback) not in _compiled._failed  # it ran compiled throughout


def test_counts_optimizer_steps_under_gradient_accumulation():
    run = _Run(every=3, check_every=1)
    micro = 2

    def accumulated_step(step: int, poison: float | None = None):
        with run.guard.accumulating():  # micro-batches: the guard does nothing
            for k in range(micro - 1):
                x, y = _batch(1000 * step + k)
                ((run.model(x) - y).pow(2).mean() / micro).backward()
        x, y = _batch(1000 * step + micro)
        loss = (run.model(x) - y).pow(2).mean() / micro
        if poison is not None:
            loss = loss * poison
        loss.backward()
        run.guard.step(run.optimizer, loss=loss)
        run.optimizer.zero_grad()
        run.scheduler.step()
        return run.rewind.step(loss)  # once per optimizer step, not per micro-batch

    for step in range(3):
        assert accumulated_step(step) is None
    at_snapshot = run.state()
    assert accumulated_step(3) is None
    event = accumulated_step(4, poison=math.nan)
    assert event is not None and event.data["to_step"] == 3 and event.data["steps_lost"] == 2
    assert_same(run.state(), at_snapshot)


@pytest.mark.parametrize("relapse, rewinds", [(0.2, False), (0.1, True)])
def test_a_late_rise_must_undo_a_share_of_the_progress(relapse, rewinds):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rewind = Rewind(model, optimizer, every=50, window=10, check_every=5, relapse=relapse)
    gen = torch.Generator().manual_seed(0)
    noise = lambda: 0.01 * torch.rand((), generator=gen)  # noqa: E731
    # falls from about 1 to 0.1, then rises to 0.25: ×2.5 the reference and above its
    # largest loss, but only a sixth of the progress made since the first window is undone
    losses = [max(1.0 - 0.02 * i, 0.1) for i in range(100)] + [0.25] * 30
    events = [rewind.step(value + noise()) for value in losses]
    fired = [i for i, e in enumerate(events) if e is not None]
    assert bool(fired) is rewinds
    if rewinds:
        assert events[fired[0]].data["to_step"] == 100


def test_the_progress_is_measured_from_the_run_start_even_after_a_rewind():
    rewind, noise = _loss_watcher(0.01)
    for i in range(100):  # from about 1 down to 0.1
        assert rewind.step(max(1.0 - 0.02 * i, 0.1) + noise()) is None
    events = [rewind.step(math.nan)] + [rewind.step(0.1 + noise()) for _ in range(4)]
    assert [e is not None for e in events] == [False, False, False, False, True]  # checked at 105
    # after the rewind the loss rises to 0.25: a sixth of the run's progress, no relapse
    # (measured from the restart's own first window it would be all of it)
    assert all(rewind.step(value + noise()) is None for value in [0.1] * 15 + [0.25] * 25)
    assert len(rewind.events) == 1


def test_a_few_bad_batches_flagged_by_the_policy_do_not_rewind():
    # a falling loss with three bad batches in a row (×20) at steps 40-42
    losses = [2.0 - 0.02 * i for i in range(60)]
    losses[40:43] = [20.0, 20.0, 20.0]
    events, feedback = _with_feedback(losses, window=10)
    assert float(feedback.state_dict()["episodes"]) == 1  # the policy saw a divergence ...
    assert events == [None] * 60  # ... the window's median did not confirm it


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_snapshot_restored_a_second_time_drops_the_momentum(kind):
    model = nn.Linear(3, 1)
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        first, kept = "momentum_buffer", None
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        first, kept = "exp_avg", "exp_avg_sq"
    rewind = Rewind(model, optimizer, every=5, keep=1, check_every=1)
    for step in range(6):  # snapshots at 0 and 5, with momentum built up by then
        x, y = _batch(step)
        optimizer.zero_grad()
        (model(x[:, :3]) - y).pow(2).mean().backward()
        optimizer.step()
        rewind.step(1.0)
    with pytest.warns(RuntimeWarning, match="rewound"):
        once = rewind.step(math.nan)
    assert once.data["momentum_dropped"] is False  # the first restore is exact
    saved = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    assert saved[first].abs().sum() > 0
    with pytest.warns(RuntimeWarning, match="momentum was dropped"):
        twice = rewind.step(math.nan)
    assert twice.data["to_step"] == once.data["to_step"] and twice.data["momentum_dropped"]
    assert optimizer.state[model.weight][first].abs().sum() == 0
    if kept is not None:  # the second moment (the step's scale) is kept
        assert torch.equal(optimizer.state[model.weight][kept], saved[kept])
