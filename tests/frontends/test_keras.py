"""Keras 3 front-end (TensorFlow backend): the clipping-argument mapping equals Keras's
own clipping, and ``model.fit`` with the callback yields a run store."""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# paddlepaddle 3.3 segfaults when imported after tensorflow 2.21 in one process (the
# other order works); load it first so the Paddle tests can run in the same session.
with contextlib.suppress(ImportError):
    import paddle  # noqa: F401
tf = pytest.importorskip(
    "tensorflow", reason="tensorflow is not installed (pip install tensorflow-cpu)"
)
keras = pytest.importorskip("keras", reason="keras 3 is not installed (pip install keras)")
if not keras.__version__.startswith("3") or keras.backend.backend() != "tensorflow":
    pytest.skip("needs Keras 3 with KERAS_BACKEND=tensorflow", allow_module_level=True)

import gradguard as gg  # noqa: E402
from gradguard.frontends import keras as ggk  # noqa: E402

from ._checks import check_store  # noqa: E402

SHAPES = [(7, 5), (5,), (3, 3, 2, 4), (1,)]


def apply_policy(policy, arrays):
    """Apply a gradguard policy to host arrays with the PyTorch core."""
    params = [torch.nn.Parameter(torch.zeros(a.shape)) for a in arrays]
    for p, a in zip(params, arrays):
        p.grad = torch.tensor(a)
    decision = policy.decide(gg.measure(params), params)
    grads = [p.grad for p in params]
    for transform in decision.transforms:
        transform(params, grads)
    if decision.tensor_scale is not None:
        for g, s in zip(grads, decision.tensor_scale):
            g.mul_(s)
    if decision.scale is not None:
        for g in grads:
            g.mul_(decision.scale)
    return [g.numpy() for g in grads]


@pytest.mark.parametrize(
    "kwargs",
    [{"clipnorm": 1.0}, {"global_clipnorm": 1.0}, {"global_clipnorm": 7.0}, {"clipvalue": 0.3}],
)
def test_mapping_equals_keras_clipping(kwargs):
    policy = ggk.policy_from_keras(**kwargs)
    assert ggk.keras_clip_kwargs(policy) == kwargs
    optimizer = keras.optimizers.SGD(0.1, **kwargs)
    assert type(ggk.policy_from_optimizer(optimizer)) is type(policy)
    for seed, scale in enumerate([1e-3, 0.1, 1.0, 10.0, 300.0]):
        rng = np.random.default_rng(seed)
        arrays = [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES]
        theirs = optimizer._clip_gradients([tf.constant(a) for a in arrays])
        ours = apply_policy(policy, arrays)
        for t, o in zip(theirs, ours):
            # Keras divides by max(norm, c), gradguard by norm + 1e-6
            np.testing.assert_allclose(o, np.asarray(t), rtol=2e-6, atol=1e-12)


def test_mapping_errors_name_the_argument():
    with pytest.raises(ValueError, match="only one"):
        ggk.policy_from_keras(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="policy"):
        ggk.keras_clip_kwargs(gg.ZClip())
    assert ggk.policy_from_keras() is None
    assert ggk.keras_clip_kwargs(None) == {}


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )


def test_fit_is_recorded(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 1))).astype(np.float32) * 3.0
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2, global_clipnorm=1.0), loss="mse")

    # the first step's gradient norm, computed independently
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y[:16], model(x[:16]))
        loss = tf.reduce_mean(loss)
    first = tape.gradient(loss, model.trainable_variables)
    first_norm = float(tf.linalg.global_norm(first))

    callback = ggk.GradientRecorder(tmp_path / "run", log_every=10, health=True)
    history = model.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[callback]
    )
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert callback.transfers == 9  # 80 steps / 10, plus the read at the end of fit

    names = ("hidden.kernel", "hidden.bias", "out.kernel", "out.bias")
    out = check_store(tmp_path / "run", 80, names, "keras")
    data = out["data"]
    assert data["total_norm"][0] == pytest.approx(first_norm, rel=1e-4)
    np.testing.assert_allclose(data["threshold"], 1.0)
    np.testing.assert_allclose(data["lr"], 1e-2, rtol=1e-6)
    assert (data["clipped_norm"] <= 1.0 + 1e-5).all()
    big = data["total_norm"] > 1.0
    assert big.any()
    assert (data["clipped"] == big).all()
    np.testing.assert_allclose(data["clip_coef"][big], 1.0 / data["total_norm"][big], rtol=1e-4)
    # the optimizer is restored after fit
    assert "clip_and_record" not in getattr(model.optimizer._clip_gradients, "__name__", "")
    assert not math.isnan(data["total_norm"][-1])
