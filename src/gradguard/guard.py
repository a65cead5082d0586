"""``Guard``: measure → decide → apply → step (or skip) → record, once per optimizer step.

Place ``guard.step(optimizer)`` where ``optimizer.step()`` was: after ``backward()``
(and after the last micro-batch when accumulating), so it sees the real gradients:
accumulated, unscaled and all-reduced.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _amp, _foreach, _warn, distributed
from . import _validate as check
from ._params import ParamsLike, named_params
from .policies import Decision, Policy, default_policy
from .schema import Sink, SkipReason, skip_event
from .stats import GradStats, measure_grads

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class StepResult:
    """What one guarded step did. Tensor fields stay on the device: reading them syncs.

    Attributes:
        step: the guard's optimizer-step counter (0-based) for this step.
        total_norm: global gradient norm before any clipping.
        clipped_norm: global norm after clipping. After an element-wise transform
            (ClipValue, AGC, GradientNoise) it takes one more pass over the gradients, paid
            only when a recorder is attached; without one it is NaN in that case.
        clip_coef: ``clipped_norm / total_norm`` (1.0 when nothing was clipped).
        threshold: the norm threshold in force (``inf`` when none).
        skipped: True when the optimizer step was skipped.
        reason: a :class:`~gradguard.schema.SkipReason` code.
        stats: the step's :class:`GradStats` (pre-clip per-tensor norms, names).
    """

    step: int
    total_norm: Tensor
    clipped_norm: Tensor
    clip_coef: Tensor
    threshold: Tensor
    skipped: Tensor
    reason: Tensor
    stats: GradStats

    @property
    def reason_label(self) -> str:
        """Why the step was skipped, as text (``"none"`` when it was not). Syncs."""
        return SkipReason(int(self.reason)).label if bool(self.skipped) else "none"

    def nonfinite_names(self) -> list[str]:
        """Parameters whose gradient held NaN or inf this step. Syncs."""
        return self.stats.nonfinite_names()


class Guard:
    """Keep a training run's gradients healthy.

    Args:
        model: an ``nn.Module`` (parameter names are then known) or parameters.
        policy: what to do each step; default :func:`~gradguard.policies.default_policy`
            (skip non-finite steps, clip norm spikes with ZClip).
        norm_type: the p-norm measured and clipped.
        store: record to this run directory or ``.db`` file (SQLite run store); with
            ``sinks`` or ``store`` given, the guard builds a :class:`~gradguard.record.Recorder`.
        log_every: steps per flush to the store and sinks (one device→host copy each).
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
        resume: int | str | None = None,
    ) -> None:
        params, names = named_params(model)
        if not params:
            raise ValueError("model: there are no parameters to guard")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a gradguard Policy, got {type(policy).__name__}")
        self.params = params
        self.names = names
        self.policy = policy if policy is not None else default_policy()
        self.norm_type = check.norm_type(norm_type)
        if recorder is None and (store is not None or sinks):
            from .record import Recorder

            recorder = Recorder(
                store if store is not None else False, sinks, log_every, resume=resume
            )
        self.recorder = recorder
        self._order = _backward_order(model)
        if recorder is not None and health is not False:
            self._attach_health(model, health)
        self.accumulate_dtype = accumulate_dtype
        self.fold_fused = fold_fused
        self._step = 0
        self._accumulating = False
        self._started = False
        self._warned_skip = False
        self.health: Any = None

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
        params, grads, names = self._collect()
        del params
        return self._measure(grads, names)

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        *,
        loss: Tensor | float | None = None,
        sync: bool = True,
    ) -> StepResult | None:
        """Measure, decide, apply, then step the optimizer unless the step is skipped.

        With a ``GradScaler``, gradients are unscaled first (unless already unscaled),
        ``scaler.step`` is called in place of ``optimizer.step``, and ``scaler.update()``
        stays yours to call, as usual. ``sync=False`` (or an ``accumulating()`` block)
        makes the call a no-op for micro-batches that only accumulate.
        """
        if not sync or self._accumulating:
            return None
        amp = scaler is not None and scaler.is_enabled()
        if amp:
            assert scaler is not None
            _amp.unscale_once(scaler, optimizer)
        params, grads, names = self._collect()
        if not grads:
            raise ValueError(
                "guard.step found no gradients: every guarded parameter's .grad is None. "
                "Call loss.backward() first, and don't zero the gradients before the step."
            )
        stats = self._measure(grads, names)
        decision = self.policy.decide(stats, params)
        # DTensor gradients are scaled through their local shards (same storage).
        local = distributed.local_tensors(grads) if distributed.has_dtensor(grads) else grads
        self._apply_in_place(decision, params, grads, local)
        transformed_norm = None
        if decision.transforms and self.recorder is not None:
            # Norm after the in-place transforms and per-tensor scales, before the global one.
            transformed_norm = measure_grads(grads, self.norm_type, dtype=torch.float32).total_norm
        device = stats.total_norm.device
        skip, reason = self._skip_and_reason(decision, stats, amp, scaler, optimizer, device)

        folded = self.fold_fused and _supports_folding(optimizer)
        if decision.scale is not None and not folded:
            for group in _foreach.groups(local):
                _foreach.mul_(group, decision.scale)
        skipped_on_host = False
        if folded:
            self._step_fused(optimizer, scaler if amp else None, decision)
        else:
            skipped_on_host = self._step_plain(optimizer, scaler if amp else None, decision.skip)

        result = self._result(stats, decision, skip, reason, transformed_norm)
        self._record(result, optimizer, scaler if amp else None, loss)
        if skipped_on_host:
            self._report_skip(result)  # only on skipped steps: naming the culprits syncs
        self._step += 1
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

    def _report_skip(self, result: StepResult) -> None:
        reason = result.reason_label
        names = result.nonfinite_names() if reason == "nonfinite" else []
        origin = self.nonfinite_origin(result) if names else None
        ranks = _nonfinite_ranks(result.stats) if names else None
        event = skip_event(result.step, reason, names, origin, ranks)
        if self.recorder is not None:
            self.recorder.event(event)
        if not self._warned_skip:
            self._warned_skip = True
            _warn.warn(event.message)

    def _attach_health(self, model: ParamsLike, health: Any) -> None:
        from .health import HealthConfig
        from .health.listener import attach_health

        if isinstance(health, HealthConfig):
            config = health
        elif isinstance(model, torch.nn.Module):
            config = HealthConfig.for_model(model)
        else:
            config = HealthConfig()
        self.health = attach_health(self.recorder, config, order=self._order)

    # -- internals --------------------------------------------------------------------

    def _collect(self) -> tuple[list[Tensor], list[Tensor], list[str] | None]:
        params, grads, names = [], [], [] if self.names is not None else None
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                label = self.names[index] if self.names else f"parameters[{index}]"
                raise TypeError(f"model: the gradient of {label!r} is sparse; not supported")
            params.append(param)
            grads.append(grad)
            if names is not None and self.names is not None:
                names.append(self.names[index])
        return params, grads, names

    def _measure(self, grads: list[Tensor], names: list[str] | None) -> GradStats:
        low = any(g.dtype in _LOW_PRECISION for g in grads)
        dtype = self.accumulate_dtype if low else None
        return measure_grads(grads, self.norm_type, names=names, dtype=dtype)

    @staticmethod
    def _apply_in_place(
        decision: Decision, params: list[Tensor], grads: list[Tensor], local: list[Tensor]
    ) -> None:
        for transform in decision.transforms:
            transform(params, grads)
        if decision.tensor_scale is not None:
            scales = decision.tensor_scale
            for group in _foreach.groups(local):
                index = torch.tensor(group.indices, dtype=torch.long, device=scales.device)
                picked = scales.index_select(0, index).to(group.device).unbind()
                _foreach.mul_(group, [s.to(t.dtype) for s, t in zip(picked, group.tensors)])

    @staticmethod
    def _skip_and_reason(decision, stats, amp, scaler, optimizer, device):
        false = torch.zeros((), dtype=torch.bool, device=device)
        none = torch.zeros((), dtype=torch.int8, device=device)
        skip = decision.skip if decision.skip is not None else false
        reason = decision.reason if decision.reason is not None else none
        reason = torch.where(skip, reason, none)
        if amp:
            overflow = _amp.found_inf(scaler, optimizer, device) > 0
            amp_code = torch.full((), int(SkipReason.AMP_OVERFLOW), dtype=torch.int8, device=device)
            reason = torch.where(overflow, amp_code, reason)
            skip = skip | overflow
        return skip, reason

    @staticmethod
    def _step_plain(optimizer, scaler, policy_skip: Tensor | None) -> bool:
        """Step unless the policy skips; returns whether it skipped.

        The one host sync the guard allows: a policy's skip with a non-fused optimizer.
        An AMP overflow needs none: ``scaler.step`` skips on its own.
        """
        if policy_skip is not None and bool(policy_skip):
            return True
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        return False

    @staticmethod
    def _step_fused(optimizer, scaler, decision: Decision) -> None:
        if decision.scale is not None:
            # Fused kernels divide gradients by grad_scale: fold the clip coefficient in.
            optimizer.grad_scale = 1.0 / decision.scale.float()
        try:
            if scaler is not None:
                # The scaler sets found_inf itself, so a policy skip still needs the host.
                if decision.skip is not None and bool(decision.skip):
                    return
                scaler.step(optimizer)
                return
            if decision.skip is not None:
                optimizer.found_inf = decision.skip.float()
            optimizer.step()
        finally:
            optimizer.__dict__.pop("grad_scale", None)
            optimizer.__dict__.pop("found_inf", None)

    def _result(self, stats, decision, skip, reason, transformed_norm) -> StepResult:
        total = stats.total_norm.float()
        if decision.transforms:
            nan = torch.full_like(total, math.nan)
            clipped = transformed_norm.float() if transformed_norm is not None else nan
        elif decision.tensor_scale is not None:
            scaled = stats.norms.float() * decision.tensor_scale.float()
            clipped = torch.linalg.vector_norm(scaled, self.norm_type)
        else:
            clipped = total
        if decision.scale is not None:
            clipped = clipped * decision.scale.float()
        coef = torch.where(total > 0, clipped / total, torch.ones_like(total))
        threshold = (
            decision.threshold.float()
            if decision.threshold is not None
            else torch.full_like(total, math.inf)
        )
        return StepResult(self._step, total, clipped, coef, threshold, skip, reason, stats)

    def _record(self, result: StepResult, optimizer, scaler, loss) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        if not self._started:
            shapes = [tuple(s) for s in result.stats.shapes]
            names = result.stats.labels()
            recorder.start(
                names, shapes, {"policy": repr(self.policy), "norm_type": self.norm_type}
            )
            self._started = True
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        recorder.record(
            result.step,
            total_norm=result.total_norm,
            clipped_norm=result.clipped_norm,
            clip_coef=result.clip_coef,
            threshold=result.threshold,
            skipped=result.skipped,
            reason=result.reason,
            loss=loss.detach() if isinstance(loss, Tensor) else loss,
            lr=float(lr) if isinstance(lr, (int, float)) else None,
            loss_scale=_amp.current_scale(scaler) if scaler is not None else None,
            stats=result.stats,  # kept for snapshot steps and non-finite steps
        )

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Policy state and step counter, so a resumed run takes the same decisions."""
        return {"step": self._step, "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._step = int(state["step"])
        self.policy.load_state_dict(state["policy"])

    def close(self) -> None:
        """Flush and close the recorder, if any."""
        if self.recorder is not None:
            self.recorder.close()


def _backward_order(model: ParamsLike) -> Any:
    """Learn the backward order of a module's parameters (hooks live for one backward)."""
    if not isinstance(model, torch.nn.Module):
        return None
    from .health import BackwardOrder

    try:
        return BackwardOrder(model)
    except ValueError:
        return None


def _nonfinite_ranks(stats: GradStats) -> list[int] | None:
    """Ranks whose local gradients were non-finite (collective; on non-finite skips only)."""
    if not distributed.is_multi_rank():
        return None
    flag = distributed.local_nonfinite(stats)
    return None if flag is None else distributed.nonfinite_ranks(flag)


def _supports_folding(optimizer: torch.optim.Optimizer) -> bool:
    """Fused torch optimizers read ``grad_scale``/``found_inf`` attributes in their step."""
    return bool(optimizer.defaults.get("fused")) and getattr(
        optimizer, "_step_supports_amp_scaling", False
    )
