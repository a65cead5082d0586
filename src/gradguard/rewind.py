"""Rewind: roll a diverged run back to its last good state, tighten, and go on.

``Rewind(model, optimizer, every=100, keep=2)`` copies the training state every
``every`` optimizer steps: parameters and buffers, the optimizer's state and
hyper-parameters, and, when given, an LR scheduler's, a ``GradScaler``'s and the
guard's policy state. Call :meth:`Rewind.step` with the step's loss once per optimizer
step (after ``scheduler.step()``). When the run diverges — a non-finite loss or
parameters (buffers are not checked: an attention mask may hold ``-inf``), or a loss
*relapse*: the median loss of the last ``window`` steps undoes at least ``relapse`` of
the progress made between the run's first window and the window before the snapshot,
and either it is above ``rise`` times that window's median and its largest loss, or one
of the guard's policies detected a divergence (the ``divergences`` counter of
:class:`~gradguard.policies.feedback.FeedbackClip`) — it restores the newest snapshot
(an older one when the run diverged again before a new snapshot was taken), lets every
policy of the guard that can tighten do so (a ``rewound(previous_state)`` method),
records a ``rewind`` event and returns it. The batches seen since the snapshot are not
replayed: the loop goes on with the next ones, so the offending batches are skipped. A
restore is exact, except for a snapshot restored a second time (the run diverged again
from it): the optimizer's first moments (SGD's momentum, Adam's ``exp_avg``) are then
zeroed, so the run does not follow the same path over the same edge.

The loss check reads one flag from the device every ``check_every`` steps (and at each
snapshot); a snapshot is one copy of the state into buffers allocated once, on the
device or in (pinned) host memory. Under ``torch.distributed`` every rank takes the
same decision (the flags are all-reduced), so ranks stay in step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _validate as check
from . import _warn
from .schema import Event, rewind_event

_STORAGE = ("device", "host")


@dataclass
class _Snapshot:
    """One saved training state: tensors copied into ``buffers``, the rest deep-copied."""

    buffers: list[Tensor]
    layout: tuple
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    reference: tuple[Tensor, Tensor] | None = None  # (median, max) of the losses before it
    used: bool = False  # restored since it was taken


class Rewind:
    """Keep the last good training states and restore one when the run diverges.

    Args:
        model: the ``nn.Module`` trained (parameters and buffers are saved), or its
            parameters.
        optimizer: the optimizer (state and param-group hyper-parameters are saved).
        scheduler: an LR scheduler whose state is saved and restored with the rest.
        scaler: a ``torch.amp.GradScaler`` whose state is saved and restored.
        guard: a :class:`~gradguard.Guard`: its policy state is saved and restored, the
            policies that can tighten are tightened, steps are numbered like the
            guard's, and rewinds are recorded by its recorder.
        every: optimizer steps between snapshots.
        keep: snapshots kept (the newest ``keep``).
        storage: ``"device"`` (a copy beside the tensors) or ``"host"`` (CPU memory,
            pinned when the tensors are on CUDA).
        window: losses over which the median is taken.
        rise: the median must exceed this multiple of the reference median (and the
            largest reference loss) for a divergence the rewinder finds on its own.
        relapse: share of the progress made since the run's first window (from the
            first window's median down to the reference median) that the median must
            undo for any loss divergence, the rewinder's or a policy's: a noisy late
            phase or a few bad batches move the median less than that.
        check_every: steps between loss checks (each reads one flag from the device).
        patience: rewinds in a row, with no snapshot taken in between, before giving up
            (with a warning) until the run is healthy again.
    """

    def __init__(
        self,
        model: torch.nn.Module | Any,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any = None,
        scaler: torch.amp.GradScaler | None = None,
        guard: Any = None,
        every: int = 100,
        keep: int = 2,
        storage: str = "device",
        window: int = 20,
        rise: float = 2.0,
        relapse: float = 0.2,
        check_every: int = 10,
        patience: int = 8,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch Optimizer, got {type(optimizer).__name__}")
        if storage not in _STORAGE:
            raise ValueError(f"storage must be one of {_STORAGE}, got {storage!r}")
        self.every = check.positive_int("every", every)
        self.keep = check.positive_int("keep", keep)
        self.window = check.positive_int("window", window)
        self.rise = check.positive("rise", rise)
        if self.rise < 1.0:
            raise ValueError(f"rise must be >= 1, got {self.rise}")
        self.relapse = check.non_negative("relapse", relapse)
        self.check_every = check.positive_int("check_every", check_every)
        self.patience = check.positive_int("patience", patience)
        self.storage = storage
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.guard = guard
        if isinstance(model, torch.nn.Module):
            self._tensors = [*model.parameters(), *model.buffers()]
            # only parameters are checked for NaN/inf: a buffer may hold -inf on purpose
            # (an attention mask), and a non-finite running statistic shows in the loss
            self._checked = [p for p in model.parameters() if p.is_floating_point()]
        else:
            self._tensors = list(model)
            self._checked = [t for t in self._tensors if t.is_floating_point()]
        if not self._tensors:
            raise ValueError("model: there are no parameters to save")
        self.events: list[Event] = []
        self._offset = int(guard.state_dict()["step"]) if guard is not None else 0
        self._count = 0
        self._snapshots: list[_Snapshot] = []
        self._device = self._tensors[0].device
        self._losses = torch.full((self.window,), math.nan, device=self._device)
        self._seen = 0
        self._first: Tensor | None = None  # median of the run's first full window
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self._device)
        self._in_a_row = 0
        self._gave_up = False
        self._divergences_seen = self._divergences()
        self._take_snapshot(reference=None)

    # -- public -------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Optimizer steps seen, in the guard's numbering when a guard was given."""
        return self._offset + self._count

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by one snapshot's tensors (every snapshot holds the same)."""
        return sum(b.numel() * b.element_size() for b in self._snapshots[0].buffers)

    def step(self, loss: Tensor | float) -> Event | None:
        """Account one optimizer step's loss; snapshot or rewind when due.

        Returns the rewind's event when the state was just restored (the caller then
        simply goes on with the next batch), else ``None``.
        """
        value = torch.as_tensor(loss).detach().to(self._device, torch.float32).reshape(())
        self._count += 1
        self._losses[self._seen % self.window] = value
        self._seen += 1
        self._nonfinite = self._nonfinite | ~torch.isfinite(value)
        newest = self._snapshots[-1]
        full = self._seen >= self.window
        if full and self._first is None:
            self._first = self._window_reference()[0]
        if newest.reference is None and full:  # the first window after a reference-less snapshot
            newest.reference = self._window_reference()
        due = self._count % self.every == 0
        if not due and self._count % self.check_every:
            return None
        flags = self._flags(newest.reference, full, weights=due)
        nonfinite, diverged = bool(flags[0]), bool(flags[1])
        if nonfinite or diverged:
            return self._rewind("nonfinite" if nonfinite else "loss")
        if due:
            self._take_snapshot(reference=self._window_reference() if full else None)
        return None

    # -- detection ----------------------------------------------------------------------

    def _recent(self) -> Tensor:
        return self._losses[: min(self._seen, self.window)]

    def _window_reference(self) -> tuple[Tensor, Tensor]:
        recent = self._recent()
        return recent.nanmedian(), recent.nan_to_num(nan=-math.inf).max()

    def _flags(self, reference: tuple[Tensor, Tensor] | None, full: bool, weights: bool) -> Tensor:
        """``[non-finite, loss diverged]`` as one tensor, reduced over ranks: one sync.

        With a reference (the window before the snapshot), a loss divergence is a
        relapse of the median of the losses since the snapshot or the last rewind (at
        least ``check_every`` of them, at most ``window``), confirmed by the
        rewinder's own test (a full window ``rise`` × above the reference median and
        above its largest loss) or by a policy's divergence. Before any reference exists
        (the run's first window) a policy's divergence is taken on its word.
        """
        policy = self._divergences() > self._divergences_seen
        diverged = torch.zeros((), dtype=torch.bool, device=self._device)
        if reference is None:
            diverged = policy
        elif not self._gave_up and self._seen >= min(self.window, self.check_every):
            median = self._window_reference()[0]
            ref_median, ref_max = reference
            first = self._first if self._first is not None else ref_median
            progress = (first - ref_median).clamp(min=0.0)
            relapsed = median > ref_median + self.relapse * progress
            limit = ref_median + (self.rise - 1.0) * ref_median.abs()
            own = full & (median > limit) & (median > ref_max)
            diverged = relapsed & (own | policy)
        nonfinite = self._nonfinite
        if weights:
            finite = [torch.isfinite(t.detach()).all().to(self._device) for t in self._params()]
            nonfinite = nonfinite | ~torch.stack(finite).all()
        flags = torch.stack([nonfinite.float(), diverged.float()])
        if _multi_rank():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags.cpu()

    def _divergences(self) -> Tensor:
        """Loss divergences the guard's policies detected so far (their ``divergences``)."""
        total = torch.zeros((), device=self._device)
        for policy in _tightenable(self.guard):
            count = getattr(policy, "divergences", None)
            if isinstance(count, Tensor):
                total = total + count.to(self._device)
        return total

    def _params(self) -> list[Tensor]:
        return self._checked

    # -- rewinding ----------------------------------------------------------------------

    def _rewind(self, reason: str) -> Event | None:
        if self._in_a_row >= self.patience:
            if not self._gave_up:
                self._gave_up = True
                _warn.warn(
                    f"Rewind gave up after {self._in_a_row} rewinds in a row without a healthy "
                    "snapshot: the run keeps diverging. Lower the learning rate, or look at the "
                    "data and the loss."
                )
            self._nonfinite = torch.zeros_like(self._nonfinite)
            self._divergences_seen = self._divergences()
            return None
        newest = self._snapshots[-1]
        if newest.used and len(self._snapshots) > 1:
            self._snapshots.pop()  # diverged again from it: go further back
        snapshot = self._snapshots[-1]
        median = self._window_reference()[0]
        policies = list(_tightenable(self.guard))
        before = [p.state_dict() for p in policies]
        self._restore(snapshot)
        again = snapshot.used  # the run diverged again from this very snapshot
        if again:
            _drop_momentum(self.optimizer)
        for policy, state in zip(policies, before):
            policy.rewound(state)
        snapshot.used = True
        self._in_a_row += 1
        self._losses.fill_(math.nan)
        self._seen = 0
        self._nonfinite = torch.zeros_like(self._nonfinite)
        self._divergences_seen = self._divergences()
        ref = snapshot.reference
        event = rewind_event(
            self.step_count,
            snapshot.step,
            reason,
            loss=_finite_or_none(median),
            reference=_finite_or_none(ref[0]) if ref is not None else None,
            momentum_dropped=again,
        )
        self.events.append(event)
        recorder = getattr(self.guard, "recorder", None)
        if recorder is not None:
            recorder.event(event)
        _warn.warn(event.message)
        return event

    # -- snapshots ----------------------------------------------------------------------

    def _sources(self) -> tuple[list[Tensor], tuple, dict[str, Any]]:
        """Tensors to copy, their layout (to notice a change), and everything else."""
        tensors = [t.detach() for t in self._tensors]
        layout: list[tuple] = [("model", i) for i in range(len(tensors))]
        python_state: list[tuple] = []
        for index, param in enumerate(_optimizer_params(self.optimizer)):
            state = self.optimizer.state.get(param, {})
            for key in sorted(state, key=str):
                value = state[key]
                if isinstance(value, Tensor):
                    tensors.append(value.detach())
                    layout.append(("optim", index, key))
                else:
                    python_state.append((index, key, copy.deepcopy(value)))
        layout_key = tuple(
            (*where, tuple(t.shape), t.dtype, t.device) for where, t in zip(layout, tensors)
        )
        extras: dict[str, Any] = {
            "groups": [
                {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                for g in self.optimizer.param_groups
            ],
            "python_state": python_state,
        }
        if self.scheduler is not None:
            extras["scheduler"] = copy.deepcopy(self.scheduler.state_dict())
        if self.scaler is not None:
            extras["scaler"] = copy.deepcopy(self.scaler.state_dict())
        if self.guard is not None:
            extras["policy"] = copy.deepcopy(self.guard.policy.state_dict())
        return tensors, layout_key, extras

    def _take_snapshot(self, reference: tuple[Tensor, Tensor] | None) -> None:
        tensors, layout, extras = self._sources()
        reuse = self._snapshots.pop(0) if len(self._snapshots) >= self.keep else None
        if reuse is None or reuse.layout != layout:
            buffers = [self._buffer_like(t) for t in tensors]
        else:
            buffers = reuse.buffers
        _copy(buffers, tensors)
        snapshot = _Snapshot(buffers, layout, self.step_count, extras, reference)
        self._snapshots.append(snapshot)
        self._divergences_seen = self._divergences()
        self._in_a_row = 0
        self._gave_up = False

    def _buffer_like(self, tensor: Tensor) -> Tensor:
        if self.storage == "device" or tensor.device.type == "cpu":
            return torch.empty_like(tensor, memory_format=torch.preserve_format)
        pin = tensor.device.type == "cuda"
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)

    def _restore(self, snapshot: _Snapshot) -> None:
        params = _optimizer_params(self.optimizer)
        model_count = len(self._tensors)
        _copy([t.detach() for t in self._tensors], snapshot.buffers[:model_count])
        # optimizer state: exactly the snapshot's keys, values copied back
        saved: dict[int, dict[Any, Any]] = {}
        for where, buffer in zip(snapshot.layout[model_count:], snapshot.buffers[model_count:]):
            _, index, key, shape, dtype, device = where
            saved.setdefault(index, {})[key] = (buffer, shape, dtype, device)
        for index, key, value in snapshot.extras["python_state"]:
            saved.setdefault(index, {})[key] = copy.deepcopy(value)
        for index, param in enumerate(params):
            current = self.optimizer.state.get(param, {})
            restored: dict[Any, Any] = {}
            for key, value in saved.get(index, {}).items():
                if not isinstance(value, tuple):
                    restored[key] = value
                    continue
                buffer, shape, dtype, device = value
                target = current.get(key)
                if not (
                    isinstance(target, Tensor)
                    and target.shape == shape
                    and target.dtype == dtype
                    and target.device == device
                ):
                    target = torch.empty(shape, dtype=dtype, device=device)
                target.copy_(buffer)
                restored[key] = target
            if restored:
                self.optimizer.state[param] = restored
            else:
                self.optimizer.state.pop(param, None)
        for group, values in zip(self.optimizer.param_groups, snapshot.extras["groups"]):
            group.update(copy.deepcopy(values))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(snapshot.extras["scheduler"]))
        if self.scaler is not None:
            self.scaler.load_state_dict(copy.deepcopy(snapshot.extras["scaler"]))
        if self.guard is not None:
            self.guard.policy.load_state_dict(copy.deepcopy(snapshot.extras["policy"]))
            self.guard.weights_changed()


#: Optimizer state holding a running mean of past gradients (SGD's momentum, Adam's first
#: moment): what carries a restored run along the path it diverged on.
_FIRST_MOMENTS = ("momentum_buffer", "exp_avg")


def _drop_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero the first-moment buffers, for a snapshot restored a second time: restored as
    saved, its momentum took the run over the same edge again."""
    buffers = [
        value
        for state in optimizer.state.values()
        for key, value in state.items()
        if key in _FIRST_MOMENTS and isinstance(value, Tensor)
    ]
    if buffers:
        torch._foreach_zero_(buffers)


def _multi_rank() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _copy(targets: list[Tensor], sources: list[Tensor]) -> None:
    """Copy ``sources`` into ``targets`` pairwise (one foreach call per device pair)."""
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for target, source in zip(targets, sources):
        key = (target.device, source.device, target.dtype == source.dtype)
        bucket = groups.setdefault(key, ([], []))
        bucket[0].append(target)
        bucket[1].append(source)
    for (target_device, source_device, _), (dst, src) in groups.items():
        non_blocking = target_device.type != source_device.type
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)


def _tightenable(guard: Any) -> Iterator[Any]:
    """The policies of ``guard`` (through chains) that can tighten after a rewind."""
    if guard is None:
        return
    stack = [guard.policy]
    while stack:
        policy = stack.pop(0)
        if callable(getattr(policy, "rewound", None)):
            yield policy
        stack.extend(getattr(policy, "policies", ()))


def _finite_or_none(value: Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
