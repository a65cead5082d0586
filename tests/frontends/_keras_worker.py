"""Keras scenarios for one backend, run in a subprocess by tests/frontends/test_keras.py.

Keras picks its backend once, at import (``KERAS_BACKEND``), so each backend needs its
own process. Usage: ``KERAS_BACKEND=jax python _keras_worker.py OUT_DIR``. Everything the
tests check is written under ``OUT_DIR``: ``results.json`` (plain values), ``arrays.npz``
(inputs and Keras's outputs) and one run store per scenario. The expected values are
computed by the test from the saved inputs, not here. Exit code 77: Keras or the
backend's framework is not installed.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np

SHAPES = [(7, 5), (5,), (3, 3, 2, 4), (1,)]
CLIP_KWARGS = [
    {"clipnorm": 1.0},
    {"global_clipnorm": 1.0},
    {"global_clipnorm": 7.0},
    {"clipvalue": 0.3},
]
BATCH, SAMPLES, FEATURES, HIDDEN = 16, 160, 8, 12
LR, MAX_NORM, SCALE = 0.05, 1.0, 1024.0
CRASH_AT = 6  # batches; the recorder reads every 4 (log_every=4)
NAN_SAMPLE = 50  # in the 4th batch: step 4 of the loss-scaled run overflows


def problem() -> dict[str, np.ndarray]:
    """Inputs, targets and initial weights (kernel (in, out), bias) of a 2-layer MLP."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(FEATURES, 1))).astype(np.float32)
    w1 = (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
    b1 = (rng.normal(size=(HIDDEN,)) * 0.1).astype(np.float32)
    w2 = (rng.normal(size=(HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32)
    b2 = np.zeros((1,), np.float32)
    return {"x": x, "y": y, "w1": w1, "b1": b1, "w2": w2, "b2": b2}


def main(out: Path) -> dict:
    try:
        import keras
    except ImportError as error:
        print(f"keras is not installed: {error}", file=sys.stderr)
        sys.exit(77)
    if not keras.__version__.startswith("3"):
        print(f"needs Keras 3, found {keras.__version__}", file=sys.stderr)
        sys.exit(77)
    import gradguard as gg
    from gradguard.frontends import keras as ggk

    data = problem()
    arrays: dict[str, np.ndarray] = dict(data)
    results: dict = {"backend": keras.backend.backend()}
    recorders: list = []

    def model():
        net = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(HIDDEN, activation="tanh", name="hidden"),
                keras.layers.Dense(1, name="out"),
            ]
        )
        net.set_weights([data["w1"], data["b1"], data["w2"], data["b2"]])
        return net

    def fit(net, optimizer, name, x=data["x"], epochs=1, callbacks=(), log_every=7):
        net.compile(optimizer=optimizer, loss="mse")
        recorder = ggk.GradientRecorder(out / name, log_every=log_every)
        recorders.append(recorder)
        net.fit(
            x,
            data["y"],
            batch_size=BATCH,
            epochs=epochs,
            shuffle=False,
            verbose=0,
            callbacks=[recorder, *callbacks],
        )
        arrays[f"{name}_weights"] = np.concatenate([w.ravel() for w in net.get_weights()])
        return recorder

    # -- the clipping arguments, applied by Keras to fixed arrays
    for i, kwargs in enumerate(CLIP_KWARGS):
        optimizer = keras.optimizers.SGD(0.1, **kwargs)
        for seed, scale in enumerate([1e-3, 0.1, 1.0, 10.0, 300.0]):
            rng = np.random.default_rng(seed)
            grads = [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES]
            clipped = optimizer._clip_gradients([keras.ops.convert_to_tensor(g) for g in grads])
            for j, (g, c) in enumerate(zip(grads, clipped)):
                arrays[f"clip{i}_{seed}_{j}_in"] = g
                arrays[f"clip{i}_{seed}_{j}_out"] = keras.ops.convert_to_numpy(c)
        results[f"clip{i}_policy"] = type(ggk.policy_from_optimizer(optimizer)).__name__
        results[f"clip{i}_roundtrip"] = ggk.keras_clip_kwargs(ggk.policy_from_keras(**kwargs))
    errors = {}
    for label, call in {
        "two_arguments": lambda: ggk.policy_from_keras(clipnorm=1.0, clipvalue=1.0),
        "no_equivalent": lambda: ggk.keras_clip_kwargs(gg.ZClip()),
    }.items():
        try:
            call()
        except ValueError as error:
            errors[label] = str(error)
    results["errors"] = errors

    # -- plain SGD with global-norm clipping, two epochs; then a second fit, a third
    # without the callback, and a checkpoint saved during the first
    net = model()
    saved = out / "during_fit.keras"

    class SaveAtEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.save(saved)

    recorder = fit(
        net,
        keras.optimizers.SGD(LR, global_clipnorm=MAX_NORM),
        "sgd",
        epochs=2,
        callbacks=[SaveAtEpochEnd()],
    )
    results["sgd_transfers"] = recorder.transfers
    results["optimizer_variables_after_fit"] = len(net.optimizer.variables)
    results["clip_restored"] = "_clip_gradients" not in vars(net.optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.saving.load_model(saved)
    results["checkpoint_warnings"] = [
        str(w.message) for w in caught if "optimizer" in str(w.message)
    ]
    results["checkpoint_optimizer_variables"] = len(loaded.optimizer.variables)
    results["checkpoint_iterations"] = int(keras.ops.convert_to_numpy(loaded.optimizer.iterations))
    fit(net, net.optimizer, "sgd_again")
    results["optimizer_variables_after_refit"] = len(net.optimizer.variables)
    net.compile(optimizer=net.optimizer, loss="mse")
    net.fit(data["x"], data["y"], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    arrays["sgd_unrecorded_weights"] = np.concatenate([w.ravel() for w in net.get_weights()])

    # -- a fit that raises at batch CRASH_AT: the rows since the last read are kept when
    # the recorder is closed (by hand, or by the next fit's recorder)
    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 == CRASH_AT:
                raise RuntimeError("crash")

    for name, closer in (("crashed", "by_hand"), ("crashed_then_refit", "next_fit")):
        net = model()
        try:
            optimizer = keras.optimizers.SGD(LR, global_clipnorm=MAX_NORM)
            fit(net, optimizer, name, callbacks=[Crash()], log_every=4)
        except RuntimeError:
            pass
        if closer == "by_hand":
            recorders[-1].close()
        else:
            fit(net, net.optimizer, name + "_next")
        results[f"{name}_optimizer_variables"] = len(net.optimizer.variables)
        results[f"{name}_clip_restored"] = "_clip_gradients" not in vars(net.optimizer)

    # -- loss scaling: a NaN input makes step 4's scaled gradients non-finite
    x = data["x"].copy()
    x[NAN_SAMPLE] = np.nan
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(LR, global_clipnorm=MAX_NORM), initial_scale=SCALE
    )
    fit(model(), optimizer, "loss_scaled", x=x, log_every=4)  # step 4 is a snapshot

    # -- gradient accumulation over two batches
    fit(
        model(),
        keras.optimizers.SGD(LR, global_clipnorm=MAX_NORM, gradient_accumulation_steps=2),
        "accumulated",
        log_every=5,
    )
    return {"results": results, "arrays": arrays}


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        found = main(target)
    except Exception:
        (target / "error.txt").write_text(traceback.format_exc())
        raise
    np.savez(target / "arrays.npz", **found["arrays"])
    (target / "results.json").write_text(json.dumps(found["results"]))
