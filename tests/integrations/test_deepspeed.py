"""DeepSpeedGuard with a real DeepSpeed engine on CPU (one process, gloo on 127.0.0.1).

Several ranks (2 and 4, ZeRO stages 0-3) are checked in tests/integrations/test_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from gradguard import ClipNorm, ClipValue, RunStore, SkipNonFinite, ZClip, chain  # noqa: E402
from gradguard.integrations.deepspeed import DeepSpeedGuard, DeepSpeedMonitor  # noqa: E402
from gradguard.policies import Decision, Policy  # noqa: E402
from gradguard.schema import SkipReason  # noqa: E402
from tests.integrations._deepspeed import isolate, release  # noqa: E402

torch.set_num_threads(1)
ACCUMULATE, BATCH, STEPS, CLIP, LR, GAMMA, SPIKE = 2, 4, 5, 1.4, 0.05, 0.5, 20.0


@pytest.fixture(scope="module")
def single_process():
    """One process group for the module: DeepSpeed keeps global groups across engines."""
    with pytest.MonkeyPatch.context() as patch:
        isolate(patch)
        yield
        release()


class SkipAt(Policy):
    """Skip the step numbered ``step`` (finite gradients: only the policy wants it skipped)."""

    def __init__(self, step: int) -> None:
        self.at = step

    def update(self, state, inputs, xp):
        skip = xp.flag(inputs.step == self.at, inputs.total_norm)
        return Decision(skip=skip, reason=xp.code(int(SkipReason.POLICY), inputs.total_norm)), state


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * ACCUMULATE * STEPS, 6, generator=g)
    return x, (x[:, :1] * 3).tanh() + 0.1 * torch.randn(len(x), 1, generator=g)


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def engine_for(stage: int, precision: str = "fp32", clipping: float = CLIP):
    model = net()
    config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": ACCUMULATE,
        "gradient_clipping": clipping,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if precision != "fp32":
        config[precision] = {"enabled": True}
    if precision == "fp16":
        config[precision].update(initial_scale_power=8, hysteresis=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return engine, scheduler


def full_params(engine) -> list[torch.Tensor]:
    params = engine.module.parameters()
    if engine.zero_optimization_stage() == 0:
        return [p.detach().float().clone() for p in params]
    return [safe_get_full_fp32_param(p).clone() for p in params]


def train(engine, guard, nan_step: int | None = None, spike_step: int | None = None) -> list[dict]:
    """Micro-batches through ``guard.step``; per optimizer step what the engine did."""
    x, y = data()
    dtype = next(engine.module.parameters()).dtype
    rows = []
    for i in range(0, len(x), BATCH):
        loss = nn.functional.mse_loss(engine(x[i : i + BATCH].to(dtype)).float(), y[i : i + BATCH])
        step = i // (BATCH * ACCUMULATE) + 1
        if step == nan_step:
            loss = loss * float("nan")
        if step == spike_step:
            loss = loss * SPIKE
        engine.backward(loss)
        before = full_params(engine)
        result = guard.step(loss=loss)
        if result is not None:
            after = full_params(engine)
            rows.append(
                {
                    "result": result,
                    "applied": engine.was_step_applied(),
                    "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                    "ds_norm": engine.get_global_grad_norm(),
                    "lr": engine.get_lr()[0],
                }
            )
    guard.close()
    return rows


def torch_run(clip: float | None, skip: tuple[int, ...] = (), coefs=None, spike_step=None):
    """The same training in torch: pre-clip norms and the final model."""
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    x, y = data()
    norms = []
    for step, start in enumerate(range(0, len(x), BATCH * ACCUMULATE), start=1):
        for j in range(ACCUMULATE):
            sl = slice(start + j * BATCH, start + (j + 1) * BATCH)
            loss = nn.functional.mse_loss(model(x[sl]), y[sl]) / ACCUMULATE
            (loss * (SPIKE if step == spike_step else 1.0)).backward()
        grads = [p.grad for p in model.parameters()]
        norms.append(torch.nn.utils.get_total_norm(grads).item())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if coefs is not None:
            torch._foreach_mul_(grads, float(coefs[step - 1]))
        if step not in skip:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad()
    return norms, model


@pytest.mark.parametrize("stage", [0, 2])
def test_monitor_records_pre_clip_norms_and_deepspeed_clips(tmp_path, single_process, stage):
    engine, _ = engine_for(stage)
    monitor = (DeepSpeedGuard if stage else DeepSpeedMonitor)(
        engine, store=tmp_path / "run", log_every=1
    )
    assert monitor.monitoring  # the config clips and no policy was given
    rows = train(engine, monitor)

    expected, reference = torch_run(CLIP)
    assert [float(r["result"].total_norm) for r in rows] == pytest.approx(expected, rel=1e-5)
    assert max(expected) > CLIP > min(expected)  # DeepSpeed clipped some steps
    if stage:  # ZeRO computes its own norm: the same
        assert [float(r["ds_norm"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    for got, want in zip(full_params(engine), reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)
    steps = RunStore.open(tmp_path / "run").steps()
    assert list(steps["step"]) == list(range(1, STEPS + 1))  # engine.global_steps
    assert list(steps["total_norm"]) == pytest.approx(expected, rel=1e-5)
    assert list(steps["threshold"]) == pytest.approx([CLIP] * STEPS)
    coef = [min(1.0, CLIP / (n + 1e-6)) for n in expected]
    assert list(steps["clip_coef"]) == pytest.approx(coef, rel=1e-5)
    assert list(steps["lr"]) == pytest.approx([LR * GAMMA**i for i in range(STEPS)])
    assert not steps["skipped"].any() and all(math.isfinite(v) for v in steps["loss"])


@pytest.mark.parametrize(
    ("stage", "precision", "lr_on_skip"),
    [(0, "fp32", "hold"), (1, "bf16", "hold"), (2, "fp32", "advance"), (3, "fp32", "hold")],
)
def test_guard_clips_and_skips_through_the_engine(
    tmp_path, single_process, stage, precision, lr_on_skip
):
    """ClipNorm's threshold becomes the engine's clip value; a policy skip (finite
    gradients) and a NaN step go DeepSpeed's overflow path: nothing changes, the LR holds."""
    engine, _ = engine_for(stage, precision)
    policy = chain(SkipNonFinite(), SkipAt(2), ClipNorm(0.5))
    with pytest.warns(RuntimeWarning, match=r"gradient_clipping=1.4\) is turned off"):
        guard = DeepSpeedGuard(engine, policy, lr_on_skip=lr_on_skip, store=tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="step 2 skipped") as caught:
        rows = train(engine, guard, nan_step=4)
    mine = [w for w in caught if "gradguard" in str(w.message)]
    assert {w.filename for w in mine} == {__file__}  # at the user's line
    # the guard warns at its first skip; the NaN at step 4 is a new incident: its finding
    assert [str(w.message).split(";")[0] for w in mine] == [
        "gradguard: step 2 skipped (policy)",
        "gradguard: non-finite gradient at step 4",
    ]

    skipped = [r["result"].is_skipped() for r in rows]
    assert skipped == [False, True, False, True, False]
    assert [r["applied"] for r in rows] == [not s for s in skipped]  # DeepSpeed's own flag
    assert [r["unchanged"] for r in rows] == skipped  # parameters untouched on skips
    assert engine.skipped_steps == 2
    for row in rows:
        if not row["result"].is_skipped() and row["ds_norm"] is not None:
            assert float(row["ds_norm"]) == pytest.approx(float(row["result"].total_norm), 1e-5)
    updates = [1, 1, 2, 2, 3] if lr_on_skip == "hold" else [1, 2, 3, 4, 5]
    assert [r["lr"] for r in rows] == pytest.approx([LR * GAMMA**u for u in updates])
    steps = RunStore.open(tmp_path / "run").steps()
    assert list(steps["reason"]) == [0, int(SkipReason.POLICY), 0, int(SkipReason.NONFINITE), 0]
    if precision == "fp32" and lr_on_skip == "hold":  # the same run in torch
        expected, reference = torch_run(0.5, skip=(2, 4))
        applied = [float(r["result"].total_norm) for r, s in zip(rows, skipped) if not s]
        assert applied == pytest.approx([n for i, n in enumerate(expected) if i in (0, 2, 4)])
        for got, want in zip(full_params(engine), reference.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)


def test_zclip_thresholds_are_applied_by_the_engine(tmp_path, single_process):
    engine, _ = engine_for(2, clipping=0.0)
    guard = DeepSpeedGuard(engine, ZClip(warmup_steps=2), store=tmp_path / "z")
    rows = train(engine, guard, spike_step=4)
    coefs = [float(r["result"].clip_coef) for r in rows]
    assert coefs[3] < 0.5 and coefs[:3] == [1.0, 1.0, 1.0]  # ZClip clipped the spike
    _, reference = torch_run(None, coefs=coefs, spike_step=4)
    for got, want in zip(full_params(engine), reference.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)


def test_fp16_divides_the_loss_scale_out_and_a_skip_keeps_it(tmp_path, single_process):
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels; the
    # arithmetic runs on any CPU, so the test lets it through.
    accelerator = type(get_accelerator())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accelerator, "is_fp16_supported", lambda self: True)
        engine, _ = engine_for(2, "fp16")
        guard = DeepSpeedGuard(engine, chain(SkipAt(2), ClipNorm(0.5)), store=tmp_path / "f")
        scale = engine.optimizer.loss_scale
        with pytest.warns(RuntimeWarning, match="skipped"):
            rows = train(engine, guard, nan_step=4)
    assert [r["applied"] for r in rows] == [True, False, True, False, True]
    for row in rows:
        if row["applied"]:  # the scale is divided out: DeepSpeed's own (unscaled) norm
            assert float(row["ds_norm"]) == pytest.approx(float(row["result"].total_norm), 1e-3)
    assert [r["unchanged"] for r in rows] == [False, True, False, True, False]
    # The policy's skip left the loss scale alone; the NaN step was an fp16 overflow.
    assert engine.optimizer.loss_scale == scale / 2
    steps = RunStore.open(tmp_path / "f").steps()
    assert list(steps["reason"]) == [0, int(SkipReason.POLICY), 0, int(SkipReason.AMP_OVERFLOW), 0]
    assert steps["loss_scale"][0] == scale


def test_bad_engine_policies_and_arguments_are_named(single_process):
    with pytest.raises(TypeError, match="engine"):
        DeepSpeedGuard(nn.Linear(2, 2))
    engine, _ = engine_for(2)
    with pytest.raises(NotImplementedError, match="ClipValue"):
        DeepSpeedGuard(engine, chain(SkipNonFinite(), ClipValue(0.1)))
    with pytest.raises(ValueError, match="norm_type"):
        DeepSpeedGuard(engine, ClipNorm(1.0), norm_type=1)
    with pytest.raises(ValueError, match="monitor_only=True"):
        DeepSpeedGuard(engine, ClipNorm(1.0), monitor_only=True)
    with pytest.raises(ValueError, match="lr_on_skip"):
        DeepSpeedGuard(engine, lr_on_skip="hold on")


@pytest.mark.parametrize("world", [2, 4])
def test_zero_stages_on_several_ranks_match_one_process_and_skip_together(world):
    """ZeRO 0-3 on 2 ranks (1 and 3 on 4), one rank's NaN micro-batch: every rank measures
    the unsharded norm (DeepSpeed's own), skips the same step through DeepSpeed and ends
    with the unsharded run's parameters; rank 0 records."""
    from tests.integrations._workers import DEEPSPEED, NAN_STEP, STEPS, results

    expected_skips = [step + 1 == NAN_STEP for step in range(STEPS)]
    for rank, found in enumerate(results(world)):
        runs = found["deepspeed"]
        for stage, precision in DEEPSPEED[world]:
            run = runs[f"{stage}-{precision}"]
            rel = 1e-5 if precision == "fp32" else 1e-2
            assert run["skipped"] == expected_skips and run["skipped_steps"] == 1
            assert run["applied"] == [not s for s in expected_skips]
            for got, want, ds, skipped in zip(
                run["norms"], runs["reference"], run["ds_norms"], run["skipped"]
            ):
                if skipped:
                    continue
                assert got == pytest.approx(want, rel=rel)
                assert math.isnan(ds) or got == pytest.approx(ds, rel=1e-5)
            atol = 1e-5 if precision == "fp32" else 2e-2
            for got, want in zip(run["params"], runs["reference_params"]):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=atol, rtol=0)
            assert run["recording"] == (rank == 0)
            if rank == 0:
                assert run["stored"]["step"] == [float(s) for s in range(1, STEPS + 1)]
                assert run["stored"]["skipped"] == [float(s) for s in expected_skips]
