"""Train one corpus run through ``gradguard.Guard`` with a run store, as a user would.

The loop sets the learning rate each step from the schedule (and any fault's factor), so
the recorded ``lr`` column is what the optimizer used; AMP runs autocast on the CPU
(bf16, or fp16 with a GradScaler); accumulation calls ``guard.step`` once per optimizer
step. Warnings gradguard emits are counted.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import gradguard as gg

from . import data
from .faults import Fault, Label
from .tasks import TASKS


@dataclass(frozen=True)
class RunSpec:
    """One labelled run of the corpus."""

    name: str
    task: str
    task_args: dict[str, Any] = field(default_factory=dict)
    steps: int = 300
    batch: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    schedule: str = "constant"  # constant | warmup | cosine | warmup_cosine
    policy: str = "default"  # default | monitor | feedback | zclip | clip:<max_norm>
    amp: str = "none"  # none | bf16 | fp16
    accumulate: int = 1
    log_every: int = 20
    seed: int = 0
    faults: tuple[Fault, ...] = ()
    growth_interval: int = 2000  # GradScaler (fp16 only)
    rewind: bool = False  # train with gradguard.Rewind at its defaults

    @property
    def fault_class(self) -> str:
        """The run's stratum: its first fault's class, or ``healthy``."""
        return self.faults[0].name if self.faults else "healthy"

    def labels(self) -> list[Label]:
        return [f.label(self.steps) for f in self.faults]


@dataclass
class RunResult:
    name: str
    store: Path
    seconds: float
    warnings: list[str]


def schedule(spec: RunSpec, step: int) -> float:
    """The learning-rate multiplier at ``step``."""
    warm = max(1, spec.steps // 10)
    progress = step / max(1, spec.steps - 1)
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "warmup":
        return min(1.0, (step + 1) / warm)
    if spec.schedule == "cosine":
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
    if spec.schedule == "warmup_cosine":
        return min(1.0, (step + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    raise ValueError(
        f"schedule must be constant, warmup, cosine or warmup_cosine, got {spec.schedule!r}"
    )


def make_optimizer(spec: RunSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name = spec.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, spec.lr, weight_decay=0.01)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, spec.lr, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, spec.lr)
    if name == "sgd":
        return torch.optim.SGD(params, spec.lr, momentum=0.9)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, spec.lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, spec.lr)
    raise ValueError(f"unknown optimizer {name!r}")


def make_policy(spec: RunSpec) -> gg.Policy | None:
    if spec.policy == "default":
        return None
    if spec.policy == "monitor":
        return gg.Monitor()
    if spec.policy == "feedback":
        return gg.chain(gg.SkipNonFinite(), gg.FeedbackClip())
    if spec.policy == "zclip":  # the default policy until FeedbackClip replaced it
        return gg.chain(gg.SkipNonFinite(), gg.ZClip(warmup_max_norm=10.0))
    if spec.policy.startswith("clip:"):
        return gg.ClipNorm(float(spec.policy.split(":", 1)[1]))
    if spec.policy.startswith("fb:"):  # FeedbackClip with other settings (the research rows)
        from benchmarks.efficacy.candidates import parse

        return parse(spec.policy)()
    raise ValueError(
        "policy must be default, monitor, feedback, zclip, clip:<max_norm> or fb:<knobs>, "
        f"got {spec.policy!r}"
    )


def train(spec: RunSpec, run_dir: Path) -> RunResult:
    """Train ``spec`` recording to ``run_dir`` (which must not hold a run yet)."""
    torch.manual_seed(spec.seed)
    task = TASKS[spec.task](**spec.task_args)
    model = task.model
    for fault in spec.faults:
        fault.setup(model)
    optimizer = make_optimizer(spec, model)
    scaler = (
        torch.amp.GradScaler("cpu", growth_interval=spec.growth_interval)
        if spec.amp == "fp16"
        else None
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.amp)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = gg.Guard(model, make_policy(spec), store=run_dir, log_every=spec.log_every)
        rewinder = gg.Rewind(model, optimizer, scaler=scaler, guard=guard) if spec.rewind else None
        try:
            for step in range(spec.steps):
                factor = schedule(spec, step)
                for fault in spec.faults:
                    factor *= fault.lr_factor(step)
                    fault.before_step(step, model)
                for group in optimizer.param_groups:
                    group["lr"] = spec.lr * factor
                loss = _backward(spec, task, model, step, dtype, scaler)
                guard.step(optimizer, scaler, loss=loss)
                if scaler is not None:
                    scaler.update()
                if rewinder is not None:
                    rewinder.step(loss)
                optimizer.zero_grad(set_to_none=True)
        finally:
            guard.close()
    seconds = time.perf_counter() - start
    found = [str(w.message) for w in caught if str(w.message).startswith("gradguard")]
    return RunResult(spec.name, run_dir, seconds, found)


def _backward(spec, task, model, step, dtype, scaler) -> torch.Tensor:
    total = torch.zeros(())
    for micro in range(spec.accumulate):
        x, y = task.batch(data.generator(spec.seed, step, micro), spec.batch)
        for fault in spec.faults:
            x, y = fault.batch(step, x, y)
        autocast = (
            torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            output = model(x)
        loss = task.loss(output, y) / spec.accumulate
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach()
    return total
