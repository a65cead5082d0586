"""JAX/optax front-end: equality with optax's own clipping, parity of the adaptive
policies with the PyTorch ones, jit without host transfers, and a recorded run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="jax is not installed (pip install jax optax)")
optax = pytest.importorskip("optax", reason="optax is not installed (pip install optax)")
import jax.numpy as jnp  # noqa: E402

import gradguard as gg  # noqa: E402
from gradguard.frontends import jax as ggj  # noqa: E402

from ._checks import check_store  # noqa: E402


def random_tree(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(7, 5)) * scale, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32),
        },
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * scale, jnp.float32),
        "mha": jnp.asarray(rng.normal(size=(6, 2, 3)) * scale, jnp.float32),
        "scale": jnp.asarray(rng.normal() * scale, jnp.float32),
    }


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


PAIRS = {
    "clip_norm(1)": (ggj.clip_norm(1.0), optax.clip_by_global_norm(1.0)),
    "clip_norm(5)": (ggj.clip_norm(5.0), optax.clip_by_global_norm(5.0)),
    "clip_value": (ggj.clip_value(0.5), optax.clip(0.5)),
    "agc": (ggj.agc(0.05, 1e-3), optax.adaptive_grad_clip(0.05, 1e-3)),
}


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("jit", [False, True])
def test_fixed_policies_equal_optax(name, jit):
    ours, theirs = PAIRS[name]
    ou = jax.jit(ours.update) if jit else ours.update
    tu = jax.jit(theirs.update) if jit else theirs.update
    for seed, scale in enumerate([1e-3, 0.1, 1.0, 10.0, 300.0]):
        grads = random_tree(seed, scale)
        params = random_tree(100 + seed)
        mine, state = ou(grads, ours.init(params), params)
        ref, _ = tu(grads, theirs.init(params), params)
        assert_trees_equal(mine, ref)
        stats = state.stats
        assert float(stats.total_norm) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-6)
        assert float(stats.clipped_norm) == pytest.approx(float(optax.tree.norm(ref)), rel=1e-5)


def test_measure_is_optax_norm_bit_for_bit():
    for seed in range(5):
        grads = random_tree(seed, 10.0**seed)
        norms, total = ggj.measure(grads)
        assert float(total) == float(optax.tree.norm(grads))
        expect = [float(jnp.linalg.norm(leaf.reshape(-1))) for leaf in jax.tree.leaves(grads)]
        np.testing.assert_allclose(np.asarray(norms), expect, rtol=1e-6)


def test_clip_norm_records_coefficient_and_threshold():
    grads = random_tree(0, 10.0)
    total = float(optax.tree.norm(grads))
    tx = ggj.clip_norm(1.0)
    _, state = tx.update(grads, tx.init(grads))
    assert float(state.stats.threshold) == 1.0
    assert float(state.stats.clip_coef) == pytest.approx(1.0 / total, rel=1e-6)
    small = jax.tree.map(lambda g: g * 1e-3 / total, grads)
    _, state = tx.update(small, tx.init(grads))
    assert float(state.stats.clip_coef) == 1.0


def test_clip_tensor_norm_clips_each_leaf():
    grads = random_tree(3, 5.0)
    tx = ggj.clip_tensor_norm(1.0)
    out, _ = tx.update(grads, tx.init(grads))
    for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(out)):
        n = float(jnp.linalg.norm(g.reshape(-1)))
        expected = g if n <= 1.0 else g / n
        np.testing.assert_allclose(np.asarray(o), np.asarray(expected), rtol=1e-6)


def norm_sequence():
    rng = np.random.default_rng(0)
    seq = list(np.abs(rng.normal(1.0, 0.1, size=60)))
    seq[35] = 50.0  # a spike
    seq[40] = math.nan  # a non-finite step
    seq[45] = math.inf
    seq[50] = 8.0
    return seq


def tree_with_norm(value: float):
    direction = random_tree(7)
    total = float(optax.tree.norm(direction))
    return jax.tree.map(lambda g: g * (value / total), direction)


def torch_coefs(policy, seq):
    p = torch.nn.Parameter(torch.zeros(10))
    coefs = []
    for v in seq:
        p.grad = torch.full((10,), v / math.sqrt(10.0))
        d = policy.decide(gg.measure([p]), [p])
        coefs.append(float(d.scale) if d.scale is not None else 1.0)
    return coefs


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: ggj.zclip(warmup_steps=10), lambda: gg.ZClip(warmup_steps=10)),
        (
            lambda: ggj.zclip(warmup_steps=10, max_norm=5.0, warmup_max_norm=1.05),
            lambda: gg.ZClip(warmup_steps=10, max_norm=5.0, warmup_max_norm=1.05),
        ),
        (lambda: ggj.autoclip(50.0, history=16), lambda: gg.AutoClip(50.0, history=16)),
        (lambda: ggj.autoclip(90.0, history=100), lambda: gg.AutoClip(90.0, history=100)),
        # the default, unbounded history: exact, then log-binned (here after 16 steps)
        (lambda: ggj.autoclip(30.0, exact_until=16), lambda: gg.AutoClip(30.0, exact_until=16)),
    ],
)
def test_adaptive_policies_match_torch(ours, theirs):
    seq = norm_sequence()
    tx = ours()
    update = jax.jit(tx.update)
    state = tx.init(tree_with_norm(1.0))
    got = []
    for v in seq:
        _, state = update(tree_with_norm(v), state)
        got.append(float(state.stats.clip_coef))
    want = torch_coefs(theirs(), seq)
    finite = [math.isfinite(v) for v in seq]
    np.testing.assert_allclose(np.array(got)[finite], np.array(want)[finite], rtol=2e-5, atol=1e-7)
    assert min(got) < 0.5  # the spike was clipped


def test_skip_nonfinite_keeps_inner_state_and_zeroes_updates():
    tx = ggj.skip_nonfinite(optax.chain(ggj.zclip(warmup_steps=2), optax.adam(1e-2)))
    params = random_tree(1)
    state = tx.init(params)
    for seed in range(4):
        _, state = tx.update(random_tree(seed), state, params)
    bad = random_tree(9)
    bad["dense"]["bias"] = bad["dense"]["bias"].at[0].set(jnp.nan)
    out, new = tx.update(bad, state, params)
    assert bool(new.skipped) and int(new.skips) == 1
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(out))
    assert_trees_equal(new.inner, state.inner)
    out, new = tx.update(random_tree(10), new, params)
    assert not bool(new.skipped)
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(out))


def mlp_init(rng):
    k1, k2 = jax.random.split(rng)
    return {
        "layer0": {"w": jax.random.normal(k1, (8, 16)) * 0.3, "b": jnp.zeros(16)},
        "layer1": {"w": jax.random.normal(k2, (16, 1)) * 0.3, "b": jnp.zeros(1)},
    }


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["layer0"]["w"] + params["layer0"]["b"])
    pred = h @ params["layer1"]["w"] + params["layer1"]["b"]
    return jnp.mean((pred - y) ** 2)


def test_jit_training_run_recorded_without_blocking(tmp_path):
    params = mlp_init(jax.random.PRNGKey(0))
    tx = ggj.skip_nonfinite(optax.chain(ggj.zclip(warmup_steps=10), optax.adam(1e-2)))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(0)
    true_w = rng.normal(size=(8, 1))
    recorder = ggj.JaxRecorder.for_params(params, tmp_path / "run", log_every=10, health=False)
    losses = []
    for i in range(1, 61):
        x = rng.normal(size=(32, 8)).astype(np.float32)
        y = (x @ true_w).astype(np.float32)
        if i == 33:
            x[0, 0] = np.nan  # a corrupted batch
        x, y = jnp.asarray(x), jnp.asarray(y)
        if i % 10:
            # between flushes nothing may leave the device
            with jax.transfer_guard_device_to_host("disallow"):
                params, state, loss = step(params, state, x, y)
                assert recorder.record(i, state, loss=loss, lr=1e-2) is None
        else:
            params, state, loss = step(params, state, x, y)
            assert recorder.record(i, state, loss=loss, lr=1e-2) is not None
        losses.append(float(loss))
    recorder.close()
    assert recorder.transfers == 6
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))
    assert losses[-1] < 0.2 * losses[0]

    names = ggj.leaf_names(params)
    assert names == ("layer0.b", "layer0.w", "layer1.b", "layer1.w")
    out = check_store(tmp_path / "run", 60, names, "jax")
    data = out["data"]
    assert data["skipped"].tolist() == [i == 33 for i in range(1, 61)]
    assert data["reason"][32] == gg.record.SkipReason.NONFINITE
    assert not math.isfinite(data["total_norm"][32])
    assert [e.step for e in out["store"].events("skip")] == [33]
    np.testing.assert_allclose(data["lr"], 1e-2)
    np.testing.assert_allclose(data["loss"][:5], losses[:5], rtol=1e-6)
    # warm-up: no threshold; afterwards ZClip's boundary is recorded
    assert math.isinf(data["threshold"][0]) and math.isfinite(data["threshold"][20])


def test_recorder_needs_gradguard_state(tmp_path):
    tx = optax.adam(1e-3)
    params = mlp_init(jax.random.PRNGKey(0))
    recorder = ggj.JaxRecorder(tmp_path / "r", health=False)
    with pytest.raises(ValueError, match="opt_state"):
        recorder.record(1, tx.init(params))
    recorder.close()


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="max_norm"):
        ggj.clip_norm(-1.0)
    with pytest.raises(ValueError, match="history"):
        ggj.autoclip(10.0, history=0)
    with pytest.raises(ValueError, match="alpha"):
        ggj.zclip(alpha=1.5)


def test_autoclip_default_keeps_every_norm_as_in_torch():
    state = ggj.autoclip().init(tree_with_norm(1.0)).policy
    assert state.buffer.shape == (4096,) and state.bins.shape == (4000,)


@pytest.mark.parametrize(
    "policy",
    [
        lambda: gg.SkipSpike(sigma=3.0, window=8, min_history=4),
        lambda: gg.AdaptiveTensorClip(warmup_steps=5, warmup_max_norm=2.0),
        lambda: gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_steps=5, max_norm=4.0)),
    ],
)
def test_guard_runs_the_torch_policy_update(policy):
    """The same policy object decides alike in torch and inside a jitted optax step."""
    seq = norm_sequence()
    tx = ggj.guard(optax.sgd(0.0), policy())
    update = jax.jit(tx.update)
    state = tx.init(tree_with_norm(1.0))
    torch_policy = policy()
    leaves = jax.tree.leaves(tree_with_norm(1.0))
    params = [torch.nn.Parameter(torch.zeros(int(np.size(x)))) for x in leaves]
    for v in seq:
        tree = tree_with_norm(v)
        _, state = update(tree, state)
        for p, leaf in zip(params, jax.tree.leaves(tree)):
            p.grad = torch.tensor(np.asarray(leaf).reshape(-1))
        stats = gg.measure(params)
        d = torch_policy.decide(stats, params)
        skipped = bool(d.skip) if d.skip is not None else False
        assert bool(state.skipped) == skipped
        if not math.isfinite(v):
            continue
        clipped = stats.norms if d.tensor_scale is None else stats.norms * d.tensor_scale
        clipped = torch.linalg.vector_norm(clipped) * (1.0 if d.scale is None else d.scale)
        assert float(state.stats.clipped_norm) == pytest.approx(float(clipped), rel=1e-4)


def test_guard_skips_keep_the_optimizer_state_and_record_named_events(tmp_path):
    params = mlp_init(jax.random.PRNGKey(1))
    tx = ggj.guard(optax.adam(1e-2))  # the default policy: SkipNonFinite + FeedbackClip
    state = tx.init(params)
    recorder = ggj.JaxRecorder.for_params(params, tmp_path / "run", log_every=4, health=False)
    for i in range(1, 9):
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
        if i == 5:
            grads["layer1"]["w"] = grads["layer1"]["w"].at[0, 0].set(jnp.inf)
        before = state
        updates, state = jax.jit(tx.update)(grads, state, params)
        if i == 5:
            assert bool(state.skipped) and int(state.reason) == gg.record.SkipReason.NONFINITE
            assert_trees_equal(state.inner, before.inner)
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
        recorder.record(i, state)
    recorder.close()
    events = gg.RunStore.open(tmp_path / "run").events("skip")
    assert [e.step for e in events] == [5]
    assert events[0].data["reason"] == "nonfinite"
    assert events[0].data["nonfinite"] == ["layer1.w"]


def test_loss_reaches_the_policies_as_optax_value():
    seen = []

    class LossAware(gg.Policy):
        def update(self, state, inputs, xp):
            seen.append(inputs.loss)
            return gg.policies.Decision(), state

    tx = ggj.guard(optax.sgd(0.1), LossAware())
    params = mlp_init(jax.random.PRNGKey(2))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    tx.update(grads, state, params, value=jnp.asarray(2.5))
    assert float(seen[-1]) == 2.5


def test_policies_that_need_torch_are_refused_in_jax():
    with pytest.raises(TypeError, match="clip_value"):
        tx = ggj.transform(gg.ClipValue(1.0))
        tx.update(random_tree(0), tx.init(random_tree(0)))
    with pytest.raises(TypeError, match="guard"):
        tx = ggj.transform(gg.SkipNonFinite())
        tx.update(random_tree(0), tx.init(random_tree(0)))
