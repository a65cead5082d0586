"""The one training loop every efficacy task runs: guard, loss and LR feed, rewind, AMP.

A task builds its model, optimizer and (optional) scheduler for a seed and hands the
loop a ``forward(step)`` closure that returns the loss to back-propagate and the
value to record. The loop calls ``guard.step(optimizer, scaler, loss=...)`` like a
user would: the policies see the step's loss, and the learning rate the guard reads
from the optimizer (:class:`gradguard.policies.StepInputs`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg

#: Autocast dtype by name (CPU autocast; "fp16" runs also use a GradScaler).
AUTOCAST = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Setup:
    """What one seed of a task trains: model, optimizer, and how."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # an LR scheduler stepped after every optimizer step
    autocast: torch.dtype | None = None  # CPU autocast dtype (bf16 or fp16)
    scaler: bool = False  # use a GradScaler (fp16)


@dataclass
class Trace:
    """What the loop saw, one entry per optimizer step (host floats)."""

    losses: list[float] = field(default_factory=list)  # recorded loss of each step
    clean: list[bool] = field(default_factory=list)  # step counts in the loss curve
    norms: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    clipped: int = 0
    skipped: int = 0
    steps: int = 0
    diverged: bool = False
    rewinds: list[dict] = field(default_factory=list)  # payloads of rewind events
    seconds: float = 0.0

    @property
    def curve(self) -> list[float]:
        """The loss of every clean step."""
        return [v for v, c in zip(self.losses, self.clean) if c]

    @property
    def clip_rate(self) -> float:
        return self.clipped / max(self.steps, 1)


@dataclass
class Result:
    """What one (task, policy, seed) run did. ``final`` is the task's metric, lower is
    better (held-out loss, test error); NaN when the run diverged."""

    policy: str
    seed: int
    diverged: bool
    final: float
    curve: list[float]  # loss of every clean step
    clipped: float  # fraction of steps whose gradient was scaled down
    skipped: int
    steps: int
    seconds: float
    solved: bool = False  # for tasks with a solve criterion
    floor: float = 0.0  # the metric's best possible value (shown as excess over it)
    rewinds: list[dict] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def excess(self) -> float:
        return self.final - self.floor


def result(trace: Trace, policy: str, seed: int, final: float, **kwargs: Any) -> Result:
    """A :class:`Result` from a finished trace; ``final`` is NaN when it diverged."""
    return Result(
        policy,
        seed,
        trace.diverged,
        math.nan if trace.diverged else final,
        trace.curve,
        trace.clip_rate,
        trace.skipped,
        trace.steps,
        trace.seconds,
        rewinds=trace.rewinds,
        **kwargs,
    )


def run(
    setup: Setup,
    policy: gg.Policy,
    steps: int,
    forward: Callable[[int], tuple[Tensor, Tensor, bool]],
    *,
    check: Callable[[int], bool] | None = None,
    rewind: dict | None = None,
) -> Trace:
    """Train ``steps`` optimizer steps; ``forward(step)`` returns
    ``(loss to back-propagate, loss to record, whether the step is clean)``.

    ``check(step)`` runs after each step (1-based count) and returns True to stop
    (e.g. solved). The run stops at a non-finite recorded loss (``diverged``) unless
    ``rewind`` (keyword arguments of :class:`gradguard.Rewind`) is given, in which case
    the rewinder restores the last good state and the run goes on.
    """
    start = time.perf_counter()
    model, optimizer = setup.model, setup.optimizer
    guard = gg.Guard(model, policy)
    scaler = torch.amp.GradScaler("cpu") if setup.scaler else None
    rewinder = None
    if rewind is not None:
        rewinder = gg.Rewind(
            model, optimizer, scheduler=setup.scheduler, scaler=scaler, guard=guard, **rewind
        )
    trace = Trace()
    clipped = torch.zeros((), dtype=torch.long)
    skipped = torch.zeros((), dtype=torch.long)
    norms, thresholds = [], []
    for step in range(steps):
        cast = (
            torch.autocast("cpu", dtype=setup.autocast)
            if setup.autocast is not None
            else contextlib.nullcontext()
        )
        with cast:
            loss, value, clean = forward(step)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        result = guard.step(optimizer, scaler, loss=loss.detach())
        assert result is not None
        if scaler is not None:
            scaler.update()
        if setup.scheduler is not None:
            setup.scheduler.step()
        clipped += ((result.clip_coef < 0.999) & ~result.skipped).long()
        skipped += result.skipped.long()
        norms.append(result.total_norm)
        thresholds.append(result.threshold)
        v = float(value)
        trace.losses.append(v)
        trace.clean.append(clean)
        trace.steps = step + 1
        if rewinder is not None:
            event = rewinder.step(value)
            if event is not None:
                trace.rewinds.append(dict(event.data))
                continue
        elif not math.isfinite(v):  # non-finite weights show here one step later
            trace.diverged = True
            break
        if check is not None and check(step + 1):
            break
    if rewinder is not None:  # a rewound run ends on restored, finite weights unless lost
        finite = [torch.isfinite(p.detach()).all() for p in model.parameters()]
        trace.diverged = not bool(torch.stack(finite).all())
    trace.norms = torch.stack(norms).tolist() if norms else []
    trace.thresholds = torch.stack(thresholds).tolist() if thresholds else []
    trace.clipped, trace.skipped = int(clipped), int(skipped)
    trace.seconds = time.perf_counter() - start
    return trace
