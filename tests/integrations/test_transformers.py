"""GradGuardTrainerCallback in a real Hugging Face Trainer on a tiny config-built GPT-2."""

from __future__ import annotations

import copy
import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import accelerate  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradguard import ClipNorm, RunStore, SkipNonFinite, chain  # noqa: E402
from gradguard.integrations.transformers import GradGuardTrainerCallback, attach  # noqa: E402
from tests.integrations._states import same  # noqa: E402

torch.set_num_threads(1)
STEPS, MAX_NORM = 6, 0.8


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


class Reporter(TrainerCallback):
    """Stands in for TensorBoard/W&B/MLflow: keeps the training logs it is given."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.logs.append(dict(logs))


def make_trainer(tmp_path, model, callbacks=(), **overrides) -> Trainer:
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    options.update(overrides)
    return Trainer(
        model=model,
        args=TrainingArguments(**options),
        train_dataset=Tokens(),
        callbacks=list(callbacks),
    )


def plain_run(tmp_path, **overrides) -> tuple[list[dict[str, float]], GPT2LMHeadModel]:
    """The same training without gradguard: the Trainer's own logs and final model."""
    reporter, model = Reporter(), tiny_gpt2()
    make_trainer(tmp_path / "plain", model, [reporter], **overrides).train()
    return reporter.logs, model


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files under ``log_dir`` (records read directly)."""
    from tensorboard.compat.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position < len(data):  # TFRecord: length, crc, payload, crc
            length = int.from_bytes(data[position : position + 8], "little")
            event = Event.FromString(data[position + 12 : position + 12 + length])
            position += 16 + length
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_monitor_records_the_pre_clip_norm_and_changes_nothing(tmp_path, monkeypatch):
    """The usual way (constructor, TensorBoard on): the Trainer keeps clipping at
    max_grad_norm; gradguard records pre-clip norms, the clip, the loss and the LR."""
    if "tensorflow" not in sys.modules:  # TensorBoard writes without it, 20 s sooner
        monkeypatch.setitem(sys.modules, "tensorflow", None)
    callback = GradGuardTrainerCallback(store=tmp_path / "run", log_every=1)
    reporter, model = Reporter(), tiny_gpt2()
    max_norm = 0.55  # between the norms of this run's steps
    options = dict(max_grad_norm=max_norm, gradient_accumulation_steps=2)
    trainer = make_trainer(
        tmp_path, model, [reporter, callback], report_to=["tensorboard"], **options
    )
    trainer.train()
    plain_logs, plain_model = plain_run(tmp_path, **options)

    assert callback.monitoring
    assert trainer.callback_handler.callbacks[0] is callback  # moved ahead of the reporters
    norms = [row["grad_norm"] for row in plain_logs]
    assert max(norms) > max_norm > min(norms)  # the Trainer clipped some steps only
    assert [row["grad_norm"] for row in reporter.logs] == norms  # the run did not change
    assert same(model.state_dict(), plain_model.state_dict())
    for row in reporter.logs:  # at every step: gradguard's norm is the Trainer's grad_norm
        assert row["gradguard/total_norm"] == row["grad_norm"]
    steps = RunStore.open(tmp_path / "run").steps()
    assert list(steps["step"]) == [row["step"] for row in trainer.state.log_history[:STEPS]]
    assert list(steps["step"]) == list(range(1, STEPS + 1))  # the Trainer's global_step
    assert list(steps["total_norm"]) == pytest.approx(norms, rel=1e-7)
    assert list(steps["threshold"]) == pytest.approx([max_norm] * STEPS)
    coef = [min(1.0, max_norm / (n + 1e-6)) for n in norms]
    assert list(steps["clip_coef"]) == pytest.approx(coef, rel=1e-6)
    assert list(steps["loss"]) == pytest.approx([row["loss"] for row in plain_logs], rel=1e-6)
    assert list(steps["lr"]) == pytest.approx([row["learning_rate"] for row in plain_logs])

    scalars = tensorboard_scalars(tmp_path / "out")
    logged = scalars["train/gradguard/total_norm"]
    assert [step for step, _ in logged] == list(range(1, STEPS + 1))
    assert [value for _, value in logged] == pytest.approx(norms, rel=1e-6)


def test_taking_over_keeps_the_trainers_clip_without_its_norm_pass(tmp_path, monkeypatch):
    """monitor_only=False: max_grad_norm becomes ClipNorm in gradguard's policy and the
    Trainer's own clip_grad_norm_ (its clip and its extra norm pass) never runs."""
    calls = []
    original = accelerate.Accelerator.clip_grad_norm_

    def counted(self, *args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("max_norm"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", counted)
    _, plain_model = plain_run(tmp_path, max_grad_norm=MAX_NORM)
    assert len(calls) == STEPS
    calls.clear()

    model = tiny_gpt2()
    trainer = make_trainer(tmp_path, model, max_grad_norm=MAX_NORM)
    callback = attach(trainer, monitor_only=False, store=tmp_path / "run", log_every=1)
    trainer.train()
    assert not callback.monitoring and calls == []
    assert same(model.state_dict(), plain_model.state_dict())  # clipped as the Trainer did
    policy = RunStore.open(tmp_path / "run").meta()["config"]["policy"]
    assert "SkipNonFinite" in policy and "ClipNorm" in policy and str(MAX_NORM) in policy

    # With max_grad_norm=0 the Trainer would still take a norm (clip_grad_norm_ with inf).
    make_trainer(tmp_path / "zero", tiny_gpt2(), max_grad_norm=0.0).train()
    assert calls == [math.inf] * STEPS
    calls.clear()
    trainer = make_trainer(tmp_path / "zero-gg", tiny_gpt2(), max_grad_norm=0.0)
    attach(trainer, policy=ClipNorm(1e9), health=False)
    trainer.train()
    assert calls == []


def test_a_users_policy_replaces_the_trainers_clip_and_says_so(tmp_path):
    _, plain_model = plain_run(tmp_path, max_grad_norm=0.0)
    model, reporter = tiny_gpt2(), Reporter()
    callback = GradGuardTrainerCallback(ClipNorm(1e9), health=False)
    trainer = make_trainer(tmp_path, model, [reporter, callback], max_grad_norm=MAX_NORM)
    with pytest.warns(RuntimeWarning, match=r"max_grad_norm=0\.8\) is turned off") as caught:
        trainer.train()
    assert caught[0].filename == __file__
    assert not callback.monitoring
    assert same(model.state_dict(), plain_model.state_dict())  # nothing clipped at 0.8
    assert [row["gradguard/clip_coef"] for row in reporter.logs] == [1.0] * STEPS


@pytest.mark.parametrize("lr_on_skip", ["hold", "advance"])
def test_nan_step_is_skipped_bit_for_bit_with_one_rule_for_the_lr(tmp_path, caplog, lr_on_skip):
    nan_step = 3  # the Trainer's global_step of the poisoned step
    model = tiny_gpt2()
    poison = {"on": False}

    def inject(module, inputs, output):
        return output * float("nan") if poison["on"] else output

    model.transformer.h[0].mlp.register_forward_hook(inject)
    seen: dict[int, object] = {}
    skipped_flags: list[bool] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            poison["on"] = state.global_step + 1 == nan_step
            seen[state.global_step] = copy.deepcopy((model.state_dict(), optimizer.state_dict()))

        def on_step_end(self, args, state, control, **kw):
            skipped_flags.append(trainer.accelerator.optimizer_step_was_skipped)
            poison["on"] = False

    reporter = Reporter()
    trainer = make_trainer(tmp_path, model, [reporter, Watch()], max_grad_norm=MAX_NORM)
    callback = GradGuardTrainerCallback(
        chain(SkipNonFinite(), ClipNorm(MAX_NORM)),
        lr_on_skip=lr_on_skip,
        store=tmp_path / "run",
        log_every=2,
        health=False,
    )
    trainer.add_callback(callback)
    caplog.set_level(logging.WARNING, logger="gradguard")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()

    mine = [w for w in caught if "skipped" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__  # one warning, at this line
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        str(mine[0].message)
    ]
    (params, optim), (params_after, optim_after) = seen[nan_step - 1], seen[nan_step]
    assert same(params, params_after) and same(optim["state"], optim_after["state"])
    assert optim["state"]  # Adam had state to protect, and kept it bit for bit
    assert not same(params_after, model.state_dict())  # training went on
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())
    rates = [row["learning_rate"] for row in reporter.logs]
    if lr_on_skip == "hold":  # the schedule counts updates: it does not move on the skip
        assert skipped_flags == [step == nan_step for step in range(1, STEPS + 1)]
        assert rates[nan_step] == rates[nan_step - 1] and len(set(rates)) == STEPS - 1
    else:
        assert not any(skipped_flags) and len(set(rates)) == STEPS
    assert [row["gradguard/skipped"] for row in reporter.logs] == [
        float(step == nan_step) for step in range(1, STEPS + 1)
    ]
    store = RunStore.open(tmp_path / "run")
    steps = store.steps()
    assert list(steps["skipped"]) == [step == nan_step for step in range(1, STEPS + 1)]
    assert math.isnan(steps["loss"][nan_step - 1])  # the Trainer's log hides it; gradguard not
    [event] = store.events("skip")
    assert event.step == nan_step and f"step {nan_step} skipped" in event.message


@pytest.mark.parametrize("way", ["constructor", "add_callback", "attach"])
def test_every_way_of_adding_the_callback_reaches_the_reporters(tmp_path, way):
    reporter = Reporter()
    trainer = make_trainer(
        tmp_path,
        tiny_gpt2(),
        [reporter] + ([GradGuardTrainerCallback(health=False)] if way == "constructor" else []),
        max_steps=2,
    )
    if way == "add_callback":
        trainer.add_callback(GradGuardTrainerCallback)  # a class, as HF allows
    elif way == "attach":
        attach(trainer, health=False)
    trainer.train()
    assert isinstance(trainer.callback_handler.callbacks[0], GradGuardTrainerCallback)
    assert len(reporter.logs) == 2
    for row in reporter.logs:
        assert row["gradguard/total_norm"] == row["grad_norm"]


def test_outside_a_trainer_the_callback_says_it_does_nothing(tmp_path):
    callback = GradGuardTrainerCallback()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.warns(RuntimeWarning, match="found no Trainer") as caught:
        callback.on_train_begin(args, None, None, model=tiny_gpt2())
    assert caught[0].filename == __file__
    assert callback.guard is None


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match="trainer"):
        attach(object())
    trainer = make_trainer(tmp_path, tiny_gpt2())
    with pytest.raises(TypeError, match="callback"):
        attach(trainer, callback=Reporter())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="monitor_only"):
        GradGuardTrainerCallback(monitor_only=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="monitor_only=True"):
        GradGuardTrainerCallback(ClipNorm(1.0), monitor_only=True)
    with pytest.raises(ValueError, match="lr_on_skip"):
        GradGuardTrainerCallback(lr_on_skip="pause")


def test_fsdp2_on_two_ranks_matches_ddp_and_skips_together():
    """The Trainer with an fsdp config (FSDP2) and without (DDP) on 2 gloo ranks, one
    rank's NaN batch: gradguard's norm is the Trainer's grad_norm at every step, equal
    across sharding; every rank skips the same step and holds the LR; rank 0 records."""
    from tests.integrations._workers import NAN_STEP, STEPS, results

    expected_skips = [step + 1 == NAN_STEP for step in range(STEPS)]
    for rank, found in enumerate(results(2)):
        ddp, fsdp2 = found["transformers"]["ddp"], found["transformers"]["fsdp2"]
        assert fsdp2["sharded"] and not ddp["sharded"]
        assert fsdp2["logged"] == pytest.approx(ddp["logged"], rel=1e-5, nan_ok=True)
        for run in (ddp, fsdp2):
            assert run["skipped"] == expected_skips  # optimizer_step_was_skipped, every rank
            assert [math.isnan(n) for n in run["logged"]] == expected_skips
            assert run["recording"] == (rank == 0)
        for got, want in zip(fsdp2["params"], ddp["params"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
        if rank == 0:
            for run in (ddp, fsdp2):
                assert run["stored"]["step"] == [float(s) for s in range(1, STEPS + 1)]
                assert run["stored"]["total_norm"] == pytest.approx(run["logged"], nan_ok=True)
