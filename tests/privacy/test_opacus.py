"""AdaptiveQuantileClip attached to Opacus: epsilon is Opacus's own for the same noise
multiplier, the gradient noise pays for the count, noise schedulers drive the noise added
and the accountant, and every refusal comes before Opacus writes anything."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from gradguard.privacy import (
    AdaptiveQuantileClip,
    PerSampleMonitor,
    from_functional,
    gradient_noise_multiplier,
)
from tests.privacy.runs import data, dp_optimizer, make_private

torch.set_num_threads(1)


@pytest.fixture
def opacus():
    return pytest.importorskip("opacus")


def private_run(
    opacus, z: float, clip: AdaptiveQuantileClip | None, epochs: int = 2, scheduler=None
):
    """A Poisson-sampled Opacus run; ``scheduler(optimizer)`` is built after ``attach``
    and stepped once per epoch."""
    engine, model, optimizer, loader = make_private(opacus, z)
    monitor = PerSampleMonitor()
    if clip is not None:
        clip.attach(optimizer, monitor=monitor, model=model)
    schedule = scheduler(optimizer) if scheduler is not None else None
    bounds = []
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            bounds.append(float(optimizer.max_grad_norm))
        if schedule is not None:
            schedule.step()
    monitor.flush()
    return engine, optimizer, bounds, monitor


def zero_gradient_setup(opacus, z: float, batch: int, clip_norm: float = 2.0):
    """A model whose per-example gradients are all zero: each step's gradient is the noise."""
    model, optimizer = dp_optimizer(
        opacus, nn.Linear(100, 100), z=z, clip_norm=clip_norm, expected=batch, lr=0.0
    )

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        (model(torch.randn(batch, 100)) * 0.0).sum().backward()
        optimizer.step()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * batch

    return model, optimizer, step


def test_opacus_run_reports_opacus_epsilon_for_the_same_noise_multiplier(opacus):
    z = 1.1
    plain, _, plain_bounds, _ = private_run(opacus, z, None)
    clip = AdaptiveQuantileClip(initial_clip=None, target_quantile=0.5, seed=0)
    adaptive, optimizer, bounds, monitor = private_run(opacus, z, clip)
    for delta in (1e-5, 1e-3):
        assert adaptive.get_epsilon(delta) == plain.get_epsilon(delta)
    # the accountant saw z at every step, with Opacus's sampling rate
    assert adaptive.accountant.history == plain.accountant.history
    assert adaptive.accountant.history[0][0] == z
    assert optimizer.noise_multiplier == z
    # and the clip did move (the plain run's stayed at 1.0), one update per step
    assert set(plain_bounds) == {1.0}
    assert len(set(bounds)) == len(bounds) == clip.steps == 16
    assert [e.step for e in monitor.history] == list(range(16))
    assert monitor.history[0].data["clip_norm"] == 1.0  # initial_clip=None took max_grad_norm
    assert monitor.history[0].data["exact"] == []  # nothing epsilon does not cover


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_noise_is_the_split_multiplier_times_the_clip(opacus, adaptive):
    # zero per-example gradients: each step's gradient is the noise alone, / batch size
    z, sigma_b, batch = 1.0, 0.7, 8
    _, optimizer, step = zero_gradient_setup(opacus, z, batch)
    clip = AdaptiveQuantileClip(initial_clip=None, count_noise_std=sigma_b, seed=0)
    if adaptive:
        clip.attach(optimizer)
    # (1 - 1.4**-2) ** -0.5 = 1.4289: 43% more gradient noise pays for the count
    expected_multiplier = 1.4289 if adaptive else z
    for _ in range(3):
        used = float(optimizer.max_grad_norm)
        noise = step()
        assert noise.std().item() == pytest.approx(expected_multiplier * used, rel=0.04)
        assert optimizer.noise_multiplier == z
    if adaptive:  # every norm (0) is under the clip, so it shrank
        assert float(optimizer.max_grad_norm) < 2.0


def test_clip_trajectory_equals_a_replica_from_per_example_norms(opacus):
    # no noise at all: the clip path is a deterministic function of the per-example norms
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(net)  # hook-free twin for torch.func
    model, optimizer = dp_optimizer(opacus, net, z=0.0, clip_norm=0.3, expected=20, lr=0.5)
    clip = AdaptiveQuantileClip(initial_clip=None, target_quantile=0.7, lr=0.5, count_noise_std=0.0)
    monitor = PerSampleMonitor(quantiles=(0.5,), release_exact_statistics_not_private=True)
    clip.attach(optimizer, monitor=monitor, model=model)
    loader = DataLoader(data(80, seed=2), batch_size=16)  # 16 per step, 20 expected
    replica, c = [], 0.3
    for x, y in loader:
        reference.load_state_dict(net.state_dict())
        norms = from_functional(reference, nn.CrossEntropyLoss(), x, y).total
        fraction = ((norms <= c).sum().item() - len(norms) / 2) / 20 + 0.5
        c = c * math.exp(-0.5 * (fraction - 0.7))
        replica.append(c)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        assert float(optimizer.max_grad_norm) == pytest.approx(c, rel=1e-6)
    events = monitor.flush()
    assert [e.data["clip_norm"] for e in events] == pytest.approx([0.3, *replica[:-1]])
    assert list(events[0].data["quantiles"]) == ["0.5"]
    # no noise: the released fraction is the exact centred count, the one the clip used
    for event in events:
        n = event.data["n"]
        expected = n - event.data["fraction_clipped"] * n - n / 2
        assert 1 - event.data["noised_fraction_clipped"] == pytest.approx(expected / 20 + 0.5)


def test_virtual_steps_count_every_micro_batch(opacus):
    # BatchMemoryManager-style: clip per micro-batch, one noisy step for all of them.
    # Opacus's AdaClipDPOptimizer resets its counts in zero_grad and loses all but the last.
    model, optimizer = dp_optimizer(
        opacus, nn.Linear(4, 1, bias=False), z=0.0, clip_norm=1.0, expected=16, lr=0.0
    )
    clip = AdaptiveQuantileClip(initial_clip=None, count_noise_std=0.0, lr=1.0)
    clip.attach(optimizer)
    x = torch.randn(16, 4)
    x[:8] *= 100.0  # first micro-batch: every example clipped
    x[8:] *= 0.001  # second: none clipped
    for part, last in ((x[:8], False), (x[8:], True)):
        optimizer.signal_skip_step(do_skip=not last)
        optimizer.zero_grad()
        model(part).sum().backward()
        optimizer.step()
    # fraction unclipped over all 16: (8 - 16/2)/16 + 1/2 = 0.5 = target, so C stays
    assert float(optimizer.max_grad_norm) == pytest.approx(1.0)
    assert clip.steps == 1


# -- noise schedulers -------------------------------------------------------------------


def test_a_noise_scheduler_attached_after_attach_schedules_the_noise_added(opacus):
    from opacus.schedulers import ExponentialNoise

    z, sigma_b, batch = 1.0, 0.7, 8
    _, optimizer, step = zero_gradient_setup(opacus, z, batch)
    clip = AdaptiveQuantileClip(initial_clip=None, count_noise_std=sigma_b, seed=0)
    attached = clip.attach(optimizer)
    scheduler = ExponentialNoise(optimizer, gamma=0.5)  # after attach
    budgets = []
    for _ in range(3):
        budget = optimizer.noise_multiplier
        budgets.append(budget)
        want = gradient_noise_multiplier(budget, sigma_b)
        assert attached.noise_multiplier == budget
        assert attached.gradient_noise_multiplier == want
        used = float(optimizer.max_grad_norm)
        noise = step()
        assert noise.std().item() == pytest.approx(want * used, rel=0.04)
        assert optimizer.noise_multiplier == budget  # what the accountant reads
        scheduler.step()
    assert budgets == [1.0, 0.5, 0.25]


def test_a_noise_scheduler_reaches_the_accountant_as_in_plain_opacus(opacus):
    from opacus.schedulers import ExponentialNoise

    def scheduler(optimizer):
        return ExponentialNoise(optimizer, gamma=0.7)

    plain, *_ = private_run(opacus, 1.1, None, epochs=3, scheduler=scheduler)
    clip = AdaptiveQuantileClip(initial_clip=None, seed=0)
    adaptive, *_ = private_run(opacus, 1.1, clip, epochs=3, scheduler=scheduler)
    assert adaptive.accountant.history == plain.accountant.history
    assert [h[0] for h in adaptive.accountant.history] == pytest.approx([1.1, 0.77, 0.539])
    assert adaptive.get_epsilon(1e-5) == plain.get_epsilon(1e-5)


class NothingWritten:
    """Snapshot of what an Opacus step writes: parameters, grads, sums, the accountant."""

    def __init__(self, model, optimizer, clip, history):
        self.model, self.optimizer, self.clip, self.history = model, optimizer, clip, history
        self.params = [p.detach().clone() for p in model.parameters()]
        self.grads = [p.grad.clone() for p in model.parameters()]
        self.state = (clip.clip_norm, clip.steps, len(history), optimizer.noise_multiplier)

    def check(self):
        for p, before, grad in zip(self.model.parameters(), self.params, self.grads):
            assert torch.equal(p.detach(), before) and torch.equal(p.grad, grad)
            assert getattr(p, "summed_grad", None) is None
        state = (self.clip.clip_norm, self.clip.steps, len(self.history))
        assert state == self.state[:3]


def accounted_setup(opacus, z=1.0, count_noise_std=0.7, **clip_args):
    model, optimizer = dp_optimizer(opacus, nn.Linear(6, 2), z=z, clip_norm=1.0, expected=8)
    accountant = opacus.accountants.RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.1))
    clip = AdaptiveQuantileClip(
        initial_clip=None, count_noise_std=count_noise_std, seed=0, **clip_args
    )
    clip.attach(optimizer)
    x = torch.randn(8, 6)

    def backward():
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()

    return model, optimizer, clip, accountant, backward


def test_a_scheduled_noise_the_count_cannot_carry_fails_before_anything_is_written(opacus):
    from opacus.schedulers import LambdaNoise

    model, optimizer, clip, accountant, backward = accounted_setup(opacus)
    scheduler = LambdaNoise(optimizer, noise_lambda=lambda epoch: 1.0 + 2.0 * epoch)
    backward()
    optimizer.step()  # z = 1.0: fine
    scheduler.step()  # z = 3.0 needs count_noise_std > 1.5; it is 0.7
    backward()
    snapshot = NothingWritten(model, optimizer, clip, accountant.history)
    with pytest.raises(
        ValueError, match=r"count_noise_std=0\.7 is too small for noise_multiplier=3"
    ):
        optimizer.step()
    snapshot.check()


def test_a_gradient_clip_scheduler_is_refused_before_anything_is_written(opacus):
    from opacus.schedulers import ExponentialGradClip

    model, optimizer, clip, accountant, backward = accounted_setup(opacus)
    scheduler = ExponentialGradClip(optimizer, gamma=0.5)
    backward()
    optimizer.step()
    scheduler.step()  # writes max_grad_norm, which the adaptive clip drives
    backward()
    snapshot = NothingWritten(model, optimizer, clip, accountant.history)
    with pytest.raises(RuntimeError, match=r"max_grad_norm was set to .* AdaptiveQuantileClip"):
        optimizer.step()
    snapshot.check()


def test_a_huge_clip_lr_does_not_overflow_inside_the_step(opacus):
    # math.exp overflowed after add_noise had written the noised gradient
    _, optimizer, clip, accountant, backward = accounted_setup(opacus, lr=1e4)
    for _ in range(3):
        backward()
        optimizer.step()
    assert clip.steps == 3 and math.isfinite(optimizer.max_grad_norm)
    assert len(accountant.history) == 1 and accountant.history[0][2] == 3


class TestOpacusRefusals:
    @pytest.fixture(autouse=True)
    def _opacus(self, opacus):
        self.opacus = opacus

    def optimizer(self, cls=None, **kwargs):
        opacus = self.opacus
        model = self.model = opacus.GradSampleModule(nn.Linear(3, 1))
        cls = cls or opacus.optimizers.DPOptimizer
        args = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 32}
        args.update(kwargs)
        return cls(torch.optim.SGD(model.parameters(), lr=0.1), **args)

    def test_other_optimizers(self):
        opt = self.optimizer(
            self.opacus.optimizers.AdaClipDPOptimizer,
            target_unclipped_quantile=0.5,
            clipbound_learning_rate=0.2,
            max_clipbound=10.0,
            min_clipbound=0.1,
            unclipped_num_std=2.0,
        )
        with pytest.raises(TypeError, match="optimizer must be Opacus's flat-clipping"):
            AdaptiveQuantileClip().attach(opt)

    def test_secure_mode_needs_a_secure_clip_and_works_with_one(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = self.optimizer(secure_mode=True)
        with pytest.raises(ValueError, match=r"secure_mode=True.*AdaptiveQuantileClip\("):
            AdaptiveQuantileClip().attach(opt)
        assert "clip_and_accumulate" not in opt.__dict__
        clip = AdaptiveQuantileClip(initial_clip=None, secure_mode=True)
        clip.attach(opt)
        for _ in range(2):
            opt.zero_grad()
            self.model(torch.randn(32, 3)).sum().backward()
            opt.step()
        assert clip.steps == 2 and opt.max_grad_norm != 1.0

    @pytest.mark.parametrize(
        ("setting", "value", "kind", "name"),
        [
            ("noise_multiplier", math.nan, ValueError, "optimizer.noise_multiplier"),
            ("noise_multiplier", -1.0, ValueError, "optimizer.noise_multiplier"),
            ("max_grad_norm", -1.0, ValueError, "optimizer.max_grad_norm"),
            ("max_grad_norm", math.nan, ValueError, "optimizer.max_grad_norm"),
            ("expected_batch_size", None, ValueError, "expected_batch_size"),
            ("expected_batch_size", 0, ValueError, "optimizer.expected_batch_size"),
        ],
    )
    def test_bad_optimizer_settings_are_named_and_nothing_is_attached(
        self, setting, value, kind, name
    ):
        opt = self.optimizer()
        setattr(opt, setting, value)
        clip = AdaptiveQuantileClip(initial_clip=None, count_noise_std=5.0)
        with pytest.raises(kind, match=name):
            clip.attach(opt)
        assert "clip_and_accumulate" not in opt.__dict__ and clip._attached is None
        assert clip.clip_norm is None

    def test_bad_monitor_or_model(self):
        opt = self.optimizer()
        with pytest.raises(TypeError, match="monitor"):
            AdaptiveQuantileClip().attach(opt, monitor=object())
        with pytest.raises(TypeError, match="model"):
            AdaptiveQuantileClip().attach(opt, model="net")
        assert "clip_and_accumulate" not in opt.__dict__

    def test_load_state_dict_moves_the_optimizer_clip_norm(self):
        opt = self.optimizer()
        clip = AdaptiveQuantileClip(initial_clip=None, seed=0)
        clip.attach(opt)
        state = dict(clip.state_dict(), clip_norm=0.25)
        clip.load_state_dict(state)
        assert opt.max_grad_norm == 0.25
        with pytest.raises(ValueError, match="clip_norm"):
            clip.load_state_dict(dict(state, clip_norm=None))
        assert opt.max_grad_norm == 0.25

    def test_count_noise_too_small_for_the_budget_fails_at_attach(self):
        # the paper's default sigma_b = 8 / 20 = 0.4 < z / 2
        opt = self.optimizer(noise_multiplier=1.0, expected_batch_size=8)
        with pytest.raises(ValueError, match=r"count_noise_std=0\.4"):
            AdaptiveQuantileClip().attach(opt)
        assert "clip_and_accumulate" not in opt.__dict__  # nothing half-attached

    def test_twice_and_detach(self):
        opt = self.optimizer()
        clip = AdaptiveQuantileClip()
        clip.attach(opt)
        with pytest.raises(ValueError, match="already attached"):
            AdaptiveQuantileClip().attach(opt)
        clip.detach()
        assert "clip_and_accumulate" not in opt.__dict__
        AdaptiveQuantileClip().attach(opt)
