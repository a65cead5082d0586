"""AdaptiveQuantileClip on plain tensors: converges to its quantile, the noisy count's
statistics, bounded overflow-free steps, checked state, secure count noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradguard.privacy import AdaptiveQuantileClip

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

    def test_a_negative_or_nan_count_noise_override_is_refused_not_skipped(self):
        # the override used to skip the noise silently when negative (exact counts released)
        clip = AdaptiveQuantileClip(initial_clip=1.0, seed=0)
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="count_noise_std"):
                clip.noisy_unclipped_fraction(torch.ones(4), 4, bad)
            with pytest.raises(ValueError, match="count_noise_std"):
                clip.update(torch.ones(4), 4, bad)
        assert clip.steps == 0 and clip.clip_norm == 1.0

    def test_norms_must_be_a_real_floating_tensor(self):
        clip = AdaptiveQuantileClip(seed=0)
        for bad in (
            [1.0, 2.0],
            torch.ones(3, dtype=torch.int64),
            torch.ones(3, dtype=torch.cfloat),
        ):
            with pytest.raises(TypeError, match="norms"):
                clip.update(bad, 3)

    def test_initial_clip_outside_the_bounds(self):
        with pytest.raises(ValueError, match=r"initial_clip must lie in \[min_clip, max_clip\]"):
            AdaptiveQuantileClip(initial_clip=5.0, max_clip=2.0)

    def test_fraction_must_be_finite(self):
        for bad in (math.nan, math.inf, "0.5", True):
            with pytest.raises((TypeError, ValueError), match="fraction"):
                AdaptiveQuantileClip().update_from_fraction(bad)

    def test_secure_mode_takes_no_seed(self):
        with pytest.raises(ValueError, match="seed: secure_mode=True"):
            AdaptiveQuantileClip(seed=1, secure_mode=True)
        with pytest.raises(TypeError, match="secure_mode"):
            AdaptiveQuantileClip(secure_mode=1)


@pytest.mark.parametrize("lr", [1e3, 1e6, 1e300])
def test_a_huge_lr_or_noise_draw_stays_inside_the_bounds_without_overflow(lr):
    # math.exp(-lr * (fraction - target)) overflowed above ~709, after Opacus had
    # already written the noised gradient
    clip = AdaptiveQuantileClip(initial_clip=1.0, lr=lr, count_noise_std=0.0, max_clip=1e4)
    assert clip.update(torch.full((10,), 100.0), 10) == 1e4  # all clipped: grow to the cap
    assert clip.update(torch.zeros(10), 10) == clip.min_clip  # none clipped: shrink to floor
    unbounded = AdaptiveQuantileClip(initial_clip=1.0, lr=lr, count_noise_std=0.0)
    grown = unbounded.update(torch.full((10,), 100.0), 10)
    assert math.isfinite(grown) and grown > 1.0
    # seed 6 draws |N(0, 1)| > 1.8, so 1e308 times it overflows to inf
    huge_noise = AdaptiveQuantileClip(initial_clip=1.0, lr=lr, count_noise_std=1e308, seed=6)
    assert math.isfinite(huge_noise.update(torch.ones(10), 10))


def test_the_step_equals_the_paper_formula_inside_the_bounds():
    clip = AdaptiveQuantileClip(initial_clip=0.7, target_quantile=0.3, lr=0.4)
    want = 0.7 * math.exp(-0.4 * (0.9 - 0.3))
    assert clip.update_from_fraction(0.9) == pytest.approx(want, rel=1e-14)
    assert clip.steps == 1


class TestLoadStateDict:
    def trained(self) -> AdaptiveQuantileClip:
        clip = AdaptiveQuantileClip(initial_clip=1.0, seed=4, max_clip=50.0)
        for k in range(3):
            clip.update(torch.linspace(0, 3, 16) * (k + 1), 16)
        return clip

    @pytest.mark.parametrize(
        ("key", "value", "error"),
        [
            ("clip_norm", -1.0, ValueError),
            ("clip_norm", math.nan, ValueError),
            ("clip_norm", math.inf, ValueError),
            ("clip_norm", 0.0, ValueError),
            ("clip_norm", 100.0, ValueError),  # above max_clip
            ("clip_norm", "1.0", TypeError),
            ("steps", -1, ValueError),
            ("steps", 2.5, TypeError),
            ("rng", {"seed": -1, "states": {}}, ValueError),
            ("rng", {"seed": 0, "states": {"cpu": [1, 2]}}, ValueError),
            ("rng", {"secure": True}, ValueError),
        ],
    )
    def test_a_bad_entry_is_named_and_nothing_changes(self, key, value, error):
        clip = self.trained()
        state = clip.state_dict()
        before = (clip.clip_norm, clip.steps)
        bad = dict(state, **{key: value})
        with pytest.raises(error, match=rf"state_dict\['{key}'\]"):
            clip.load_state_dict(bad)
        assert (clip.clip_norm, clip.steps) == before
        # the generator state is untouched too: the trajectory continues as if never asked
        twin = self.trained()
        norms = torch.linspace(0, 2, 16)
        assert clip.update(norms, 16) == twin.update(norms, 16)

    def test_missing_keys_and_not_a_mapping(self):
        with pytest.raises(KeyError, match="rng"):
            AdaptiveQuantileClip().load_state_dict({"clip_norm": 1.0, "steps": 0})
        with pytest.raises(TypeError, match="state_dict must be a mapping"):
            AdaptiveQuantileClip().load_state_dict([("clip_norm", 1.0)])


class TestSecureCountNoise:
    def test_the_count_noise_is_unseeded_with_the_configured_sd(self):
        norms = torch.linspace(0.01, 2.0, 100)  # 50 of 100 under the clip
        draws = []
        for _ in range(2):
            clip = AdaptiveQuantileClip(initial_clip=1.0, count_noise_std=5.0, secure_mode=True)
            draws.append(
                torch.stack([clip.noisy_unclipped_fraction(norms, 100) for _ in range(3000)])
            )
        a, b = (d.numpy() for d in draws)
        assert not np.array_equal(a, b)  # two secure clips never repeat each other
        both = np.concatenate([a, b])
        assert both.mean() == pytest.approx(0.5, abs=4 * 0.05 / math.sqrt(6000))
        assert both.std() == pytest.approx(5.0 / 100, rel=0.05)

    def test_state_dict_resumes_a_secure_clip_and_refuses_to_mix_kinds(self):
        clip = AdaptiveQuantileClip(initial_clip=2.0, secure_mode=True)
        clip.update(torch.ones(8), 8)
        state = clip.state_dict()
        resumed = AdaptiveQuantileClip(secure_mode=True)
        resumed.load_state_dict(state)
        assert (resumed.clip_norm, resumed.steps) == (clip.clip_norm, 1)
        with pytest.raises(ValueError, match="secure_mode"):
            AdaptiveQuantileClip(seed=0).load_state_dict(state)
        with pytest.raises(ValueError, match="secure_mode=True"):
            resumed.load_state_dict(AdaptiveQuantileClip(seed=0).state_dict())
