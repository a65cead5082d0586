"""Keras 3 front-end on the TensorFlow, JAX and PyTorch backends.

Keras picks its backend at import, so each backend runs the scenarios of
``_keras_worker.py`` in its own process (the three run at once, started by the first
test that needs them; this process imports neither Keras nor TensorFlow). The tests
check what the workers recorded against gradients computed here by hand (numpy
backprop through the same 2-layer MLP, same data, same initial weights).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.record import RunStore
from gradguard.report import render_report
from gradguard.schema import EventKind, SkipReason, skip_event

from . import _keras_worker as w
from ._checks import check_store

BACKENDS = ["tensorflow", "jax", "torch"]
NAMES = ("hidden.kernel", "hidden.bias", "out.kernel", "out.bias")
TIMEOUT_S = 900  # three framework imports at once on a loaded 2-core machine
SKIPPED_EXIT = 77


@functools.cache
def _runs() -> dict[str, tuple[Path | None, str]]:
    """Start one worker per backend, all at once; ``backend -> (out dir or None, log)``."""
    root = Path(tempfile.mkdtemp(prefix="gg-keras-"))
    script = Path(w.__file__)
    procs = {}
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        procs[backend] = subprocess.Popen(
            [sys.executable, "-W", "ignore", str(script), str(root / backend)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    found = {}
    for backend, proc in procs.items():
        try:
            log, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            log = f"timed out after {TIMEOUT_S}s\n{log}"
        if proc.returncode == SKIPPED_EXIT:
            found[backend] = (None, log)
        elif proc.returncode != 0:
            found[backend] = (root / backend, f"worker failed ({proc.returncode}):\n{log}")
        else:
            found[backend] = (root / backend, "")
    return found


def run(backend: str) -> tuple[Path, dict, dict]:
    """The worker's out dir, results and arrays for ``backend`` (skips if not installed)."""
    out, log = _runs()[backend]
    if out is None:
        pytest.skip(f"Keras on {backend} is not installed: {log.strip()[-300:]}")
    if log:
        raise AssertionError(log[-6000:])
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "arrays.npz") as arrays:
        return out, results, dict(arrays)


# -- gradients by hand ---------------------------------------------------------------------


def mse_grads(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Gradients of Keras's ``mse`` (mean over the batch) for Dense(tanh) -> Dense."""
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    d_out = 2.0 * (h @ w2 + b2 - y) / len(x)
    d_z = (d_out @ w2.T) * (1.0 - h**2)
    return [x.T @ d_z, d_z.sum(0), h.T @ d_out, d_out.sum(0)]


def sgd_run(arrays, *, accumulate=1, skip_steps=()) -> tuple[list[list[float]], np.ndarray]:
    """Per-step per-tensor norms of a clipped-SGD run, and the final weights (float64)."""
    params = [arrays[k].astype(np.float64) for k in ("w1", "b1", "w2", "b2")]
    x, y = arrays["x"].astype(np.float64), arrays["y"].astype(np.float64)
    starts = list(range(0, len(x), w.BATCH))
    norms = []
    for step, first in enumerate(range(0, len(starts), accumulate), start=1):
        micro = [
            mse_grads(params, x[s : s + w.BATCH], y[s : s + w.BATCH])
            for s in starts[first : first + accumulate]
        ]
        grads = [sum(g) / accumulate for g in zip(*micro)]
        norms.append([float(np.linalg.norm(g)) for g in grads])
        if step in skip_steps:
            continue
        total = math.sqrt(sum(n * n for n in norms[-1]))
        coef = w.MAX_NORM / max(total, w.MAX_NORM)  # Keras's clip_by_global_norm
        params = [p - w.LR * coef * g for p, g in zip(params, grads)]
    return norms, np.concatenate([p.ravel() for p in params])


def recorded_norms(out: Path, name: str) -> tuple[dict, np.ndarray]:
    """Step columns and the per-tensor norms of every step (snapshots at every flush)."""
    store = RunStore.open(out / name)
    data = store.steps()
    t_steps, _, t_norms = store.tensor_norms()
    return data, dict(zip(t_steps.tolist(), t_norms))


# -- the clipping arguments ---------------------------------------------------------------


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


POLICIES = {
    "clipnorm": gg.ClipTensorNorm,
    "global_clipnorm": gg.ClipNorm,
    "clipvalue": gg.ClipValue,
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_mapping_equals_keras_clipping(backend):
    _, results, arrays = run(backend)
    for i, kwargs in enumerate(w.CLIP_KWARGS):
        ((key, value),) = kwargs.items()
        assert results[f"clip{i}_policy"] == POLICIES[key].__name__
        assert results[f"clip{i}_roundtrip"] == kwargs
        policy = POLICIES[key](value)
        for seed in range(5):
            grads = [arrays[f"clip{i}_{seed}_{j}_in"] for j in range(len(w.SHAPES))]
            ours = apply_policy(policy, grads)
            for j, o in enumerate(ours):
                # Keras divides by max(norm, c), gradguard by norm + 1e-6
                theirs = arrays[f"clip{i}_{seed}_{j}_out"]
                np.testing.assert_allclose(o, theirs, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mapping_errors_name_the_argument(backend):
    _, results, _ = run(backend)
    assert (
        "only one of clipnorm, global_clipnorm and clipvalue" in results["errors"]["two_arguments"]
    )
    assert results["errors"]["no_equivalent"].startswith("policy: ZClip")


# -- recorded fits ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_norms_equal_hand_computed(backend):
    out, results, arrays = run(backend)
    steps = 2 * w.SAMPLES // w.BATCH
    checked = check_store(out / "sgd", steps, NAMES, "keras")
    data, per_tensor = recorded_norms(out, "sgd")
    expected, weights = sgd_run(
        {**arrays, "x": np.concatenate([arrays["x"]] * 2), "y": np.concatenate([arrays["y"]] * 2)}
    )
    totals = [math.sqrt(sum(n * n for n in row)) for row in expected]
    np.testing.assert_allclose(data["total_norm"], totals, rtol=1e-4)
    for step, row in per_tensor.items():
        np.testing.assert_allclose(row, expected[step - 1], rtol=1e-4, atol=1e-7)
    assert sorted(per_tensor) == [7, 14]  # log_every=7: snapshots and reads every 7 steps
    assert results["sgd_transfers"] == 3  # ... and one more read at the end of fit
    np.testing.assert_allclose(arrays["sgd_weights"], weights, rtol=1e-4, atol=1e-6)
    # what the clip did, as Keras did it
    big = np.asarray(totals) > w.MAX_NORM
    assert big.any() and not big.all()
    assert (data["clipped"] == big).all()
    np.testing.assert_allclose(data["clipped_norm"][big], w.MAX_NORM, rtol=1e-5)
    np.testing.assert_allclose(
        data["clip_coef"][big], w.MAX_NORM / data["total_norm"][big], rtol=1e-4
    )
    np.testing.assert_allclose(data["threshold"], w.MAX_NORM)
    np.testing.assert_allclose(data["lr"], w.LR, rtol=1e-6)
    assert np.isnan(data["loss_scale"]).all()
    assert checked["store"].meta()["config"]["backend"] == backend
    assert render_report(out / "sgd").lstrip().lower().startswith("<!doctype html")


@pytest.mark.parametrize("backend", BACKENDS)
def test_recorder_leaves_no_trace_on_the_model(backend):
    out, results, arrays = run(backend)
    # the optimizer's own variables only (SGD: iterations, learning rate), during and after
    assert results["optimizer_variables_after_fit"] == 2
    assert results["optimizer_variables_after_refit"] == 2
    assert results["clip_restored"]
    # a checkpoint saved during fit restores the optimizer's state
    assert results["checkpoint_warnings"] == []
    assert results["checkpoint_optimizer_variables"] == 2
    assert results["checkpoint_iterations"] == 2 * w.SAMPLES // w.BATCH
    # a second fit, with a new recorder, is recorded again from the weights it starts at
    steps = w.SAMPLES // w.BATCH
    data, _ = recorded_norms(out, "sgd_again")
    assert data["step"].tolist() == list(range(1, steps + 1))
    assert np.isfinite(data["total_norm"]).all()
    # and a third, unrecorded, trains as usual
    assert not np.allclose(arrays["sgd_unrecorded_weights"], arrays["sgd_weights"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_before_a_crash_are_kept(backend):
    out, results, arrays = run(backend)
    expected, _ = sgd_run(arrays)
    totals = [math.sqrt(sum(n * n for n in row)) for row in expected[: w.CRASH_AT]]
    for name in ("crashed", "crashed_then_refit"):
        data = RunStore.open(out / name).steps()
        # read at step 4; steps 5 and 6 were still on the device when fit raised
        assert data["step"].tolist() == list(range(1, w.CRASH_AT + 1))
        np.testing.assert_allclose(data["total_norm"], totals, rtol=1e-4)
        assert results[f"{name}_optimizer_variables"] == 2
        assert results[f"{name}_clip_restored"]
    assert RunStore.open(out / "crashed_then_refit_next").steps()["step"][-1] == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_scale_skip_is_recorded(backend):
    out, _, arrays = run(backend)
    bad = w.NAN_SAMPLE // w.BATCH + 1
    steps = w.SAMPLES // w.BATCH
    checked = check_store(out / "loss_scaled", steps, NAMES, "keras")
    data, per_tensor = recorded_norms(out, "loss_scaled")
    x = arrays["x"].copy()
    x[w.NAN_SAMPLE] = np.nan
    expected, weights = sgd_run({**arrays, "x": x}, skip_steps={bad})
    assert data["skipped"].tolist() == [s == bad for s in range(1, steps + 1)]
    assert data["reason"][bad - 1] == SkipReason.AMP_OVERFLOW
    assert (data["reason"][data["step"] != bad] == 0).all()
    # the scale each step ran with: halved by the overflow
    scales = [w.SCALE if s <= bad else w.SCALE / 2 for s in range(1, steps + 1)]
    np.testing.assert_allclose(data["loss_scale"], scales)
    assert not np.isfinite(data["total_norm"][bad - 1])
    ok = data["step"] != bad
    totals = np.array([math.sqrt(sum(n * n for n in row)) for row in expected])
    np.testing.assert_allclose(data["total_norm"][ok], totals[ok], rtol=1e-4)
    np.testing.assert_allclose(arrays["loss_scaled_weights"], weights, rtol=1e-4, atol=1e-6)
    assert not np.isfinite(per_tensor[bad]).any()
    skips = [e for e in checked["store"].events() if e.kind == EventKind.SKIP]
    assert skips == [skip_event(bad, SkipReason.AMP_OVERFLOW, list(NAMES))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulated_steps_are_updates(backend):
    out, _, arrays = run(backend)
    steps = w.SAMPLES // w.BATCH // 2
    check_store(out / "accumulated", steps, NAMES, "keras")
    data, per_tensor = recorded_norms(out, "accumulated")
    expected, weights = sgd_run(arrays, accumulate=2)
    totals = [math.sqrt(sum(n * n for n in row)) for row in expected]
    np.testing.assert_allclose(data["total_norm"], totals, rtol=1e-4)
    for step, row in per_tensor.items():
        np.testing.assert_allclose(row, expected[step - 1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(arrays["accumulated_weights"], weights, rtol=1e-4, atol=1e-6)


def test_backends_record_the_same_run():
    recorded = {}
    for backend in BACKENDS:
        out, _, _ = run(backend)
        recorded[backend] = RunStore.open(out / "sgd").steps()
    first, *others = recorded.values()
    for data in others:
        assert data["step"].tolist() == first["step"].tolist()
        for column in ("total_norm", "clipped_norm", "clip_coef", "clipped", "lr"):
            np.testing.assert_allclose(data[column], first[column], rtol=1e-5)
