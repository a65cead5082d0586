"""FeedbackClip on hand-built norm, loss and LR sequences: what it clips, and when it tightens."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.ops import NUMPY, TORCH
from gradguard.policies import StepInputs
from gradguard.policies.feedback import FeedbackClip, FeedbackConfig, FeedbackState, initial_state
from tests.conftest import forbid_host_sync


def inputs(xp, norm, loss=None, lr=None, step=0, weights=None, gain=1.0):
    """One step's inputs in ``xp``'s library, as the guard builds them."""
    if xp is NUMPY:
        total = np.float32(norm)
        loss = None if loss is None else np.float32(loss)
        weights = None if weights is None else np.float32(weights)
    else:
        total = torch.tensor(float(norm))
        loss = None if loss is None else torch.tensor(float(loss))
        weights = None if weights is None else torch.tensor(float(weights))
    norms = xp.ravel(total) if xp is TORCH else np.array([total])
    return StepInputs(total, norms, xp, step, loss, lr, weight_norm=weights, step_gain=gain)


def drive(
    norms, losses=None, lrs=None, config=None, xp=NUMPY, policy=None, weights=None, gain=10.0
):
    """Run the pure update over a sequence; return (thresholds, states).

    With ``weights``, the steps are SGD's, at momentum 0.9 unless ``gain`` says otherwise.
    """
    policy = FeedbackClip(**({} if config is None else vars(config))) if policy is None else policy
    state = None
    thresholds, states = [], []
    for i, norm in enumerate(norms):
        step = inputs(
            xp,
            norm,
            None if losses is None else losses[i],
            None if lrs is None else lrs[i],
            i,
            None if weights is None else weights[i],
            gain,
        )
        if state is None:
            state = policy.init(step, xp)
        decision, state = policy.update(state, step, xp)
        thresholds.append(float(decision.threshold))
        states.append(state)
    return thresholds, states


def healthy(n: int, seed: int = 0):
    """Norms around 1 (log-normal, σ 0.3) and a loss falling from 2 to 1 with 5% noise."""
    gen = torch.Generator().manual_seed(seed)
    norms = torch.exp(0.3 * torch.randn(n, generator=gen)).tolist()
    losses = [
        (1 + math.exp(-i / 30)) * (1 + 0.05 * float(torch.randn((), generator=gen)))
        for i in range(n)
    ]
    return norms, losses


def test_healthy_run_is_never_clipped_and_never_tightened():
    norms, losses = healthy(600)
    thresholds, states = drive(norms, losses, [0.1] * 600)
    clipped = sum(n > t for n, t in zip(norms, thresholds))
    assert clipped <= 3  # log-normal norms beyond 4x the running level: almost never
    assert math.isinf(float(states[-1].ceiling))
    assert float(states[-1].episodes) == 0


T = math.log(4.0)  # log of the default spike factor


def test_a_spike_is_clipped_harder_the_larger_it_is_and_leaves_the_level():
    thresholds, states = drive([1.0] * 40 + [100.0] + [1.0] * 5)
    assert math.isinf(thresholds[0])  # no history: no clip at the first step
    assert thresholds[39] == pytest.approx(4.0, rel=1e-5)  # the bound for ordinary steps
    # 100x the level: clipped to level + t²/log(100), about 1.5x the typical norm
    assert thresholds[40] == pytest.approx(math.exp(T * T / math.log(100.0)), rel=1e-5)
    # the level (the log of an EMA of the applied sizes) moves by a bounded step
    clipped = math.exp(T * T / math.log(100.0))
    assert float(states[40].level) == pytest.approx(math.log(0.95 + 0.05 * clipped), rel=1e-4)
    # the level moved by a bounded step only, and the margin widened by one step
    level = math.log(0.95 + 0.05 * clipped)
    assert thresholds[41] == pytest.approx(math.exp(level + T + 0.1), rel=1e-4)
    assert float(states[-1].margin) < 0.1  # and narrows again (by 0.1 × 2/98 a step)
    _, big = drive([1.0] * 40 + [1e4])
    assert float(big[-1].level) < float(states[40].level)  # a bigger outlier, a harder clip


def test_batches_whose_gradient_vanishes_do_not_drag_the_level_down():
    # a model that fits most of its batches: their gradients vanish (1e-8) while the
    # batches it still gets wrong give norms about 1; those must not look like spikes
    norms = [1.0] * 40 + [1e-8, 1e-8, 1.0] * 100
    thresholds, states = drive(norms)
    clipped = sum(n > t for n, t in zip(norms, thresholds))
    assert clipped == 0
    assert float(states[-1].level) > math.log(0.2)  # near the sizes' mean, 1/3
    # and a size near zero moves the level down by log(beta) at most
    _, dip = drive([1.0] * 40 + [1e-30])
    assert float(dip[-1].level) == pytest.approx(math.log(0.95), rel=1e-4)


def test_sizes_beyond_the_margin_that_are_not_rare_widen_it():
    # heavy-tailed sizes (a model that fits most batches): one step in ten is 30x the rest
    norms = ([1.0] * 9 + [30.0]) * 60
    thresholds, states = drive(norms)
    late = range(300, 600)
    clipped = sum(norms[i] > thresholds[i] for i in late)
    assert clipped <= 6  # at most 2 % of the steps (the spike rate)
    assert float(states[-1].margin) > 0.5  # widened ...
    assert float(states[-1].level) > math.log(3.0)  # ... so the level is the mean, 3.9
    # rare spikes leave it at log(spike): a healthy run keeps its margin
    _, calm = drive(([1.0] * 99 + [30.0]) * 6 + [1.0] * 50)
    assert float(calm[-1].margin) < 0.05


def test_an_lr_jump_holds_the_update_size_for_a_few_steps():
    lrs = [0.05] * 30 + [1.0] * 30
    thresholds, states = drive([1.0] * 60, lrs=lrs)
    assert thresholds[29] == pytest.approx(4.0, rel=1e-5)
    # a run of sizes beyond the margin is a new regime: it widens the margin once only
    assert float(states[40].margin) <= 0.1 + 1e-6
    # the size (norm × LR against its recent level) jumps 20x: the norm is clipped so the
    # step stays near the size taken before
    assert thresholds[30] == pytest.approx(math.exp(T * T / math.log(20.0)) / 20, rel=1e-4)
    after = thresholds[30:]
    assert all(t < 1.0 for t in after[:4])  # held while the LR's level catches up
    assert all(t > 1.0 for t in after[15:])  # then the new LR is the run's own


def test_a_restart_to_an_lr_already_used_is_no_jump_but_an_lr_above_all_is():
    # cosine cycles of 50 steps from 0.1 down to 1e-4, restarting at 0.1 (SGDR): the
    # LR's reference does not follow it down, so a restart is no jump ...
    cycle = [1e-4 + 0.5 * (0.1 - 1e-4) * (1 + math.cos(math.pi * i / 50)) for i in range(50)]
    lrs = cycle * 4 + [2.0] * 10  # ... and then 20x the highest LR the run trained at is
    norms = [1.0] * len(lrs)
    thresholds, states = drive(norms, lrs=lrs)
    assert all(t > 1.0 for t in thresholds[1:200])
    assert all(t < 1.0 for t in thresholds[200:204])
    # a decay leaves the reference where it was
    assert float(states[199].lr_level) == pytest.approx(math.log(0.1), abs=1e-5)


def test_a_smooth_warmup_is_never_clipped():
    lrs = [1e-3 * min(1.0, (i + 1) / 40) for i in range(100)]  # linear warm-up from 1/40
    thresholds, _ = drive([1.5] * 100, lrs=lrs)
    assert all(t > 1.5 for t in thresholds[1:])


def test_loss_divergence_caps_the_size_at_twice_the_typical_one():
    norms = [1.0] * 60 + [3.0, 9.0, 27.0, 81.0, 243.0]
    losses = [2.0 - i / 60 for i in range(60)] + [3.0, 10.0, 30.0, 100.0, 300.0]
    thresholds, states = drive(norms, losses, [0.1] * 65)
    # filtered (median of three) losses: 1.0.., 3, 10, 30, 100: elevated from step 61 on,
    # a divergence once three in a row are
    assert [float(s.streak) for s in states[60:]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [float(s.episodes) for s in states[60:]] == [0.0, 0.0, 0.0, 1.0, 1.0]
    # the level is held from the first elevated step, so the ceiling is twice the size
    # the run took before the loss rose
    level = float(states[60].level)
    assert [float(s.level) for s in states[61:]] == [level] * 4
    assert float(states[63].ceiling) == pytest.approx(level + math.log(2.0), rel=1e-5)
    assert thresholds[63] <= math.exp(level + math.log(2.0)) / 0.1 * (1 + 1e-5)


def test_sizes_the_ceiling_holds_do_not_widen_the_margin():
    # a divergence sets a ceiling at twice the typical size; afterwards, isolated sizes
    # 10x the typical one are the ceiling's to hold: the spike margin must not learn them
    norms = [1.0] * 60 + [3.0, 9.0, 27.0, 81.0, 243.0] + ([1.0] * 4 + [10.0]) * 20
    losses = [2.0 - i / 60 for i in range(60)] + [3.0, 10.0, 30.0, 100.0, 300.0]
    losses += [1.0] * (len(norms) - len(losses))
    thresholds, states = drive(norms, losses)
    assert math.isfinite(float(states[-1].ceiling))
    assert all(float(s.margin) == 0.0 for s in states)
    cap = math.exp(float(states[-1].ceiling))  # twice the typical size, 1.1
    assert cap < 2.5 and all(t <= cap * 1.0001 for t in thresholds[70:])


def test_one_or_two_bad_batches_are_not_a_divergence_three_are():
    base = [2.0 - i / 100 for i in range(60)]
    for bad, expected in ((1, 0), (2, 0), (3, 1)):
        losses = base + [1000.0] * bad + [1.4] * 10
        _, states = drive([1.0] * len(losses), losses)
        assert float(states[-1].episodes) == expected, bad


def test_each_new_divergence_halves_the_ceiling_and_healthy_steps_double_it():
    config = FeedbackConfig(interval=20)
    losses = [2.0] * 30 + [50.0] * 3 + [2.0] * 10 + [50.0] * 3 + [2.0] * 45
    _, states = drive([1.0] * len(losses), losses, config=config)
    ceilings = [float(s.ceiling) for s in states]
    first = ceilings[32]
    # confirmed at the first good step after each burst (three elevated medians)
    assert math.isinf(ceilings[32]) and float(states[33].episodes) == 1
    first = ceilings[33]
    assert first == pytest.approx(math.log(2.0), abs=1e-5)  # twice the typical size (1)
    assert ceilings[46] == pytest.approx(first + math.log(0.5), abs=1e-5)
    # 20 healthy steps after the second divergence ends, the ceiling doubles
    end = max(i for i, s in enumerate(states) if float(s.streak) > 0)
    assert ceilings[end + 20] == pytest.approx(first, abs=1e-5)


def test_a_noisy_start_is_not_a_divergence():
    # an autoencoder's first batches (digits, Adam): losses spread 0.8-2.2 with no trend;
    # the noise scale must be its size from the first steps, not an EMA still near zero
    losses = [1.04, 0.87, 2.11, 2.23, 1.01, 1.73, 0.82, 0.84, 1.07, 0.82, 2.16, 1.24, 1.09]
    losses += [0.8 + 0.6 * ((i * 7) % 5) / 4 for i in range(60)]
    _, states = drive([0.1] * len(losses), losses)
    assert float(states[-1].episodes) == 0
    assert math.isinf(float(states[-1].ceiling))


def test_a_loss_that_climbs_from_its_first_step_is_a_divergence_within_five():
    # a climb is a trend, not noise: differences that rise step after step are not
    # learnt as the loss's spread, so the 2 % floor judges it from the third loss on
    losses = [2.9, 3.3, 3.7, 4.1, 4.6, 5.1, 5.7, 6.3]
    _, states = drive([1.0] * len(losses), losses, [0.03] * len(losses))
    assert float(states[4].episodes) == 1.0 and math.isfinite(float(states[4].ceiling))


def test_a_flat_noisy_loss_whose_first_batch_is_its_lowest_is_no_divergence():
    # regression on random targets (Adam), the first batch loss below the next three:
    # a noise scale learnt only from steps that are not elevated stayed at zero, and
    # three "divergences" in 35 steps brought the ceiling to half the typical size
    losses = [0.731, 0.802, 1.304, 0.822, 1.074, 0.664, 0.998, 0.746, 0.908, 1.024, 0.725]
    losses += [0.987, 0.988, 0.724, 0.666, 0.582, 0.840, 0.657, 0.634, 0.861, 0.751, 0.638]
    losses += [0.917, 0.485, 1.110, 0.831, 0.519, 0.926, 0.878, 1.010, 1.148, 1.194, 1.271]
    losses += [0.978, 1.117, 0.661, 0.714, 0.597, 1.100, 0.878, 1.367]
    norms = [0.806, 0.771, 0.847, 0.823, 1.02, 0.766, 1.51, 0.924, 0.658, 1.14, 0.807]
    norms = (norms * 4)[: len(losses)]
    _, states = drive(norms, losses, [3e-3] * len(losses))
    assert float(states[-1].episodes) == 0
    assert math.isinf(float(states[-1].ceiling))


def test_a_fine_tuned_classifier_starting_on_an_easy_batch_is_no_divergence():
    # a breast-cancer MLP fine-tuned at Adam lr 1e-4 (its first 36 steps, recorded):
    # batch losses spread over two decades and the first batches are easy ones; ten
    # "divergences" in 230 steps froze that run (threshold 1/1,000 of its norms)
    losses = [0.0076, 0.0071, 0.031, 0.0027, 0.0065, 0.0298, 0.0585, 0.0138, 0.0958]
    losses += [0.0079, 0.0014, 0.0989, 0.0125, 0.0135, 0.0515, 0.011, 0.0037, 0.0478]
    losses += [0.0403, 0.007, 0.0304, 0.0182, 0.0096, 0.0612, 0.0439, 0.0053, 0.0963]
    losses += [0.0219, 0.0088, 0.0831, 0.0264, 0.134, 0.0983, 0.0538, 0.0095, 0.1387]
    norms = [0.0377, 0.0411, 0.1072, 0.0137, 0.0375, 0.0989, 0.438, 0.0642, 0.2467]
    norms += [0.0523, 0.0085, 0.2133, 0.052, 0.0535, 0.1654, 0.0742, 0.023, 0.2423]
    norms += [0.1502, 0.0239, 0.1376, 0.0585, 0.0341, 0.2039, 0.1364, 0.0194, 0.2015]
    norms += [0.0724, 0.044, 0.2266, 0.3449, 0.2157, 0.1989, 0.3837, 0.0553, 0.3184]
    _, states = drive(norms, losses, [1e-4] * len(losses))
    assert float(states[-1].episodes) == 0


def test_noisy_near_zero_loss_is_not_a_divergence():
    gen = torch.Generator().manual_seed(3)
    losses = [2.3 * math.exp(-i / 40) for i in range(300)]
    for _ in range(600):  # 1e-3 with 10x outliers, sometimes two in a row
        outlier = float(torch.rand((), generator=gen)) < 0.15
        losses.append(
            1e-3 * (10.0 if outlier else 1.0) * (0.5 + float(torch.rand((), generator=gen)))
        )
    _, states = drive([1.0] * len(losses), losses)
    assert float(states[-1].episodes) == 0


def test_non_finite_norm_leaves_the_level_and_non_finite_loss_is_elevated():
    norms = [1.0] * 10 + [math.nan, math.inf]
    thresholds, states = drive(norms)
    assert float(states[-1].count) == 10 and float(states[-1].level) == 0.0
    assert thresholds[-1] == pytest.approx(4.0)
    losses = [1.0] * 10 + [math.nan] * 4  # one NaN loss is an outlier; a run of them diverges
    _, states = drive([1.0] * 14, losses)
    assert [float(s.streak) for s in states[-4:]] == [0.0, 1.0, 2.0, 3.0]
    assert float(states[-1].episodes) == 1.0
    assert math.isfinite(float(states[-1].slow))


def test_a_step_with_a_non_finite_norm_leaves_the_whole_state_as_it_was():
    # the step is skipped (SkipNonFinite): its loss and LR must not teach the policy, or a
    # run that skipped it would decide differently later than one that never saw it
    norms, losses = healthy(40)
    lrs = [0.1] * 40
    _, states = drive(norms[:30], losses[:30], lrs[:30])
    _, with_bad = drive(
        [*norms[:30], math.nan, math.inf], [*losses[:30], 50.0, 60.0], [*lrs[:30], 1.0, 1.0]
    )
    for field in FeedbackState._fields:
        assert float(getattr(with_bad[-1], field)) == float(getattr(states[-1], field)), field


def test_without_a_loss_it_only_clips_spikes():
    thresholds, states = drive([1.0] * 20 + [50.0] * 20)
    assert math.isinf(float(states[-1].ceiling))
    assert thresholds[20] == pytest.approx(math.exp(T * T / math.log(50.0)), rel=1e-5)
    assert all(float(s.streak) == 0 for s in states)


def _decisions(policy, norms, losses, lr=0.1):
    out = []
    for norm, loss in zip(norms, losses):
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.tensor([float(norm)])
        decision = policy.decide(gg.measure([p]), [p], loss=torch.tensor(float(loss)), lr=lr)
        out.append(float(decision.scale))
    return out


def test_state_dict_resumes_the_same_decisions():
    norms, losses = healthy(80, seed=1)
    norms[60:63] = [20.0, 40.0, 80.0]
    losses[60:64] = [30.0, 60.0, 90.0, 120.0]
    first = FeedbackClip()
    _decisions(first, norms[:50], losses[:50])
    saved = first.state_dict()
    resumed = FeedbackClip()
    resumed.load_state_dict(saved)
    assert _decisions(first, norms[50:], losses[50:]) == _decisions(
        resumed, norms[50:], losses[50:]
    )
    with pytest.raises(KeyError, match="lacks"):
        FeedbackClip().load_state_dict({"count": torch.zeros(())})


def test_rewound_keeps_the_lesson_a_tighter_ceiling():
    policy = FeedbackClip()
    _decisions(policy, [1.0] * 30, [1.0] * 30)
    snapshot = policy.state_dict()
    _decisions(policy, [5.0] * 4, [50.0] * 4)
    before = policy.state_dict()
    assert float(before["episodes"]) == 1 and math.isfinite(float(before["ceiling"]))
    policy.load_state_dict(snapshot)
    policy.rewound(before)
    after = policy.state_dict()
    assert float(after["ceiling"]) == pytest.approx(float(before["ceiling"]) + math.log(0.5))
    assert float(after["count"]) == 30  # the rest is the snapshot's
    assert float(policy.divergences) == 1
    fresh = FeedbackClip()  # a rewind before any divergence: twice the typical size, halved
    fresh.rewound(snapshot)
    assert float(fresh.state_dict()["ceiling"]) == pytest.approx(float(snapshot["level"]))


def test_decide_makes_no_host_sync():
    policy = gg.chain(gg.SkipNonFinite(), FeedbackClip())
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    stats = gg.measure([p])
    with forbid_host_sync():
        for _ in range(5):  # a tensor LR, as a fused optimizer on a device keeps it
            policy.decide(stats, [p], loss=torch.tensor(1.0), lr=torch.tensor(0.1))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"spike": 1.0}, "spike must be > 1"),
        ({"backoff": 1.0}, "backoff must lie strictly between 0 and 1"),
        ({"growth": 0.5}, "growth must be a finite number >= 1"),
        ({"interval": 0}, "interval must be >= 1"),
        ({"loss_z": -1.0}, "loss_z must be a finite number > 0"),
        ({"progress": math.nan}, "progress must be a finite number >= 0"),
        ({"spike_rate": 1.0}, "spike_rate must lie strictly between 0 and 1"),
        ({"widen": 0.0}, "widen must be a finite number > 0"),
    ],
)
def test_bad_settings_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        FeedbackClip(**settings)


def test_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError):
        FeedbackClip(threshold=1.0)


def test_state_fields_are_zero_dim_float32():
    state = initial_state(TORCH, torch.zeros(()))
    assert all(t.shape == () and t.dtype == torch.float32 for t in state)
    state = initial_state(NUMPY, np.float32(0.0))
    assert all(np.asarray(v).dtype == np.float32 for v in state)
    assert FeedbackState._fields[0] == "count"


def _sequence():
    norms, losses = healthy(120, seed=5)
    norms[50:53] = [30.0, 90.0, 270.0]
    losses[50:56] = [20.0, 40.0, 80.0, 160.0, 320.0, 640.0]
    norms[90] = math.nan
    lrs = [0.1] * 70 + [1.0] * 50  # an LR jump
    return norms, losses, lrs


def test_host_and_device_decide_alike():
    norms, losses, lrs = _sequence()
    host, host_states = drive(norms, losses, lrs, xp=NUMPY)
    device, device_states = drive(norms, losses, lrs, xp=TORCH)
    np.testing.assert_allclose(device, host, rtol=1e-5)
    assert float(host_states[-1].episodes) == float(device_states[-1].episodes) >= 1
    # a tensor LR (on the device) gives the same decisions as a number
    tensor_lr, _ = drive(norms, losses, [torch.tensor(v) for v in lrs], xp=TORCH)
    np.testing.assert_allclose(tensor_lr, host, rtol=1e-5)


def test_runs_jitted_in_jax_with_the_same_decisions():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from gradguard.frontends import jax as ggj

    norms, losses, _ = _sequence()
    expected, _ = drive(norms, losses)  # no LR: the optax guard gives none
    tx = ggj.guard(optax.sgd(0.0), FeedbackClip())
    params = {"w": jnp.zeros(1, jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    thresholds = []
    for norm, loss in zip(norms, losses):
        grads = {"w": jnp.asarray([norm], jnp.float32)}
        _, state = update(grads, state, params, value=jnp.asarray(loss, jnp.float32))
        thresholds.append(float(state.stats.threshold))
    np.testing.assert_allclose(thresholds, expected, rtol=1e-4)


def test_the_default_follows_a_norm_that_climbs_where_zclip_clips_for_good():
    # a healthy LSTM's norms climb ×10 within 50 steps after the first 25 (measured:
    # healthy_lstm_clip of the diagnosis corpus, 0.2 → 2); ZClip's statistics learn from
    # clipped norms, so a climb faster than they follow is clipped for good — the reason
    # the default changed
    gen = torch.Generator().manual_seed(3)
    n = 300
    norms = [
        0.2
        * 10 ** (min(max(i - 25, 0), 50) / 50)
        * math.exp(0.2 * float(torch.randn((), generator=gen)))
        for i in range(n)
    ]
    losses = [1.0 + math.exp(-i / 50) for i in range(n)]

    def clip_rate(policy):
        thresholds, _ = drive(norms, losses, [3e-3] * n, policy=policy)
        return sum(g > t for g, t in zip(norms, thresholds)) / n

    assert clip_rate(gg.default_policy()) <= 0.02
    assert clip_rate(gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_max_norm=10.0))) > 0.5
    assert isinstance(gg.default_policy().policies[1], FeedbackClip)


# -- unstable SGD steps: k·lr·‖g‖ > step_alarm·‖w‖ (k: momentum's gain) and
# lr·‖g‖² > step_overshoot·loss lower the ceiling to a carried step of step_ratio·‖w‖ --

STEP = FeedbackConfig()  # the rule is on by default
OFF = FeedbackConfig(step_ratio=0.0)


def opt_in() -> gg.Policy:
    """The default chain (its unstable-step rule is on)."""
    return gg.default_policy()


def rule_off() -> gg.Policy:
    return gg.chain(gg.SkipNonFinite(), FeedbackClip(step_ratio=0.0))


@pytest.mark.parametrize("xp", [NUMPY, TORCH], ids=["host", "device"])
def test_an_unstable_sgd_step_lowers_the_ceiling_from_the_first_step(xp):
    # an RNN unstable from its first step (SGD, momentum 0.9): norms of 10 at lr 0.1
    # move weights of norm 6 by 1 (16 %) per step, 10 carried, and with a loss of 1
    # overshoot it (lr·‖g‖² = 10 > 4); no statistic has been learnt yet, the rule needs none
    thresholds, states = drive(
        [10.0, 12.0, 30.0, 0.1, 0.1],
        [1.0, 1.0, 1.0, 0.9, 0.9],
        lrs=[0.1] * 5,
        weights=[6.0, 6.0, 6.5, 6.5, 6.5],
        xp=xp,
        config=STEP,
    )
    # a carried step of 10 % is a norm of 0.1 · 6 / (10 · 0.1) = 0.6; the ceiling keeps
    # the lowest
    np.testing.assert_allclose(thresholds, [0.6] * 5, rtol=1e-5)
    assert float(states[-1].episodes) == 0  # not a loss divergence: Rewind is not told


@pytest.mark.parametrize("xp", [NUMPY, TORCH], ids=["host", "device"])
def test_a_step_carrying_the_weights_half_their_norm_is_unstable(xp):
    # multiplication at lr 0.2, momentum 0.9, weights of norm 6.4: a first norm of 2
    # carries them 10 · 0.2 · 2 = 4 (62 %) and overshoots a loss of 0.15
    # (lr·‖g‖² = 0.8 > 0.6): a carried step of 10 % from the first step
    first = drive([2.0], [0.15], lrs=[0.2], weights=[6.4], xp=xp, config=STEP)[0]
    assert first == [pytest.approx(0.1 * 6.4 / (10 * 0.2), rel=1e-5)]
    # a carried step of 41 % that overshoots as much is left alone
    assert drive([1.3], [0.05], lrs=[0.2], weights=[6.4], xp=xp, config=STEP)[0] == [math.inf]


def test_a_step_under_the_alarm_is_left_alone():
    # the same norm at lr 0.001 moves the weights by 0.17 %: nothing happens
    assert drive([10.0], lrs=[0.001], weights=[6.0], config=STEP)[0] == [math.inf]
    norms, losses = healthy(300)
    free, free_states = drive(norms, losses, [0.01] * 300)
    bounded, bounded_states = drive(norms, losses, [0.01] * 300, weights=[5.0] * 300, config=STEP)
    assert bounded == free
    for a, b in zip(bounded_states, free_states):
        assert all(float(x) == float(y) for x, y in zip(a, b))


@pytest.mark.parametrize("with_loss", [True, False], ids=["loss", "no-loss"])
def test_the_lowered_ceiling_grows_back_after_healthy_steps(with_loss):
    # without a loss only the rule that does not ask for one (step_overshoot=0) acts
    config = FeedbackConfig(interval=50, step_overshoot=4.0 if with_loss else 0)
    norms, losses = healthy(121)
    norms[0] = 10.0  # lr·‖g‖² = 10 overshoots the first loss (2) by more than 4×
    _, states = drive(
        norms, losses if with_loss else None, [0.1] * 121, weights=[6.0] * 121, config=config
    )
    ceiling = [math.exp(float(s.ceiling)) for s in states]  # a constant LR: sizes are norms
    assert ceiling[0] == pytest.approx(0.6, rel=1e-5)
    assert ceiling[49] == pytest.approx(0.6, rel=1e-5)
    assert ceiling[50] == pytest.approx(1.2, rel=1e-5)  # ×2 after 50 healthy steps
    assert ceiling[100] == pytest.approx(2.4, rel=1e-5)


def test_without_the_weight_norm_or_with_zero_weights_nothing_happens():
    # no weight norm (an adaptive optimizer): the first step has no threshold at all
    assert drive([10.0], lrs=[0.1], config=STEP)[0] == [math.inf]
    # weights all zero (a model initialised at zero) or no LR: no rule either
    assert drive([10.0], lrs=[0.1], weights=[0.0], config=STEP)[0] == [math.inf]
    assert drive([10.0], weights=[6.0], config=STEP)[0] == [math.inf]
    # switched off
    assert drive([10.0], [1.0], lrs=[0.1], weights=[6.0], config=OFF)[0] == [math.inf]
    assert drive([10.0], [1.0], lrs=[0.1], weights=[6.0])[0] == [pytest.approx(0.6, rel=1e-5)]


@pytest.mark.parametrize("xp", [NUMPY, TORCH], ids=["host", "device"])
def test_a_big_step_that_does_not_overshoot_the_loss_is_left_alone(xp):
    # a logistic regression whose weights start near zero (norm 5e-4): its first step
    # moves them by 280 times their norm, yet lr·‖g‖² = 0.2 is far under 4 × its loss
    big = dict(lrs=[0.1], weights=[5e-4], xp=xp, config=STEP)
    assert drive([1.4], [0.69], **big)[0] == [math.inf]
    # the same step where the loss is nearly 0 overshoots it: the 1 % ceiling
    assert drive([1.4], [0.01], **big)[0] == [pytest.approx(0.01 * 5e-4 / 0.1, rel=1e-5)]
    # no loss, or a loss that is not positive, cannot confirm an overshoot
    assert drive([1.4], **big)[0] == [math.inf]
    assert drive([1.4], [-0.5], **big)[0] == [math.inf]
    assert drive([1.4], [math.nan], **big)[0] == [math.inf]
    # step_overshoot=0 asks for no loss: the step alone trips the rule
    alone = FeedbackConfig(step_overshoot=0.0)
    assert drive([1.4], lrs=[0.1], weights=[5e-4], xp=xp, config=alone)[0] == [
        pytest.approx(0.01 * 5e-4 / 0.1, rel=1e-5)
    ]


@pytest.mark.parametrize("host_math", [True, False], ids=["host", "device"])
def test_the_guard_gives_the_weight_norm_to_sgd_only(host_math):
    def first_threshold(make_optimizer):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        weights = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
        optimizer = make_optimizer(model.parameters())
        guard = gg.Guard(model, opt_in(), host_math=host_math)
        loss = (100 * model(torch.randn(8, 4))).pow(2).mean()
        loss.backward()
        return float(guard.step(optimizer, loss=loss).threshold), weights

    # a carried step of 10 % of the weights: at momentum 0.9 a single step of 1 %
    threshold, weights = first_threshold(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert threshold == pytest.approx(0.01 * weights / 0.1, rel=1e-5)
    threshold, _ = first_threshold(
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)
    )
    assert threshold == pytest.approx(0.01 * weights / 0.1, rel=1e-5)
    threshold, _ = first_threshold(lambda p: torch.optim.SGD(p, lr=0.1))  # no momentum
    assert threshold == pytest.approx(0.1 * weights / 0.1, rel=1e-5)
    threshold, _ = first_threshold(lambda p: torch.optim.AdamW(p, lr=0.1))
    assert threshold == math.inf  # Adam's step is not lr × g: no rule, no history yet


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"step_ratio": -0.1}, "step_ratio"),
        ({"step_alarm": 0.0}, "step_alarm"),
        ({"step_overshoot": math.nan}, "step_overshoot"),
    ],
)
def test_bad_step_settings_are_named(settings, match):
    with pytest.raises(ValueError, match=match):
        FeedbackClip(**settings)


def test_process_gives_the_weight_norm_when_told_the_step_is_sgd():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    weights = float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm())
    batch = torch.randn(8, 4)

    def first_threshold(**told):
        model.zero_grad()
        loss = (100 * model(batch)).pow(2).mean()
        loss.backward()
        guard = gg.Guard(model, opt_in(), health=False)
        return float(guard.process(loss=loss, lr=0.1, **told).threshold)

    assert first_threshold() == math.inf  # not told: no rule
    # True: no momentum, a carried step of 10 %; a gain of 10 (momentum 0.9): 1 % a step
    assert first_threshold(sgd=True) == pytest.approx(0.1 * weights / 0.1, rel=1e-5)
    assert first_threshold(sgd=10.0) == pytest.approx(0.01 * weights / 0.1, rel=1e-5)
    assert first_threshold(sgd=0.0) == math.inf  # 0: not SGD
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="sgd"):
            first_threshold(sgd=bad)


@pytest.mark.parametrize("xp", [NUMPY, TORCH], ids=["host", "device"])
def test_the_rule_judges_the_step_momentum_carries(xp):
    # a step of 50 % of the weights' norm that overshoots the loss (lr·‖g‖² = 15 > 4):
    # plain SGD on the edge of stability takes it once, and it is left alone; under
    # momentum 0.9 the same gradient, persisting, moves the weights 10 times as far
    step = dict(lrs=[0.1], weights=[6.0], xp=xp)
    assert drive([30.0], [0.2], gain=1.0, **step)[0] == [math.inf]
    assert drive([30.0], [0.2], gain=10.0, **step)[0] == [pytest.approx(0.6, rel=1e-5)]
    # plain SGD is stopped once its single step is bigger than the weights themselves:
    # then capped at a step of 10 %
    assert drive([90.0], [0.2], gain=1.0, **step)[0] == [pytest.approx(6.0, rel=1e-5)]


def test_the_momentum_gain_is_read_from_the_optimizer():
    from gradguard._update import sgd_step_gain

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert sgd_step_gain(torch.optim.SGD(params, lr=0.1)) == 1.0
    assert sgd_step_gain(torch.optim.SGD(params, lr=0.1, momentum=0.9)) == pytest.approx(10)
    assert sgd_step_gain(
        torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    ) == pytest.approx(10)
    assert sgd_step_gain(
        torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5)
    ) == pytest.approx(5)
    assert sgd_step_gain(torch.optim.SGD(params, lr=0.1, momentum=0.99)) == pytest.approx(100)
    assert sgd_step_gain(torch.optim.AdamW(params, lr=0.1)) == 0.0  # not lr × g


def test_the_guard_warns_once_when_the_rule_needs_a_loss_it_is_not_given():
    def steps(policy, make_optimizer, with_loss):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = make_optimizer(model.parameters())
        guard = gg.Guard(model, policy, health=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                optimizer.zero_grad()
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                guard.step(optimizer, loss=loss if with_loss else None)
        return [str(w.message) for w in caught if "needs the step's loss" in str(w.message)]

    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    assert len(steps(opt_in(), sgd, with_loss=False)) == 1  # once, not every step
    assert steps(opt_in(), sgd, with_loss=True) == []
    assert steps(rule_off(), sgd, with_loss=False) == []  # the rule is off
    assert steps(opt_in(), lambda p: torch.optim.AdamW(p, lr=0.1), with_loss=False) == []
    # the size test alone asks for no loss
    alone = gg.chain(gg.SkipNonFinite(), FeedbackClip(step_overshoot=0.0))
    assert steps(alone, sgd, with_loss=False) == []


def counted_weight_measurements(monkeypatch):
    """Count the guard's passes over the weights; an SGD-trained linear model and its guard."""
    import gradguard.guard as guard_module

    calls = []
    measure = guard_module.measure_weights
    monkeypatch.setattr(
        guard_module, "measure_weights", lambda *a, **k: calls.append(1) or measure(*a, **k)
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return calls, model, optimizer, gg.Guard(model, opt_in(), health=False)


def test_the_guard_measures_the_weights_every_ten_steps(monkeypatch):
    import gradguard.guard as guard_module

    calls, model, optimizer, guard = counted_weight_measurements(monkeypatch)
    for _ in range(25):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        guard.step(optimizer, loss=loss)
    assert len(calls) == 3 == math.ceil(25 / guard_module.WEIGHTS_EVERY)
    # a policy that does not read it never pays for it
    calls.clear()
    guard = gg.Guard(model, rule_off(), health=False)
    optimizer.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    guard.step(optimizer)
    assert calls == []


def test_a_rewind_or_a_loaded_state_makes_the_guard_measure_the_weights_again(monkeypatch):
    calls, model, optimizer, guard = counted_weight_measurements(monkeypatch)
    rewind = gg.Rewind(model, optimizer, guard=guard, every=1)

    def step(loss_value=None):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        guard.step(optimizer, loss=loss)
        return rewind.step(loss if loss_value is None else loss_value)

    step(), step()
    assert len(calls) == 1  # measured at the first step, then reused
    with pytest.warns(RuntimeWarning, match="rewound"):
        assert step(math.nan) is not None  # a non-finite loss: restored
    step()
    assert len(calls) == 2  # the restored weights are measured, not the cached norm
    guard.load_state_dict(guard.state_dict())
    step()
    assert len(calls) == 3


def test_a_linear_model_with_small_weights_is_left_alone_unless_the_loss_is_ignored():
    # a linear model's weights start small and must grow, so a healthy SGD step moves
    # them by far more than 10 % (logistic regression on scikit-learn's breast cancer
    # set, weights initialised at 1e-4, lr 0.1); such steps do not overshoot the loss
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(labels, dtype=torch.float32)[:, None]

    def final_loss(policy):
        torch.manual_seed(0)
        model = torch.nn.Linear(x.shape[1], 1)
        torch.nn.init.normal_(model.weight, std=1e-4)
        torch.nn.init.zeros_(model.bias)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = gg.Guard(model, policy, health=False)
        for _ in range(200):
            index = torch.randint(0, len(x), (32,))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            guard.step(optimizer, loss=loss)
        with torch.no_grad():
            return float(torch.nn.functional.binary_cross_entropy_with_logits(model(x), y))

    unclipped = final_loss(gg.Monitor())
    assert final_loss(None) == pytest.approx(unclipped, rel=0.02)  # the default
    assert final_loss(opt_in()) == pytest.approx(unclipped, rel=0.02)
    # the size test alone (no overshoot asked) holds the weights back
    alone = gg.chain(gg.SkipNonFinite(), FeedbackClip(step_overshoot=0.0))
    assert final_loss(alone) > 3 * unclipped


def test_a_state_saved_before_the_margin_existed_still_loads():
    policy = FeedbackClip()
    saved = {name: torch.zeros(()) for name in FeedbackClip.State._fields if name != "margin"}
    saved["ceiling"] = torch.full((), math.inf)
    policy.load_state_dict(saved)
    assert float(policy.state_dict()["margin"]) == 0.0
    with pytest.raises(KeyError, match="lacks"):
        policy.load_state_dict({"level": torch.zeros(())})
