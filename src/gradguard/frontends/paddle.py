"""PaddlePaddle front-end: a ``grad_clip`` object that guards and records Paddle training.

:class:`GuardClip` is accepted wherever Paddle takes ``grad_clip=``
(``paddle.optimizer.AdamW(..., grad_clip=GuardClip(gg.ClipNorm(1.0)))``). It measures
the gradients with Paddle ops, applies the policy, and records every step to the same
run store a PyTorch run writes.

The three fixed policies are applied exactly as Paddle's own clips are:
``ClipNorm(c)`` as ``paddle.nn.ClipGradByGlobalNorm(c)`` (coefficient
``c / max(‖g‖, c)``; torch's adds ``1e-6`` to the norm), ``ClipTensorNorm(c)`` as
``ClipGradByNorm(c)`` and ``ClipValue(v)`` as ``ClipGradByValue(v)``. Every other policy
(ZClip, AutoClip, AGC, SkipNonFinite, chains, ...) runs the very update the torch
``Guard`` runs (:mod:`gradguard.ops` on torch tensors) on zero-copy DLPack views of
Paddle's norms and gradients; its scales are applied with Paddle ops. A skip returns no
gradients to the optimizer, so parameters and moments stay as they were; it is the only
host read per step, as with a PyTorch ``Guard``, and is recorded with the same skip event
(reason, non-finite names, origin).
Parameters with ``need_clip=False`` are measured but neither clipped nor skipped over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import paddle
import torch

from .. import _warn
from ..ops import TORCH
from ..policies import ClipNorm, ClipTensorNorm, ClipValue, Policy, StepInputs, default_policy
from ..record import Recorder, RunStore
from ..schema import Sink, SkipReason, skip_event
from ..stats import GradStats


def _to_torch(t: paddle.Tensor) -> torch.Tensor:
    return torch.from_dlpack(t.detach())  # detach shares the memory


def _to_paddle(t: torch.Tensor) -> paddle.Tensor:
    return paddle.from_dlpack(t.contiguous())


def _squared_norm(g: paddle.Tensor) -> paddle.Tensor:
    """Sum of squares of ``g`` as Paddle's global-norm clip computes it (fp32 for half)."""
    if g.dtype in (paddle.float16, paddle.bfloat16):
        g = g.astype("float32")
    return paddle._C_ops.squared_l2_norm(g).reshape([1])


class GuardClip(paddle.nn.clip.ClipGradBase):
    """A Paddle ``grad_clip`` that applies a gradguard policy and records each step.

    Args:
        policy: a gradguard policy; default :func:`gradguard.default_policy`.
        model: the ``paddle.nn.Layer`` being trained, for structured parameter names
            (``"0.weight"``); without it Paddle's own names (``"linear_0.w_0"``) are used.
        store: record to this run directory or ``.db`` file; ``None`` records nothing
            unless ``sinks`` or ``recorder`` are given.
        log_every: steps per flush to the store and sinks.
        sinks: further sinks (TensorBoard, W&B, MLflow, console).
        recorder: a ready :class:`~gradguard.record.Recorder`.
        health: run the health rules at each flush (``True``, a ``HealthConfig``, or ``False``).

    Dynamic-graph mode only (the mode ``optimizer.step()`` runs in).
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        model: paddle.nn.Layer | None = None,
        store: RunStore | str | os.PathLike[str] | None = None,
        log_every: int = 50,
        sinks: Sequence[Sink] = (),
        recorder: Recorder | None = None,
        health: Any = True,
    ) -> None:
        super().__init__()
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a gradguard Policy, got {type(policy).__name__}")
        self.policy = policy if policy is not None else default_policy()
        self._names = {p.name: n for n, p in model.named_parameters()} if model is not None else {}
        self.host = None
        if recorder is not None or store is not None or sinks:
            from ._host import HostRecorder

            self.host = HostRecorder(
                store if store is not None else False,
                sinks=sinks,
                log_every=log_every,
                health=health,
                config={"framework": "paddle", "policy": repr(self.policy)},
                recorder=recorder,
            )
        self.step = 0
        self._started = False

    def __str__(self) -> str:
        return f"gradguard GuardClip({self.policy!r})"

    @paddle.no_grad()
    def _dygraph_clip(self, params_grads):
        pairs = [(p, g) for p, g in params_grads if g is not None]
        if not pairs:
            return params_grads
        self.step += 1
        fixed = [(p, g) for p, g in pairs if getattr(p, "need_clip", True) is not False]
        if not fixed:
            return pairs
        grads = [g for _, g in fixed]
        sq = [_squared_norm(g) for g in grads]
        total = paddle.sqrt(paddle.stack(sq).sum())
        norms = paddle.sqrt(paddle.concat(sq))
        policy = self.policy
        skip = reason = None
        if isinstance(policy, ClipNorm) and policy.norm_type == 2.0:
            limit = paddle.full([1], policy.max_norm, dtype="float32")
            coef = paddle.divide(limit, paddle.maximum(total, limit))
            new = [self._mul(g, coef) for g in grads]
            threshold = limit
            after = total * coef
        elif isinstance(policy, ClipTensorNorm):
            new = [paddle.nn.clip.clip_by_norm(g, policy.max_norm) for g in grads]
            limit = paddle.full([1], policy.max_norm, dtype="float32")
            after = paddle.sqrt(paddle.sum(paddle.square(paddle.minimum(norms, limit))))
            threshold = limit
            coef = None
        elif isinstance(policy, ClipValue):
            v = policy.clip_value
            new = [paddle.clip(g, min=-v, max=v) for g in grads]
            after = paddle.sqrt(paddle.concat([_squared_norm(g) for g in new]).sum())
            threshold = paddle.full([1], float("inf"), dtype="float32")
            coef = None
        else:
            new, coef, after, threshold, skip, reason = self._generic(fixed, grads, norms, total)
        if coef is None:
            coef = paddle.where(total > 0, after / paddle.where(total > 0, total, 1.0), 1.0)
        skipped = skip is not None and bool(_to_torch(skip))  # the one host read of a skip
        self._record(fixed, norms, total, after, coef, threshold, skipped, reason)
        if skipped:
            return []
        by_param = {id(p): g for (p, _), g in zip(fixed, new)}
        return [(p, by_param.get(id(p), g)) for p, g in pairs]

    @staticmethod
    def _mul(g: paddle.Tensor, coef: paddle.Tensor) -> paddle.Tensor:
        c = coef.astype(g.dtype) if coef.dtype != g.dtype else coef
        if g.ndim > 0:
            g.multiply_(c)
            return g
        return paddle.multiply(g, c)

    def _generic(self, fixed, grads, norms, total):
        """Any policy: decide on DLPack views, apply the scales with Paddle ops."""
        t_norms, t_total = _to_torch(norms), _to_torch(total).reshape(())
        t_grads = [_to_torch(g) for g in grads]
        t_params = [_to_torch(p) for p, _ in fixed]
        for tp, tg in zip(t_params, t_grads):
            tp.grad = tg  # transforms (AGC) read grads through their parameters
        stats = GradStats(
            t_norms, t_total, 2.0, self._labels(fixed), tuple(t.shape for t in t_grads)
        )
        inputs = StepInputs.from_stats(stats, t_params, xp=TORCH, step=self.step - 1)
        decision = self.policy.decide(inputs, t_params)
        for transform in decision.transforms:  # in place on the shared memory
            transform(t_params, t_grads)
        if decision.tensor_scale is not None:
            scales = _to_paddle(decision.tensor_scale.float())
            grads = [self._mul(g, scales[i]) for i, g in enumerate(grads)]
        if decision.scale is not None:
            scale = _to_paddle(decision.scale.float().reshape(1))
            grads = [self._mul(g, scale) for g in grads]
        after = paddle.sqrt(paddle.concat([_squared_norm(g) for g in grads]).sum())
        coef = _to_paddle(decision.scale.float().reshape(1)) if decision.scale is not None else None
        inf = torch.full((), float("inf"), device=t_total.device)
        threshold = _to_paddle(decision.threshold if decision.threshold is not None else inf)
        skip = _to_paddle(decision.skip) if decision.skip is not None else None
        reason = decision.reason
        if decision.transforms or decision.tensor_scale is not None:
            coef = None  # measured from the clipped gradients instead
        return grads, coef, after, threshold, skip, reason

    def _labels(self, fixed) -> tuple[str, ...]:
        return tuple(self._names.get(p.name, p.name) for p, _ in fixed)

    def _record(self, fixed, norms, total, after, coef, threshold, skipped, reason) -> None:
        host = self.host
        if host is None:
            return
        try:
            if not self._started:
                host.start(self._labels(fixed), [tuple(g.shape) for _, g in fixed])
                self._started = True
            recorder = host.recorder
            stats = None
            if recorder.wants_tensor_norms(self.step):
                t = _to_torch(norms).clone()
                stats = GradStats(t, _to_torch(total).reshape(()).clone(), 2.0, None, ())
            code = int(SkipReason.NONE)
            if skipped:
                code = int(_to_torch(reason)) if reason is not None else int(SkipReason.POLICY)
            recorder.record(
                self.step,
                total_norm=_to_torch(total).reshape(()),
                clipped_norm=_to_torch(after).reshape(()),
                clip_coef=_to_torch(coef).reshape(()),
                threshold=_to_torch(threshold).reshape(()).float(),
                skipped=skipped,
                reason=code,
                stats=stats,
            )
            if skipped:
                label = SkipReason(code).label
                names = []
                if label == "nonfinite":
                    flags = (~torch.isfinite(_to_torch(norms))).tolist()
                    names = [n for n, bad in zip(self._labels(fixed), flags) if bad]
                # Registration order, reversed, is the usual backward order (as the Guard).
                host.event(skip_event(self.step, label, names, names[-1] if names else None))
        except Exception as e:  # a recording fault never stops training
            _warn.warn(f"gradguard: recording failed: {e!r}")
            self.host = None

    def close(self) -> None:
        """Flush and close the recorder, if any."""
        if self.host is not None:
            self.host.close()


__all__ = ["GuardClip"]
