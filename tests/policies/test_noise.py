"""GradientNoise: variance follows eta/(1+t)^gamma, seeded, resumable, recorded by the guard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradguard as gg
from gradguard.policies.noise import GradientNoise
from tests.conftest import forbid_host_sync


def zero_grad_params(*sizes: int) -> list[nn.Parameter]:
    params = []
    for n in sizes:
        p = nn.Parameter(torch.zeros(n))
        p.grad = torch.zeros(n)
        params.append(p)
    return params


def draw(policy: GradientNoise, params: list[nn.Parameter]) -> torch.Tensor:
    """Zero the grads, run one decide + its transforms, return all noise drawn, flat."""
    for p in params:
        p.grad.zero_()
    decision = policy.decide(gg.measure(params), params)
    for transform in decision.transforms:
        transform(params, [p.grad for p in params])
    return torch.cat([p.grad.reshape(-1) for p in params]).double()


@pytest.mark.parametrize(("eta", "gamma"), [(0.01, 0.55), (0.3, 0.55), (1.0, 1.0)])
def test_noise_mean_and_variance_follow_the_formula(eta, gamma):
    params = zero_grad_params(120_000, 80_000)  # two tensors, one draw split between them
    n = 200_000
    policy = GradientNoise(eta=eta, gamma=gamma, seed=0)
    for t in range(6):
        noise = draw(policy, params)
        expected_var = eta / (1 + t) ** gamma
        assert policy.std(t) ** 2 == pytest.approx(expected_var)
        # var estimate has relative s.d. sqrt(2/n) ~ 0.3%; mean has s.d. sigma/sqrt(n)
        assert noise.var().item() == pytest.approx(expected_var, rel=0.02)
        assert abs(noise.mean().item()) < 5 * math.sqrt(expected_var / n)
    # the two tensors are not copies of one draw
    assert not torch.equal(params[0].grad[:1000], params[1].grad[:1000])


def test_noise_is_gaussian():
    params = zero_grad_params(100_000)
    noise = draw(GradientNoise(eta=0.5, gamma=0.0, seed=3), params).numpy() / math.sqrt(0.5)
    # standard normal: P(|z| < 1) = 0.6827, P(|z| < 2) = 0.9545
    assert np.mean(np.abs(noise) < 1) == pytest.approx(0.6827, abs=0.005)
    assert np.mean(np.abs(noise) < 2) == pytest.approx(0.9545, abs=0.003)


def test_same_seed_same_noise_other_seed_other_noise():
    params = zero_grad_params(50, 7)
    a = draw(GradientNoise(seed=11), params)
    b = draw(GradientNoise(seed=11), params)
    c = draw(GradientNoise(seed=12), params)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_state_dict_resumes_the_same_noise_sequence():
    params = zero_grad_params(33, 4)
    policy = GradientNoise(eta=0.3, seed=5)
    for _ in range(3):
        draw(policy, params)
    state = policy.state_dict()
    assert state["step"] == 3
    after = [draw(policy, params) for _ in range(2)]
    resumed = GradientNoise(eta=0.3, seed=999)
    resumed.load_state_dict(state)
    again = [draw(resumed, params) for _ in range(2)]
    for x, y in zip(after, again):
        assert torch.equal(x, y)
    # the step counter came back too: step 3's variance, not step 0's
    assert resumed.step == 5


def test_decide_and_transform_make_no_host_sync():
    params = zero_grad_params(10, 20)
    policy = GradientNoise(seed=0)
    stats = gg.measure(params)
    with forbid_host_sync():
        decision = policy.decide(stats, params)
        for transform in decision.transforms:
            transform(params, [p.grad for p in params])


def test_in_a_guard_chain_the_noise_is_recorded_as_the_transformed_norm(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    policy = gg.chain(gg.SkipNonFinite(), GradientNoise(eta=0.3, seed=1))
    guard = gg.Guard(model, policy, store=tmp_path / "run", log_every=5, health=False)
    results, after = [], []
    for _ in range(10):
        x = torch.randn(16, 4)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        result = guard.step(optimizer, loss=loss)
        after.append(
            torch.linalg.vector_norm(
                torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            ).item()
        )
        results.append(result)
    guard.close()
    steps = gg.RunStore.open(tmp_path / "run").steps()
    np.testing.assert_allclose(steps["clipped_norm"], after, rtol=1e-5)
    # 41 gradient elements with noise s.d. ~0.5 dominate the small true gradients
    assert np.all(steps["clipped_norm"] != steps["total_norm"])
    assert guard.state_dict()["policy"]["1"]["step"] == 10
    assert "GradientNoise(eta=0.3, gamma=0.55, seed=1)" in repr(guard.policy)


class TestBadInput:
    def test_eta(self):
        with pytest.raises(ValueError, match="eta"):
            GradientNoise(eta=0.0)

    def test_gamma(self):
        with pytest.raises(ValueError, match="gamma"):
            GradientNoise(gamma=-0.5)

    def test_seed(self):
        with pytest.raises(ValueError, match="seed"):
            GradientNoise(seed=-1)

    def test_foreign_state(self):
        with pytest.raises(KeyError, match="GradientNoise"):
            GradientNoise().load_state_dict({"step": 1})
