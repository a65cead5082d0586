"""AdaptiveQuantileClip: converges to its quantile, noisy count statistics, the budget split,
and Opacus runs whose epsilon is Opacus's own for the same noise multiplier."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard.privacy import (
    AdaptiveQuantileClip,
    PerSampleMonitor,
    combined_noise_multiplier,
    from_functional,
    gradient_noise_multiplier,
)

torch.set_num_threads(1)
normal_cdf = np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))


# -- the update on plain tensors ------------------------------------------------------


@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_converges_to_the_target_quantile_of_a_fixed_norm_distribution(target):
    gen = torch.Generator().manual_seed(0)
    m = 400
    clip = AdaptiveQuantileClip(initial_clip=0.01, target_quantile=target, lr=0.2, seed=1)
    trajectory = []
    for _ in range(500):
        norms = torch.exp(torch.randn(m, generator=gen))  # lognormal(0, 1), fixed
        trajectory.append(clip.update(norms, expected_size=m))  # count noise m/20 = 20
    late = np.log(trajectory[-200:])
    # share of the distribution below the settled clip norm: Phi(log C)
    assert normal_cdf(late.mean()) == pytest.approx(target, abs=0.03)
    assert normal_cdf(late).min() > target - 0.1 and normal_cdf(late).max() < target + 0.1
    # it started at 0.01, i.e. more than 2 log-units below any of these quantiles
    assert trajectory[0] < 0.02


def test_noisy_fraction_is_unbiased_with_the_count_noise_sd_over_m():
    norms = torch.linspace(0.01, 2.0, 100)
    clip = AdaptiveQuantileClip(initial_clip=1.0, count_noise_std=7.0, seed=3)
    draws = torch.stack(
        [clip.noisy_unclipped_fraction(norms, expected_size=100) for _ in range(4000)]
    ).numpy()
    true_fraction = (norms <= 1.0).double().mean().item()
    assert draws.mean() == pytest.approx(true_fraction, abs=4 * 0.07 / math.sqrt(4000))
    assert draws.std() == pytest.approx(7.0 / 100, rel=0.05)
    assert clip.steps == 0  # measuring the fraction does not move the clip


def test_count_is_centred_and_normalised_by_the_expected_size():
    clip = AdaptiveQuantileClip(initial_clip=1.0, count_noise_std=0.0)
    norms = torch.tensor([0.1, 0.2, 0.5, 0.9, 1.0, 0.7, 1.5, 2.0, 3.0, 4.0])  # 6 of 10 <= 1
    # (6 - 10/2) / 20 + 1/2, not 6/10: the realised batch size is private
    assert clip.noisy_unclipped_fraction(norms, expected_size=20).item() == pytest.approx(0.55)
    new = clip.update(norms, expected_size=20)
    assert new == pytest.approx(math.exp(-0.2 * (0.55 - 0.5)))


def test_an_empty_batch_keeps_the_clip_finite():
    clip = AdaptiveQuantileClip(initial_clip=2.0, seed=0)
    value = clip.update(torch.zeros(0), expected_size=16)
    assert math.isfinite(value) and value > 0


def test_bounds_hold():
    clip = AdaptiveQuantileClip(initial_clip=1.0, count_noise_std=0.0, lr=5.0, max_clip=1.5)
    assert clip.update(torch.full((10,), 100.0), 10) == 1.5
    clip = AdaptiveQuantileClip(initial_clip=1.0, count_noise_std=0.0, lr=50.0, min_clip=0.5)
    assert clip.update(torch.zeros(10), 10) == 0.5


def test_state_dict_resumes_the_same_trajectory():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(32, generator=gen) * 3 for _ in range(10)]
    clip = AdaptiveQuantileClip(initial_clip=1.0, seed=4)
    for norms in batches[:5]:
        clip.update(norms, 32)
    state = clip.state_dict()
    rest = [clip.update(norms, 32) for norms in batches[5:]]
    resumed = AdaptiveQuantileClip(initial_clip=9.0, seed=77)
    resumed.load_state_dict(state)
    assert [resumed.update(norms, 32) for norms in batches[5:]] == rest
    assert resumed.steps == 10


def test_budget_split_follows_theorem_1():
    z, sigma_b = 1.1, 1.6
    sigma = gradient_noise_multiplier(z, sigma_b)
    assert sigma == pytest.approx((1.1**-2 - 3.2**-2) ** -0.5)
    assert sigma > z
    assert combined_noise_multiplier(sigma, sigma_b) == pytest.approx(z)
    assert combined_noise_multiplier(sigma, math.inf) == pytest.approx(sigma)
    assert gradient_noise_multiplier(0.0, 0.0) == 0.0


def test_too_little_count_noise_is_refused_with_both_names():
    # opacus#757: sigma_b = expected_batch_size / 20 = 0.4 cannot carry z = 1.0
    with pytest.raises(ValueError, match=r"count_noise_std=0.4 .*noise_multiplier=1") as info:
        gradient_noise_multiplier(1.0, 0.4)
    assert "noise_multiplier / 2 = 0.5" in str(info.value)


class TestBadArguments:
    def test_values(self):
        for kwargs, name in [
            ({"initial_clip": 0.0}, "initial_clip"),
            ({"target_quantile": 1.5}, "target_quantile"),
            ({"lr": -1.0}, "lr"),
            ({"count_noise_std": -1.0}, "count_noise_std"),
            ({"min_clip": 2.0, "max_clip": 1.0}, "max_clip"),
            ({"seed": -3}, "seed"),
        ]:
            with pytest.raises(ValueError, match=name):
                AdaptiveQuantileClip(**kwargs)

    def test_expected_size(self):
        with pytest.raises(ValueError, match="expected_size"):
            AdaptiveQuantileClip().update(torch.ones(3), 0)

    def test_no_clip_yet(self):
        with pytest.raises(ValueError, match="initial_clip"):
            AdaptiveQuantileClip(initial_clip=None).update(torch.ones(3), 3)


# -- with Opacus ----------------------------------------------------------------------


@pytest.fixture
def opacus():
    return pytest.importorskip("opacus")


def data(n: int = 128, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def private_run(opacus, z: float, clip: AdaptiveQuantileClip | None, epochs: int = 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    engine = opacus.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data(), batch_size=16),
            noise_multiplier=z,
            max_grad_norm=1.0,
        )
    monitor = PerSampleMonitor()
    if clip is not None:
        clip.attach(optimizer, monitor=monitor, model=model)
    bounds = []
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            bounds.append(float(optimizer.max_grad_norm))
    monitor.flush()
    return engine, optimizer, bounds, monitor


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
    assert monitor.history[0].data["quantiles"]["0.5"] > 0


@pytest.mark.parametrize("adaptive", [False, True])
def test_gradient_noise_is_the_split_multiplier_times_the_clip(opacus, adaptive):
    # zero per-example gradients: each step's gradient is the noise alone, / batch size
    z, sigma_b, batch = 1.0, 0.7, 8
    torch.manual_seed(0)
    model = opacus.GradSampleModule(nn.Linear(100, 100))
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=z,
        max_grad_norm=2.0,
        expected_batch_size=batch,
    )
    clip = AdaptiveQuantileClip(initial_clip=None, count_noise_std=sigma_b, seed=0)
    if adaptive:
        clip.attach(optimizer)
    # (1 - 1.4**-2) ** -0.5 = 1.4289: 43% more gradient noise pays for the count
    expected_multiplier = 1.4289 if adaptive else z
    for _ in range(3):
        used = float(optimizer.max_grad_norm)
        optimizer.zero_grad()
        (model(torch.randn(batch, 100)) * 0.0).sum().backward()
        optimizer.step()
        noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * batch
        assert noise.std().item() == pytest.approx(expected_multiplier * used, rel=0.04)
        assert optimizer.noise_multiplier == z
    if adaptive:  # every norm (0) is under the clip, so it shrank
        assert float(optimizer.max_grad_norm) < 2.0


def test_clip_trajectory_equals_a_replica_from_per_example_norms(opacus):
    # no noise at all: the clip path is a deterministic function of the per-example norms
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(net)  # hook-free twin for torch.func
    model = opacus.GradSampleModule(net)
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5),
        noise_multiplier=0.0,
        max_grad_norm=0.3,
        expected_batch_size=20,
    )
    clip = AdaptiveQuantileClip(initial_clip=None, target_quantile=0.7, lr=0.5, count_noise_std=0.0)
    monitor = PerSampleMonitor(quantiles=(0.5,))
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


def test_virtual_steps_count_every_micro_batch(opacus):
    # BatchMemoryManager-style: clip per micro-batch, one noisy step for all of them.
    # Opacus's AdaClipDPOptimizer resets its counts in zero_grad and loses all but the last.
    torch.manual_seed(0)
    model = opacus.GradSampleModule(nn.Linear(4, 1, bias=False))
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=16,
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


class TestOpacusRefusals:
    @pytest.fixture(autouse=True)
    def _opacus(self, opacus):
        self.opacus = opacus

    def optimizer(self, cls=None, **kwargs):
        opacus = self.opacus
        model = opacus.GradSampleModule(nn.Linear(3, 1))
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

    def test_secure_mode(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = self.optimizer(secure_mode=True)
        with pytest.raises(ValueError, match="secure_mode"):
            AdaptiveQuantileClip().attach(opt)

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
