"""PaddlePaddle front-end: equality with Paddle's own clips, shared adaptive policies,
skips that leave parameters and moments untouched, and a recorded training run."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

if "tensorflow" in sys.modules and "paddle" not in sys.modules:
    pytest.skip(
        "paddlepaddle segfaults when imported after tensorflow; run these tests in their own "
        "process or import paddle first",
        allow_module_level=True,
    )
paddle = pytest.importorskip(
    "paddle", reason="paddlepaddle is not installed (pip install paddlepaddle)"
)

import gradguard as gg  # noqa: E402
from gradguard.frontends.paddle import GuardClip  # noqa: E402

from ._checks import check_store  # noqa: E402

SHAPES = [(7, 5), (5,), (3, 3, 2, 4), (6, 2, 3), (1,)]


def params_and_grads(seed: int, scale: float):
    rng = np.random.default_rng(seed)
    params = [paddle.create_parameter(list(s), "float32") for s in SHAPES]
    grads = [paddle.to_tensor((rng.normal(size=s) * scale).astype(np.float32)) for s in SHAPES]
    return params, grads


def clone(grads):
    return [paddle.to_tensor(g.numpy()) for g in grads]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: gg.ClipNorm(1.0), lambda: paddle.nn.ClipGradByGlobalNorm(1.0)),
        (lambda: gg.ClipNorm(5.0), lambda: paddle.nn.ClipGradByGlobalNorm(5.0)),
        (lambda: gg.ClipTensorNorm(1.0), lambda: paddle.nn.ClipGradByNorm(1.0)),
        (lambda: gg.ClipValue(0.5), lambda: paddle.nn.ClipGradByValue(0.5)),
    ],
)
def test_fixed_policies_equal_paddle(ours, theirs):
    for seed, scale in enumerate([1e-3, 0.1, 1.0, 10.0, 300.0]):
        params, grads = params_and_grads(seed, scale)
        mine = GuardClip(ours())(list(zip(params, clone(grads))))
        ref = theirs()(list(zip(params, clone(grads))))
        assert len(mine) == len(ref) == len(params)
        for (p1, g1), (p2, g2) in zip(mine, ref):
            assert p1 is p2
            np.testing.assert_array_equal(g1.numpy(), g2.numpy())


def test_need_clip_false_is_left_alone():
    params, grads = params_and_grads(0, 100.0)
    params[0].need_clip = False
    mine = GuardClip(gg.ClipNorm(1.0))(list(zip(params, clone(grads))))
    ref = paddle.nn.ClipGradByGlobalNorm(1.0)(list(zip(params, clone(grads))))
    for (_, g1), (_, g2) in zip(mine, ref):
        np.testing.assert_array_equal(g1.numpy(), g2.numpy())
    np.testing.assert_array_equal(mine[0][1].numpy(), grads[0].numpy())


def test_zclip_matches_torch_policy():
    rng = np.random.default_rng(1)
    seq = list(np.abs(rng.normal(1.0, 0.1, size=40)))
    seq[30] = 40.0
    clip = GuardClip(gg.ZClip(warmup_steps=10))
    ref = gg.ZClip(warmup_steps=10)
    import torch

    tp = torch.nn.Parameter(torch.zeros(4))
    params, direction = params_and_grads(3, 1.0)
    unit = math.sqrt(sum(float((g * g).sum()) for g in direction))
    got_norms = []
    for v in seq:
        out = clip(list(zip(params, [g * (v / unit) for g in direction])))
        got = math.sqrt(sum(float((g * g).sum()) for _, g in out))
        tp.grad = torch.full((4,), v / 2.0)
        want = v * float(ref.decide(gg.measure([tp]), [tp]).scale)
        assert got == pytest.approx(want, rel=1e-5)
        got_norms.append(got)
    assert got_norms[30] < 2.0  # the spike of 40 was clipped


def test_agc_matches_torch_policy():
    import torch

    params, grads = params_and_grads(2, 1.0)
    weights = [p.numpy() for p in params]
    out = GuardClip(gg.AGC(0.05))(list(zip(params, clone(grads))))
    tparams = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.tensor(g.numpy())
    gg.adaptive_clip_grad_(tparams, 0.05)
    for (_, g), tp in zip(out, tparams):
        np.testing.assert_allclose(g.numpy(), tp.grad.numpy(), rtol=1e-6)


def make_model():
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.Tanh(), paddle.nn.Linear(16, 1))


def test_skip_leaves_parameters_and_moments_untouched():
    model = make_model()
    clip = GuardClip(gg.chain(gg.SkipNonFinite(), gg.ClipNorm(1.0)), model=model)
    opt = paddle.optimizer.Adam(1e-2, parameters=model.parameters(), grad_clip=clip)
    x = paddle.randn([16, 8])
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.clear_grad()
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    moments = {k: v.numpy().copy() for k, v in opt.state_dict().items() if hasattr(v, "numpy")}
    bad = x.clone()
    bad[0, 0] = float("nan")
    model(bad).pow(2).mean().backward()
    opt.step()
    opt.clear_grad()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), before[k])
    for k, v in opt.state_dict().items():
        if k in moments:
            np.testing.assert_array_equal(v.numpy(), moments[k])
    model(x).pow(2).mean().backward()
    opt.step()
    assert any(not np.array_equal(v.numpy(), before[k]) for k, v in model.state_dict().items())


def test_training_run_recorded(tmp_path):
    model = make_model()
    clip = GuardClip(model=model, store=tmp_path / "run", log_every=10, health=True)
    opt = paddle.optimizer.AdamW(1e-2, parameters=model.parameters(), grad_clip=clip)
    rng = np.random.default_rng(0)
    true_w = rng.normal(size=(8, 1)).astype(np.float32)
    losses = []
    for i in range(1, 41):
        x = rng.normal(size=(32, 8)).astype(np.float32)
        y = x @ true_w
        if i == 25:
            x[0, 0] = np.nan
        loss = paddle.nn.functional.mse_loss(model(paddle.to_tensor(x)), paddle.to_tensor(y))
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    clip.close()
    assert all(np.isfinite(p.numpy()).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    out = check_store(tmp_path / "run", 40, names, "paddle")
    data = out["data"]
    assert data["skipped"].tolist() == [i == 25 for i in range(1, 41)]
    assert data["reason"][24] == gg.record.SkipReason.NONFINITE
    skips = out["store"].events("skip")
    assert [e.step for e in skips] == [25]
    # The same payload as a PyTorch run's: a NaN input reaches every gradient.
    assert skips[0].data["reason"] == "nonfinite"
    assert skips[0].data["nonfinite"] == list(names)
    assert skips[0].data["origin"] == "2.bias"


def test_bad_policy_is_rejected():
    with pytest.raises(TypeError, match="policy"):
        GuardClip("clip")
