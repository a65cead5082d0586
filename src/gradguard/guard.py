"""``Guard``: measure → decide → apply (:meth:`Guard.process`), then step or skip
(:meth:`Guard.step`), recording every step.

Place ``guard.step(optimizer)`` where ``optimizer.step()`` was: after ``backward()``
(and after the last micro-batch when accumulating), so it sees the real gradients:
accumulated, unscaled and all-reduced. Code that steps the optimizer itself (framework
integrations, front-ends) calls ``guard.process()`` at the same place instead.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _amp, _compiled, _foreach, _update, _warn, distributed
from . import _validate as check
from ._guard_setup import (
    attach_health,
    backward_order,
    check_health,
    check_owner,
    check_scalar,
    lr_value,
)
from ._params import Collected, ParamsLike, check_grad, collect, named_params
from ._skips import SkipReports
from .ops import NUMPY, TORCH, Ops
from .policies import Chain, Decision, Policy, default_policy
from .policies.base import StepInputs
from .result import StepResult, outcome, skip_and_reason
from .schema import Sink
from .stats import GradStats, measure_grads, measure_weights

__all__ = ["Guard", "StepResult"]

#: Steps between two measurements of the weights' norm (a pass over every weight) for a
#: policy that reads it; in between the last one stands.
WEIGHTS_EVERY = 10


class Guard:
    """Keep a training run's gradients healthy.

    Args:
        model: an ``nn.Module`` (parameter names are then known) or parameters.
        policy: what to do each step; default :func:`~gradguard.policies.default_policy`
            (skip non-finite steps, then the self-tuning FeedbackClip).
        norm_type: the p-norm measured and clipped.
        store: record to this run directory or ``.db`` file (SQLite run store); with
            ``sinks`` or ``store`` given, the guard builds a :class:`~gradguard.record.Recorder`.
        log_every: steps per flush to the store and sinks (one device→host copy each); a
            skip decided on a device (fused optimizers) is reported at most this late.
        sinks: further sinks (TensorBoard, W&B, MLflow, console).
        recorder: a ready :class:`~gradguard.record.Recorder` instead of ``store``/``sinks``.
        resume: continue this run of the store (a run id, or ``"latest"``) instead of
            recording a new one, e.g. after ``load_state_dict`` from a checkpoint.
        health: evaluate the health rules at each flush, record findings as events and
            warn once per finding (``True``), with a given
            :class:`~gradguard.health.HealthConfig`, or not at all (``False``).
        accumulate_dtype: dtype in which norms of fp16/bf16 gradients are accumulated;
            fp32 by default, since an fp16 norm overflows above 65504.
        fold_fused: with a fused optimizer (``fused=True``), fold the clip coefficient and
            the skip flag into its ``grad_scale``/``found_inf`` inputs: no extra pass over
            the gradients and no host sync.
        host_math: decide on the host (NumPy) when the gradients are on the CPU, where a
            0-d torch operation costs more than the arithmetic; ``False`` decides with
            torch operations wherever the gradients are, as on an accelerator.
        compile: run the policy's device math as one compiled kernel
            (``torch.compile``; the default policy's update is some 160 torch operations,
            each a kernel launch, otherwise). ``None``: on CUDA devices where Triton is
            installed; ``True``: wherever the device math runs; ``False``: never. The
            first step compiles (seconds); a failed compile warns once and the policy
            runs op by op.
    """

    def __init__(
        self,
        model: ParamsLike,
        policy: Policy | None = None,
        *,
        norm_type: float | str = 2.0,
        store: str | os.PathLike[str] | None = None,
        log_every: int = 50,
        sinks: Sequence[Sink] = (),
        recorder: Any = None,
        health: Any = True,
        accumulate_dtype: torch.dtype | None = torch.float32,
        fold_fused: bool = True,
        host_math: bool = True,
        compile: bool | None = None,
        resume: int | str | None = None,
    ) -> None:
        params, names = named_params(model)
        names = None if names is None else tuple(names)
        if not params:
            raise ValueError("model: there are no parameters to guard")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a gradguard Policy, got {type(policy).__name__}")
        check_health(health)
        if accumulate_dtype is not None and not (
            isinstance(accumulate_dtype, torch.dtype) and accumulate_dtype.is_floating_point
        ):
            raise TypeError(
                f"accumulate_dtype must be a floating torch.dtype or None, got {accumulate_dtype!r}"
            )
        check.one_of("fold_fused", fold_fused, (bool,), "a bool")
        check.one_of("host_math", host_math, (bool,), "a bool")
        if compile is not None:
            check.one_of("compile", compile, (bool,), "a bool or None")
        self.params = params
        self.names = names
        self.policy = policy if policy is not None else default_policy()
        # A policy that overrides decide() may answer in torch on the host path.
        self._custom_decide = not isinstance(self.policy, Chain) and (
            type(self.policy).decide is not Policy.decide
        )
        self.norm_type = check.norm_type(norm_type)
        self.log_every = check.positive_int("log_every", log_every)
        self.accumulate_dtype = accumulate_dtype
        self.fold_fused = fold_fused
        self.host_math = host_math
        self.compile = compile
        self.health: Any = None
        self._step = 0
        self._accumulating = False
        self._started = False
        self._checked: set[int] = set()  # optimizers whose parameters were checked
        self._seen: list[tuple[weakref.ref, int]] = []  # last step's gradients and versions
        self._state_ready = _update.StateReadiness()
        self._weights: Tensor | None = None  # the weights' last measured norm
        self._weights_age = 0  # steps since
        self._loss_warned = False  # warned that a policy needing the loss got none
        # Side effects last: open the store, hook the model, attach the health rules.
        if recorder is None and (store is not None or sinks):
            from .record import Recorder

            target = store if store is not None else False
            recorder = Recorder(target, sinks, self.log_every, resume=resume)
        self.recorder = recorder
        if recorder is not None:
            self.log_every = int(getattr(recorder, "log_every", self.log_every))
        self._order = backward_order(model)
        self._skips = SkipReports(self)
        if recorder is not None and health is not False:
            self.health = attach_health(recorder, model, health, self._order)

    # -- accumulation -----------------------------------------------------------------

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Inside this block ``step()`` does nothing: use it around micro-batches."""
        previous, self._accumulating = self._accumulating, True
        try:
            yield
        finally:
            self._accumulating = previous

    # -- the step ---------------------------------------------------------------------

    def measure(self) -> GradStats:
        """Measure the current gradients of the guarded parameters (no host sync)."""
        collected = collect(self.params, self.names)
        return self._measure(collected)

    def process(
        self,
        *,
        loss: Tensor | float | None = None,
        lr: Tensor | float | None = None,
        found_inf: Tensor | float | None = None,
        loss_scale: Tensor | float | None = None,
        defer_scale: bool = False,
        step: int | None = None,
        grads: Sequence[Tensor | None] | None = None,
        sgd: bool | float = False,
    ) -> StepResult:
        """Measure, decide and apply, without an optimizer; record the step.

        Call it where the optimizer step would come, after the gradients are final. The
        gradients are clipped in place; whether to step the optimizer is
        ``result.is_skipped()`` (a host sync on a device when the policy can skip).

        Args:
            loss: this step's loss (a 0-d tensor or a number), seen by the policies
                (:class:`~gradguard.policies.StepInputs`) and recorded.
            lr: the learning rate, seen by the policies and recorded.
            found_inf: an overflow flag found elsewhere (AMP's ``GradScaler``): when > 0
                the step is skipped with reason ``amp_overflow``.
            loss_scale: the AMP loss scale, recorded.
            defer_scale: leave the global clip coefficient (``result.scale``) unapplied,
                for a caller that folds it into its optimizer.
            step: the framework's number for this step (its global step); the steps
                after it are counted on from it.
            grads: the gradients to use instead of each guarded parameter's ``.grad``,
                one per guarded parameter in order (``None`` where it has none), for an
                engine that keeps them elsewhere (DeepSpeed).
            sgd: the optimizer's step is ``lr`` times the gradient (``torch.optim.SGD``):
                ``True``, or its momentum gain ``(1 - dampening) / (1 - momentum)`` (10 at
                momentum 0.9; ``True`` is 1, no momentum; 0 or ``False``: not SGD).
                Policies that bound the step relative to the weights
                (:class:`~gradguard.FeedbackClip`) then get the weights' norm.
        """
        number = None if step is None else check.positive_int("step", step, minimum=0)
        if not isinstance(sgd, bool):
            sgd = check.non_negative("sgd", sgd)  # 0: not SGD
        collected = self._collect() if grads is None else self._given(grads)
        if number is not None:
            self._step = number
        return self._process(collected, loss, lr, found_inf, loss_scale, defer_scale, sgd)

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        *,
        loss: Tensor | float | None = None,
        sync: bool = True,
    ) -> StepResult | None:
        """:meth:`process`, then step the optimizer unless the step is skipped.

        With a ``GradScaler``, gradients are unscaled first (unless already unscaled) and
        the scaler's overflow check joins the skip decision; ``scaler.update()`` stays
        yours to call, as usual. ``sync=False`` (or an ``accumulating()`` block) makes the
        call a no-op for micro-batches that only accumulate.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {scaler!r}")
        if not sync or self._accumulating:
            return None
        amp = scaler is not None and scaler.is_enabled()
        if amp:
            _amp.unscale_once(scaler, optimizer)  # type: ignore[arg-type]
        collected = self._collect()
        if id(optimizer) not in self._checked:
            check_owner(optimizer, self.params, collected)
            _update.warn_if_private(optimizer)
            self._checked.add(id(optimizer))
        device = collected.grads[0].device
        on_host = self._ops_for(device) is NUMPY
        complete = collected.params is self.params  # every guarded parameter has a gradient
        fold = (
            self.fold_fused
            and _update.supports_folding(optimizer)
            and (on_host or self._state_ready(optimizer, collected.params, every=complete))
        )
        found = _amp.found_inf(scaler, optimizer, device) if amp else None  # type: ignore[arg-type]
        scale = _amp.current_scale(scaler) if amp else None  # type: ignore[arg-type]
        lr = _update.learning_rate(optimizer)
        sgd = _update.sgd_step_gain(optimizer)
        result = self._process(collected, loss, lr, found, scale, fold, sgd)
        skipped = _update.run(optimizer, result, fold=fold, scaler=scaler if amp else None)
        if skipped and not result.reported:
            self._skips.report(result)
        self._remember(collected.grads)
        return result

    def nonfinite_origin(self, result: StepResult) -> str | None:
        """The first parameter in backward order whose gradient was non-finite. Syncs.

        A NaN spreads to every gradient upstream of where it appears, so the names of all
        non-finite gradients say little; the first in backward order is where it began.
        Needs a module (not bare parameters) and one observed backward pass.
        """
        names = result.nonfinite_names()
        if not names:
            return None
        if self._order is not None:
            origin = self._order.first_nonfinite(names)
            if origin is not None:
                return origin
        return names[-1]  # registration order, reversed, is the usual backward order

    # -- internals --------------------------------------------------------------------

    def _ops_for(self, device: torch.device) -> Ops:
        return NUMPY if self.host_math and device.type == "cpu" else TORCH

    def _compiles(self, device: torch.device) -> bool:
        """Whether the policy's device math runs compiled (see ``compile``)."""
        if self.compile is not None:
            return self.compile
        return _compiled.by_default(device)

    def _collect(self) -> Collected:
        collected = collect(self.params, self.names)
        if not collected.grads:
            raise ValueError(
                "guard.step found no gradients: every guarded parameter's .grad is None. "
                "Call loss.backward() first, and don't zero the gradients before the step."
            )
        seen = self._seen
        if len(seen) == len(collected.grads) and all(
            ref() is g and g._version == v for (ref, v), g in zip(seen, collected.grads)
        ):
            raise RuntimeError(
                "guard.step: the gradients are the ones the last step already used (no "
                "backward since); call loss.backward() before each step"
            )
        return collected

    def _given(self, grads: Sequence[Tensor | None]) -> Collected:
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(
                f"grads: expected one gradient (or None) per guarded parameter, "
                f"{len(self.params)} in all, got {len(grads)}"
            )
        kept = [i for i, g in enumerate(grads) if g is not None]
        if not kept:
            raise ValueError("grads: every gradient is None; there is nothing to measure")
        names = self.names
        for i in kept:
            if not isinstance(grads[i], Tensor):
                raise TypeError(
                    f"grads[{i}] must be a tensor or None, got {type(grads[i]).__name__}"
                )
            check_grad(grads[i], repr(names[i]) if names is not None else f"parameters[{i}]")
        return Collected(
            [self.params[i] for i in kept],
            [grads[i] for i in kept],  # type: ignore[misc]
            [names[i] for i in kept] if names is not None else None,
            len(self.params),
        )

    def _remember(self, grads: list[Tensor]) -> None:
        self._seen = [(weakref.ref(g), g._version) for g in grads]

    def _weight_norm(self, params: list[Tensor], device: torch.device) -> Tensor:
        """The weights' norm, measured every :data:`WEIGHTS_EVERY` steps (no host sync)."""
        self._weights_age += 1
        if self._weights is None or self._weights_age >= WEIGHTS_EVERY:
            self._weights = measure_weights(params, self.accumulate_dtype, device)
            self._weights_age = 0
        return self._weights

    def _measure(self, collected: Collected) -> GradStats:
        return measure_grads(
            collected.grads, self.norm_type, names=collected.names, dtype=self.accumulate_dtype
        )

    def _process(
        self,
        collected: Collected,
        loss: Any,
        lr: Any,
        found_inf: Any,
        loss_scale: Any,
        defer_scale: bool,
        sgd: bool | float = False,
    ) -> StepResult:
        if loss is not None or lr is not None:
            check_scalar("loss", loss)
            check_scalar("lr", lr)
        result = self._decide(collected, loss, lr, found_inf, defer_scale, sgd)
        self._step += 1
        # Outside the NumPy error state: warnings here are attributed to the user's line.
        self._record(result, lr, loss_scale)
        self._skips.after_step(result)
        return result

    @np.errstate(all="ignore")  # host math is as silent about NaN/inf as torch
    def _decide(
        self,
        collected: Collected,
        loss: Any,
        lr: Any,
        found_inf: Any,
        defer_scale: bool,
        sgd: bool | float = False,
    ) -> StepResult:
        """Measure, decide and apply: the step's :class:`StepResult`."""
        stats = self._measure(collected)
        xp = self._ops_for(stats.total_norm.device)
        params, grads = collected.params, collected.grads
        weights = None
        if sgd and self.policy.reads_weight_norm:
            weights = self._weight_norm(params, stats.total_norm.device)
            if loss is None and self.policy.needs_loss and not self._loss_warned:
                self._loss_warned = True
                _warn.warn(
                    "gradguard: FeedbackClip's unstable-SGD-step check (part of the default "
                    "policy) needs the step's loss and is off without it: pass "
                    "guard.step(optimizer, loss=loss)"
                )
        inputs = StepInputs.from_stats(
            stats,
            params,
            xp=xp,
            step=self._step,
            loss=loss,
            lr=lr_value(lr, xp),
            weight_norm=weights,
            step_gain=float(sgd) if weights is not None else 1.0,
            compile=self._compiles(stats.total_norm.device),
        )
        decision = self.policy.decide(inputs, params)
        if self._custom_decide:
            decision = decision.in_library(xp)
        skip, reason, may_skip = skip_and_reason(xp, decision, found_inf, inputs.total_norm)
        transformed = self._apply(decision, params, grads, xp, defer_scale)
        clipped, coef, threshold = outcome(inputs, decision, transformed)
        return StepResult(
            self._step, stats, inputs, decision, skip, reason, clipped, coef, threshold, may_skip
        )

    def _apply(
        self, decision: Decision, params: list[Tensor], grads: list[Tensor], xp: Ops, defer: bool
    ) -> Tensor | None:
        """Transforms, per-tensor scales, then (unless deferred) the global scale, in place.

        Returns the norm after the transforms and per-tensor scales when a recorder will
        record it (an extra pass over the gradients).
        """
        scale, factors = decision.scale, decision.tensor_scale
        scales = factors is not None or (scale is not None and not defer)
        local = grads
        if scales and distributed.has_dtensor(grads):
            local = distributed.local_tensors(grads)  # DTensors are scaled through their shards
        for transform in decision.transforms:
            transform(params, grads)
        if factors is not None:
            if xp is NUMPY:
                if not np.all(factors == 1.0):
                    _foreach.scale_per_tensor_(local, torch.from_numpy(np.array(factors)))
            else:
                _foreach.scale_per_tensor_(local, factors)
        transformed = None
        if decision.transforms and self.recorder is not None:
            transformed = measure_grads(grads, self.norm_type, dtype=torch.float32).total_norm
        if scale is not None and not defer:
            if xp is NUMPY:
                if not scale >= 1.0:  # nothing to do when nothing is clipped (NaN does multiply)
                    _foreach.scale_(local, torch.tensor(float(scale), dtype=torch.float32))
            else:
                _foreach.scale_(local, scale)
        return transformed

    def _record(self, result: StepResult, lr: Any, loss_scale: Any) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        if not self._started:
            shapes = [tuple(s) for s in result.stats.shapes]
            config = {"policy": repr(self.policy), "norm_type": self.norm_type}
            recorder.start(result.stats.labels(), shapes, config)
            self._started = True
        host = result.xp is NUMPY
        value = result.host_value
        inputs = result.inputs
        recorder.record(
            result.step,
            total_norm=float(inputs.total_norm) if host else result.total_norm,
            clipped_norm=value("clipped_norm"),
            clip_coef=value("clip_coef"),
            threshold=value("threshold"),
            skipped=value("skipped"),
            reason=value("reason"),
            loss=inputs.loss,
            lr=inputs.lr,
            loss_scale=float(loss_scale) if host and loss_scale is not None else loss_scale,
            stats=result.stats,  # kept for snapshot steps and non-finite steps
        )

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Policy state and step counter, so a resumed run takes the same decisions."""
        return {"step": self._step, "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; raises naming what is missing or wrong."""
        if not isinstance(state, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        missing = sorted({"step", "policy"} - set(state))
        if missing:
            raise KeyError(
                f"state_dict for Guard lacks {missing}; was it saved by Guard.state_dict()?"
            )
        step = check.positive_int("state_dict['step']", state["step"], minimum=0)
        self.policy.load_state_dict(state["policy"])
        self._step = step
        self.weights_changed()

    def weights_changed(self) -> None:
        """Measure the weights' norm afresh at the next step (after weights were replaced:
        a checkpoint loaded, a :class:`~gradguard.Rewind` restore); it is otherwise
        measured every :data:`WEIGHTS_EVERY` steps."""
        self._weights = None

    def close(self) -> None:
        """Report pending skips, then flush and close the recorder, if any."""
        self._skips.resolve(collective=False)
        if self.recorder is not None:
            self.recorder.close()
