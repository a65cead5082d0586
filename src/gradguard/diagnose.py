"""``gradguard diagnose``: probe a model's gradients before training it.

The user names a factory ``MODULE:FUNCTION`` (``MODULE`` may also be a ``.py`` path)
with this signature::

    def make() -> tuple[torch.nn.Module, tuple, Callable]:
        model = ...
        batch = (inputs..., target)      # every item but the last is passed to model(*inputs)
        loss_fn = torch.nn.functional.mse_loss  # loss_fn(model(*inputs), target) -> scalar loss
        return model, batch, loss_fn

The probe runs ``steps`` forward/backward passes without optimizer steps (the weights
never change), measures the gradients with :func:`gradguard.measure`, runs the
health rules over them and recommends a starting clip threshold.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .health import Finding, HealthConfig, Severity, get_family, infer_family, recommend_threshold
from .health import diagnose as run_rules


class ProbeError(RuntimeError):
    """The factory cannot be loaded or returns something unusable (a usage error)."""


@dataclass
class Probe:
    """What a probe found."""

    family: str
    names: tuple[str, ...]
    total_norms: list[float]
    findings: list[Finding] = field(default_factory=list)
    no_grad: tuple[str, ...] = ()
    forward_origin: str | None = None
    threshold: float = math.nan
    threshold_reason: str = ""

    @property
    def exit_code(self) -> int:
        """0 when healthy, 1 when a warning or critical finding was made."""
        bad = any(f.severity.rank >= Severity.WARNING.rank for f in self.findings)
        return 1 if bad else 0


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``MODULE:FUNCTION`` (``MODULE`` dotted or a ``.py`` file path)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ProbeError(f"factory must look like MODULE:FUNCTION, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ProbeError(f"no such file: {module_name!r}")
            loader = importlib.util.spec_from_file_location("_gradguard_factory", module_name)
            assert loader is not None and loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ProbeError:
        raise
    except Exception as e:  # the user's module failed to import: say so, no traceback
        raise ProbeError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ProbeError(f"{module_name!r} has no callable {attr!r}")
    return factory


def _unpack(made: object) -> tuple[Any, tuple, Callable]:
    from torch import nn

    if not (isinstance(made, tuple) and len(made) == 3):
        raise ProbeError("the factory must return (model, batch, loss_fn)")
    model, batch, loss_fn = made
    if not isinstance(model, nn.Module):
        raise ProbeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ProbeError("batch must be a tuple (inputs..., target) with at least 2 items")
    if not callable(loss_fn):
        raise ProbeError("loss_fn must be callable as loss_fn(model_output, target)")
    return model, tuple(batch), loss_fn


def probe(factory: Callable[[], Any], steps: int = 5) -> Probe:
    """Run ``steps`` forward/backward passes and diagnose the gradients."""
    from .health import BackwardOrder, find_nonfinite_forward
    from .stats import measure

    model, batch, loss_fn = _unpack(factory())
    inputs, target = batch[:-1], batch[-1]
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ProbeError("the model has no parameters that require grad")
    names = tuple(n for n, _ in trainable)
    order = BackwardOrder(model)
    totals: list[float] = []
    rows: list[list[float]] = []
    missing: set[str] = set()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(*inputs), target)
        loss.backward()
        present = [(n, p) for n, p in trainable if p.grad is not None]
        missing.update(n for n, p in trainable if p.grad is None)
        host = measure(present).to_host() if present else None
        by_name = dict(zip((n for n, _ in present), host.norms)) if host else {}
        rows.append([float(by_name.get(n, 0.0)) for n in names])
        totals.append(float(host.total_norm) if host else 0.0)
    order.remove()
    family = infer_family(model)
    config = HealthConfig(family=family, sustain=1, tensor_sustain=1)
    step_ids = list(range(steps))
    findings = run_rules(
        {"total_norm": totals}, step_ids, names, step_ids, rows, config, order=order
    )
    result = Probe(family, names, totals, findings, tuple(n for n in names if n in missing))
    if not all(math.isfinite(t) for t in totals):
        try:
            result.forward_origin = find_nonfinite_forward(model, *inputs)
        except Exception:  # the check is a hint; never fail the probe on it
            result.forward_origin = None
    start = get_family(family).clip_start
    finite = [t for t in totals if math.isfinite(t)]
    try:
        advice = recommend_threshold(finite, min_samples=20)
        result.threshold, result.threshold_reason = advice.threshold, advice.reason
    except ValueError:
        low, high = get_family(family).clip_range
        result.threshold = start
        seen = (
            f"the probe's median norm is {sorted(finite)[len(finite) // 2]:.3g}"
            if finite
            else "the probe saw no finite norm"
        )
        result.threshold_reason = (
            f"{family} family table starts at {low:g}–{high:g}; {seen} "
            "(run --steps 20 or more for a threshold from measured norms)"
        )
    return result


def report(result: Probe) -> str:
    """The probe as text."""
    t = result.total_norms
    lines = [
        f"model family: {result.family} · {len(result.names)} trainable tensors · "
        f"{len(t)} forward/backward passes (no optimizer step)",
        "total grad norm per pass: " + ", ".join(f"{v:.4g}" for v in t),
    ]
    if result.no_grad:
        lines.append(
            f"no gradient reached {len(result.no_grad)} tensor(s) (unused in forward?): "
            + ", ".join(result.no_grad[:8])
        )
    if result.forward_origin:
        lines.append(f"forward check: first non-finite output at module {result.forward_origin}")
    if result.findings:
        lines.append(f"findings ({len(result.findings)}):")
        for f in result.findings:
            lines.append(f"  {f}")
            lines += [f"    - {a}" for a in f.advice[:3]]
    else:
        lines.append("findings: none — gradients look healthy")
    lines.append(f"recommended clip threshold: {result.threshold:.3g} ({result.threshold_reason})")
    return "\n".join(lines)
