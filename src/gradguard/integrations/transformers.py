"""Hugging Face Transformers: ``GradGuardTrainerCallback``, added however you add callbacks.

``Trainer(callbacks=[GradGuardTrainerCallback()])``, ``trainer.add_callback(...)`` and
:func:`attach` all work: when training starts the callback moves itself ahead of the
reporting callbacks (TensorBoard, W&B, MLflow, ...), so its metrics reach their logs.

The Trainer measures (and clips, while ``max_grad_norm > 0``) the gradients through
``accelerator.clip_grad_norm_`` once per optimizer step, after the last micro-batch's
backward. During training the callback takes that call over: gradguard measures the
pre-clip gradients there, and the norm it returns is the Trainer's logged ``grad_norm``,
so there is one norm pass per step (the Trainer's own, including its extra pass with
``max_grad_norm=0``, is gone). Then:

- **monitor** (the default while ``max_grad_norm > 0`` and no policy is given):
  gradguard clips exactly as the Trainer did (``ClipNorm(max_grad_norm)``, torch's
  ``clip_grad_norm_`` bit for bit) and never skips: nothing changes but what is recorded
  (the pre-clip norm, the threshold, the coefficient, the loss and the learning rate).
- **guard** (a policy given, ``monitor_only=False``, or ``max_grad_norm=0``): the policy
  clips and skips. Without a policy of yours, ``max_grad_norm`` becomes
  ``chain(SkipNonFinite(), ClipNorm(max_grad_norm))``, so what is clipped does not change.

A skipped step leaves parameters and optimizer state untouched; it counts in
``state.global_step`` (as an fp16 overflow does) and the Trainer holds the learning rate
(``lr_on_skip="hold"``) through Accelerate's own skip flag, as on an fp16 overflow.
Recorded step numbers are the Trainer's ``global_step`` (the ``step`` of its logs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError as error:
    raise ImportError(
        "gradguard.integrations.transformers needs transformers: "
        "pip install 'gradguard[transformers]'"
    ) from error

import torch

from .. import _amp, _warn
from ..guard import Guard, StepResult
from ..policies import ClipNorm, Policy
from ..schema import Sink
from ._core import CallbackBase, HookStep, LossWindow, check_skippable, innermost, resolve_policy
from .accelerate import SkipSignal


class GradGuardTrainerCallback(CallbackBase, TrainerCallback):
    """Guard (or monitor) the gradients of a Hugging Face ``Trainer``.

    Args:
        policy: gradguard's policy; given, gradguard clips and skips in place of the
            Trainer's ``max_grad_norm``.
        monitor_only: only record. ``None`` (default): monitor while the Trainer clips
            (``max_grad_norm > 0``) and no policy is given, guard otherwise.
        lr_on_skip: ``"hold"`` (default) keeps the learning rate on a skipped step, as
            on an fp16 overflow; ``"advance"`` steps the schedule anyway.
        norm_type: the p-norm measured and clipped.
        prefix: prefix of the metric names added to the Trainer's logs.
        store, sinks, log_every, health: recording, as for :class:`~gradguard.Guard`
            (rank 0 records).

    Logged at each Trainer log: ``total_norm``, ``clipped_norm``, ``clip_coef`` of the
    last step, ``total_norm_max`` since the previous log and ``skipped`` (steps skipped
    since the previous log).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        monitor_only: bool | None = None,
        lr_on_skip: str = "hold",
        norm_type: float | str = 2.0,
        prefix: str = "gradguard/",
        store: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        log_every: int = 50,
        health: Any = True,
    ) -> None:
        CallbackBase.__init__(
            self,
            policy,
            monitor_only,
            lr_on_skip,
            norm_type,
            prefix,
            store,
            sinks,
            log_every,
            health,
        )
        self._window: dict[str, torch.Tensor] = {}
        self._trainer: Any = None
        self._patches: list[_Patch] = []
        self._losses = LossWindow(mean=False)  # the Trainer divides by the micro-batches
        self._signal: SkipSignal | None = None
        self._measured_step = -1
        self._warned_fallback = False

    # -- Trainer events ----------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.guard is not None:
            return
        trainer = self._trainer or _find_trainer(self)
        if trainer is None:
            _warn.warn(
                "gradguard: GradGuardTrainerCallback found no Trainer calling it, so it does "
                "nothing; add it to a transformers.Trainer (callbacks=[...], add_callback or "
                "gradguard.integrations.transformers.attach)"
            )
            return
        if getattr(args, "deepspeed", None) or trainer.is_deepspeed_enabled:
            raise NotImplementedError(
                "GradGuardTrainerCallback: under DeepSpeed the engine owns the gradients; "
                "use gradguard.integrations.deepspeed.DeepSpeedGuard in a DeepSpeed loop"
            )
        _put_first(trainer.callback_handler, self)
        max_norm = float(args.max_grad_norm or 0)
        policy, self._monitoring = resolve_policy(
            self.policy,
            self.monitor_only,
            ClipNorm(max_norm) if max_norm > 0 else None,
            f"max_grad_norm={max_norm:g}",
        )
        if not self._monitoring:
            check_skippable(trainer.optimizer)
        self._trainer = trainer
        self.guard = Guard(
            model if model is not None else trainer.model, policy, **self._guard_kwargs
        )
        self._signal = SkipSignal(trainer.optimizer)
        on_skipped = self._signal.set if self.lr_on_skip == "hold" else None
        self._hook = HookStep(self.guard, on_skipped=on_skipped)
        self._patches = [
            _Patch(trainer.accelerator, "clip_grad_norm_", self._clip_grad_norm),
            _Patch(trainer, "training_step", self._training_step),
        ]

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._hook is None or self._measured_step == state.global_step + 1:
            return
        # The Trainer took its norm without accelerator.clip_grad_norm_ (mixed device
        # meshes, SageMaker fp16): measure here, after its clip.
        if not self._warned_fallback:
            self._warned_fallback = True
            _warn.warn(
                "gradguard: the Trainer computed its gradient norm without "
                "accelerator.clip_grad_norm_, so gradguard measures after the Trainer's clip"
            )
        self._measure_step(self._trainer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._window:
            return
        try:
            values = self._flush_window()
        except Exception as error:  # a logging fault never stops training
            _warn.warn(f"gradguard: logging failed: {error}")
            return
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)  # the Trainer copied logs into its history already

    def on_train_end(self, args, state, control, **kwargs):
        for patch in self._patches:
            patch.undo()
        self._patches = []
        if self._signal is not None:
            self._signal.clear()
        if self.guard is not None:
            self.guard.close()
        self.guard = None

    # -- what the callback puts in the Trainer's place ------------------------------------

    def _training_step(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        loss = original(*args, **kwargs)
        self._losses.add(loss)
        return loss

    def _clip_grad_norm(self, original: Any, parameters: Any, max_norm: float, norm_type=2):
        trainer = self._trainer
        number = trainer.state.global_step + 1
        if self._hook is None or self._measured_step == number:
            return original(parameters, max_norm, norm_type)  # not the Trainer's step call
        result = self._measure_step(trainer)
        if result is None:
            return original(parameters, max_norm, norm_type)
        return result.total_norm

    def _measure_step(self, trainer: Any) -> StepResult | None:
        assert self._hook is not None and self._signal is not None
        number = trainer.state.global_step + 1
        self._measured_step = number
        self._signal.clear()
        found_inf = loss_scale = None
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            inner = innermost(trainer.optimizer)
            _amp.unscale_once(scaler, inner)
            grads = [p.grad for p in self._hook.guard.params if p.grad is not None]
            if grads:
                found_inf = _amp.found_inf(scaler, inner, grads[0].device)
                loss_scale = _amp.current_scale(scaler)
        result = self._hook.run(
            trainer.optimizer,
            loss=self._losses.take(),
            step=number,
            found_inf=found_inf,
            loss_scale=loss_scale,
        )
        if result is not None:
            self._accumulate(result)
        return result

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


class _Patch:
    """An instance attribute replaced by ``replacement(original, *args)`` until :meth:`undo`."""

    def __init__(self, owner: Any, name: str, replacement: Any) -> None:
        self.owner, self.name = owner, name
        self.had_own = name in vars(owner)
        original = getattr(owner, name)
        self.original = original

        def patched(*args: Any, **kwargs: Any) -> Any:
            return replacement(original, *args, **kwargs)

        setattr(owner, name, patched)

    def undo(self) -> None:
        if self.had_own:
            setattr(self.owner, self.name, self.original)
        else:
            vars(self.owner).pop(self.name, None)


def _find_trainer(callback: GradGuardTrainerCallback) -> Any:
    """The Trainer whose callback handler is calling ``callback`` (from the call stack)."""
    frame = sys._getframe(1)
    for _ in range(32):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and any(
            c is callback for c in candidate.callback_handler.callbacks
        ):
            return candidate
        frame = frame.f_back
    return None


def _put_first(handler: Any, callback: Any) -> None:
    """Move ``callback`` to the front of the handler's list (safe during its iteration:
    the callbacks after it keep their positions)."""
    callbacks = handler.callbacks
    callbacks[:] = [callback] + [c for c in callbacks if c is not callback]


def attach(trainer: Any, callback: GradGuardTrainerCallback | None = None, **kwargs: Any):
    """Add a :class:`GradGuardTrainerCallback` to ``trainer`` ahead of every other callback.

    The same as ``trainer.add_callback(GradGuardTrainerCallback(**kwargs))``, which also
    works; returns the callback.
    """
    if callback is None:
        callback = GradGuardTrainerCallback(**kwargs)
    elif kwargs:
        raise TypeError("attach: pass either a callback or keyword arguments to build one")
    if not isinstance(callback, GradGuardTrainerCallback):
        raise TypeError(
            f"callback must be a GradGuardTrainerCallback, got {type(callback).__name__}"
        )
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a transformers Trainer, got {type(trainer).__name__}")
    _put_first(trainer.callback_handler, callback)
    callback._trainer = trainer
    return callback
