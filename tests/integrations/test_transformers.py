"""GradGuardTrainerCallback in a real Hugging Face Trainer on a tiny config-built GPT-2."""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from gradguard import ClipNorm, RunStore, SkipNonFinite, chain  # noqa: E402
from gradguard.integrations.transformers import GradGuardTrainerCallback, attach  # noqa: E402

torch.set_num_threads(1)


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
    """Stands in for TensorBoard/W&B/MLflow: keeps the logs it is given."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.logs.append(dict(logs))


def make_trainer(tmp_path, model, reporter, **overrides) -> Trainer:
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
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
        callbacks=[reporter],
    )


def test_metrics_reach_the_reporting_callbacks_and_match_the_trainers_norm(tmp_path):
    reporter = Reporter()
    trainer = make_trainer(
        tmp_path, tiny_gpt2(), reporter, max_grad_norm=0.0, gradient_accumulation_steps=2
    )
    callback = attach(trainer, policy=ClipNorm(1e9), store=tmp_path / "run", log_every=1)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    assert not callback.monitoring
    assert len(reporter.logs) == 6
    for row in reporter.logs:
        # The Trainer's own grad_norm (computed before any callback) is the pre-clip norm.
        assert row["gradguard/total_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)
        assert row["gradguard/skipped"] == 0.0
        assert "gradguard/total_norm_max" in row and "gradguard/clip_coef" in row
    assert "gradguard/total_norm" in trainer.state.log_history[0]
    recorded = RunStore.open(tmp_path / "run").steps()
    assert list(recorded["total_norm"]) == pytest.approx(
        [row["grad_norm"] for row in reporter.logs], rel=1e-5
    )


def test_with_trainer_clipping_the_callback_monitors_the_clipped_gradients(tmp_path):
    reporter = Reporter()
    trainer = make_trainer(tmp_path, tiny_gpt2(), reporter, max_grad_norm=0.5)
    callback = attach(trainer, policy=ClipNorm(0.1))
    with pytest.warns(UserWarning, match="only measures"):
        trainer.train()
    assert callback.monitoring
    for row in reporter.logs:
        pre = row["grad_norm"]
        assert pre > 0.5  # the Trainer clipped every step of this run
        seen = pre * min(1.0, 0.5 / (pre + 1e-6))
        assert row["gradguard/total_norm"] == pytest.approx(seen, rel=1e-5)
        assert row["gradguard/clip_coef"] == 1.0


def test_nan_step_is_skipped_bit_for_bit_when_gradguard_owns_clipping(tmp_path):
    nan_step = 3
    model = tiny_gpt2()
    poison = {"on": False}

    def inject(module, inputs, output):
        return output * float("nan") if poison["on"] else output

    model.transformer.h[0].mlp.register_forward_hook(inject)
    snapshots: dict[str, object] = {}

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            poison["on"] = state.global_step == nan_step
            if poison["on"]:
                snapshots["before"] = (
                    copy.deepcopy(model.state_dict()),
                    copy.deepcopy(optimizer.state_dict()),
                )

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if poison["on"]:
                snapshots["after"] = (
                    copy.deepcopy(model.state_dict()),
                    copy.deepcopy(optimizer.state_dict()),
                )
            poison["on"] = False

    reporter = Reporter()
    trainer = make_trainer(tmp_path, model, reporter, max_grad_norm=0.0)
    trainer.add_callback(Watch())
    attach(trainer, policy=chain(SkipNonFinite(), ClipNorm(1.0)))
    with pytest.warns(RuntimeWarning, match="skipped"):
        trainer.train()

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    (params_before, optim_before), (params_after, optim_after) = (
        snapshots["before"],
        snapshots["after"],
    )
    assert optim_before["state"]  # Adam had state to protect
    assert same(params_before, params_after)
    assert same(optim_before, optim_after)
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())
    skipped = [row["gradguard/skipped"] for row in reporter.logs]
    assert skipped == [1.0 if i == nan_step else 0.0 for i in range(6)]
    assert not same(params_after, model.state_dict())  # training went on after the skip


def test_attach_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="trainer"):
        attach(object())
    trainer = make_trainer(tmp_path, tiny_gpt2(), Reporter())
    with pytest.raises(TypeError, match="callback"):
        attach(trainer, callback=Reporter())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="monitor_only"):
        GradGuardTrainerCallback(monitor_only=1)  # type: ignore[arg-type]
