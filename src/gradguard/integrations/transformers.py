"""Hugging Face Transformers: a ``TrainerCallback`` and ``attach(trainer)``.

Where the Trainer lets a callback in (transformers 4.47+ and 5.x, ``_inner_training_loop``):
after the last micro-batch's backward the Trainer clips (when ``max_grad_norm > 0``) and
computes its ``grad_norm``, then calls ``on_pre_optimizer_step``, then
``optimizer.step()``. So a callback never sees the pre-clip gradients while the Trainer
clips. Hence two modes:

- monitor (default while ``max_grad_norm > 0``): gradguard measures the gradients the
  optimizer receives (after the Trainer's clip) and records them; it changes nothing.
- guard (``max_grad_norm=0``): gradguard owns clipping and skipping: its policy clips in
  place and a skipped step leaves parameters, optimizer state and the learning rate
  schedule untouched (the Trainer is told the step was skipped, as on an AMP overflow).

Metrics are added to the ``logs`` dict of ``on_log``; :func:`attach` puts the callback
first, so the reporting callbacks (TensorBoard, W&B, MLflow, ...) receive them too.

    trainer = Trainer(model, TrainingArguments(..., max_grad_norm=0), ...)
    attach(trainer)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError(
        "gradguard.integrations.transformers needs transformers: "
        "pip install 'gradguard[transformers]'"
    ) from error

import torch

from ..guard import Guard, StepResult
from ..policies import Monitor, Policy
from ..schema import Sink
from ._core import CallbackBase, HookStep, check_skippable


class GradGuardTrainerCallback(CallbackBase, TrainerCallback):
    """Guard (or monitor) the gradients of a Hugging Face ``Trainer``.

    Args:
        policy: the guard's policy (default :func:`~gradguard.default_policy`).
        monitor_only: only measure. ``None`` (default): monitor while the Trainer clips
            (``max_grad_norm > 0``), guard when ``max_grad_norm == 0``.
        norm_type: the p-norm measured and clipped.
        prefix: prefix of the metric names added to the Trainer's logs.
        store, sinks, log_every, health: recording, as for :class:`~gradguard.Guard`.

    Logged at each Trainer log: ``total_norm``, ``clipped_norm``, ``clip_coef`` of the
    last step, ``total_norm_max`` since the previous log and ``skipped`` (steps skipped
    since the previous log).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        monitor_only: bool | None = None,
        norm_type: float | str = 2.0,
        prefix: str = "gradguard/",
        store: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        health: Any = True,
    ) -> None:
        CallbackBase.__init__(
            self, policy, monitor_only, norm_type, prefix, store, sinks, log_every, health
        )
        self._window: dict[str, torch.Tensor] = {}
        self._overflow_flag: tuple[Any, bool] | None = None

    # -- Trainer events ----------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.guard is not None:
            return
        if model is None:
            raise ValueError("GradGuardTrainerCallback: the Trainer passed no model")
        if getattr(args, "deepspeed", None):
            raise NotImplementedError(
                "GradGuardTrainerCallback: under DeepSpeed the engine owns the gradients; "
                "use gradguard.integrations.deepspeed.DeepSpeedMonitor"
            )
        hf_clips = float(args.max_grad_norm or 0) > 0
        monitor = self.monitor_only
        if monitor is None:
            monitor = hf_clips
            if hf_clips and self.policy is not None:
                warnings.warn(
                    f"gradguard: the Trainer clips (max_grad_norm={args.max_grad_norm}) before "
                    "any callback sees the gradients, so gradguard only measures. Set "
                    "max_grad_norm=0 to let gradguard's policy clip and skip.",
                    UserWarning,
                    stacklevel=2,
                )
        elif not monitor and hf_clips:
            warnings.warn(
                f"gradguard: the Trainer clips first (max_grad_norm={args.max_grad_norm}); "
                "gradguard's policy then acts on the clipped gradients.",
                UserWarning,
                stacklevel=2,
            )
        if not monitor and optimizer is not None:
            check_skippable(optimizer)
        self.guard = Guard(model, Monitor() if monitor else self.policy, **self._guard_kwargs)
        self._hook = HookStep(self.guard)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._hook is None or optimizer is None:
            return
        result = self._hook.run(optimizer)
        if result is not None:
            self._accumulate(result)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._hook is None:
            return
        self._hook.release()
        if self._hook.skipped_last and hasattr(optimizer, "_is_overflow"):
            # Accelerate's flag for a skipped step: the Trainer then leaves the learning
            # rate scheduler where it is, as it does on an AMP overflow.
            self._overflow_flag = (optimizer, optimizer._is_overflow)
            optimizer._is_overflow = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._overflow_flag is not None:
            optimizer, previous = self._overflow_flag
            optimizer._is_overflow = previous
            self._overflow_flag = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._window:
            return
        try:
            values = self._flush_window()
        except Exception as error:  # a logging fault never stops training
            warnings.warn(f"gradguard: logging failed: {error}", RuntimeWarning, stacklevel=2)
            return
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)  # the Trainer copied logs into its history already

    def on_train_end(self, args, state, control, **kwargs):
        if self.guard is not None:
            self.guard.close()

    # -- metrics -----------------------------------------------------------------------

    def _accumulate(self, result: StepResult) -> None:
        total = result.total_norm.float()
        window = self._window
        if not window:
            window["total_norm_max"] = total
            window["skipped"] = result.skipped.float()
        else:
            window["total_norm_max"] = torch.fmax(window["total_norm_max"], total)
            window["skipped"] = window["skipped"] + result.skipped.float()
        window["total_norm"] = total
        window["clipped_norm"] = result.clipped_norm.float()
        window["clip_coef"] = result.clip_coef.float()

    def _flush_window(self) -> dict[str, float]:
        names = sorted(self._window)
        stacked = torch.stack([self._window[n].reshape(()) for n in names]).tolist()  # one sync
        self._window = {}
        return {self.prefix + n: float(v) for n, v in zip(names, stacked)}


def attach(trainer: Any, callback: GradGuardTrainerCallback | None = None, **kwargs: Any):
    """Add a :class:`GradGuardTrainerCallback` to ``trainer`` ahead of every other callback.

    Being first, its metrics are in the ``logs`` that the reporting callbacks receive.
    ``kwargs`` build the callback when none is given. Returns the callback.
    """
    if callback is None:
        callback = GradGuardTrainerCallback(**kwargs)
    elif kwargs:
        raise TypeError("attach: pass either a callback or keyword arguments to build one")
    if not isinstance(callback, GradGuardTrainerCallback):
        raise TypeError(
            f"callback must be a GradGuardTrainerCallback, got {type(callback).__name__}"
        )
    handler = getattr(trainer, "callback_handler", None)
    if handler is None:
        raise TypeError(f"trainer must be a transformers Trainer, got {type(trainer).__name__}")
    handler.callbacks[:] = [c for c in handler.callbacks if c is not callback]
    handler.callbacks.insert(0, callback)
    return callback
