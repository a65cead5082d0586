"""``gradguard diagnose``: probe a model's gradients before training it.

The user names a factory ``MODULE:FUNCTION`` (``MODULE`` may also be a ``.py`` path)
that takes no arguments and returns ``(model, data, loss_fn)``:

- ``model``: a ``torch.nn.Module``, called as ``model(*inputs)``;
- ``data``: one batch ``(inputs..., target)``, or an iterable of such batches (a
  ``DataLoader``), or a function returning one. Each pass takes a fresh batch: the next
  one from the iterable, a new call of the function, or, for a single batch, the batch
  of a new call of the factory (so a factory that draws its batch at random varies it);
- ``loss_fn``: ``loss_fn(model_output, target) -> scalar loss``.

The probe runs ``steps`` forward/backward passes without optimizer steps (the weights
never change), measures the gradients with :func:`gradguard.measure`, runs the health
rules over them and recommends a starting clip threshold from the healthy passes.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .health import (
    RULES,
    Finding,
    HealthConfig,
    HealthMonitor,
    Severity,
    get_family,
    infer_family,
    recommend_threshold,
)
from .schema import HostBatch

#: The rules that judge gradients at one point of training; those that read the run's
#: course (the loss trend, learning-rate changes, clipping, AMP, the run-lost verdict)
#: have nothing to read in a probe that takes no optimizer step.
PROBE_RULES = tuple(
    rule
    for rule in RULES
    if rule.kind
    in (
        "nonfinite",
        "exploding",
        "spike",
        "vanishing",
        "dead_layer",
        "vanishing_layer",
        "layer_ratio",
        "layer_dispersion",
    )
)


class ProbeError(RuntimeError):
    """The factory cannot be loaded or used, or it raised (a usage error: exit 2)."""


@dataclass
class Probe:
    """What a probe found."""

    family: str
    names: tuple[str, ...]
    total_norms: list[float]
    losses: list[float] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    no_grad: tuple[str, ...] = ()
    forward_origin: str | None = None
    threshold: float = math.nan  #: NaN when no healthy pass allows one
    threshold_reason: str = ""
    distinct_batches: int = 0

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


def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run user code; any exception becomes a one-line ProbeError naming ``what``."""
    try:
        return fn(*args)
    except ProbeError:
        raise
    except Exception as e:
        if what == "running the model":
            raise ProbeError(
                f"running the model failed with {type(e).__name__}: {e} (check that the "
                "factory's model(*inputs) and loss_fn(output, target) run on their own)"
            ) from e
        raise ProbeError(f"{what} raised {type(e).__name__}: {e}") from e


def _unpack(made: object) -> tuple[Any, Any, Callable]:
    from torch import nn

    if not (isinstance(made, tuple) and len(made) == 3):
        raise ProbeError(
            f"the factory must return (model, data, loss_fn), got {type(made).__name__}"
        )
    model, data, loss_fn = made
    if not isinstance(model, nn.Module):
        raise ProbeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise ProbeError("loss_fn must be callable as loss_fn(model_output, target)")
    return model, data, loss_fn


def _is_batch(data: object) -> bool:
    from torch import Tensor

    return isinstance(data, (tuple, list)) and len(data) >= 2 and isinstance(data[-1], Tensor)


def _checked(batch: object) -> tuple:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise ProbeError(
            "a batch must be a tuple (inputs..., target) with at least 2 items, "
            f"got {type(batch).__name__}"
        )
    return tuple(batch)


def _batches(factory: Callable[[], Any], data: object) -> Iterator[tuple]:
    """A fresh batch per pass (see the module docstring)."""
    if _is_batch(data):
        yield _checked(data)
        while True:
            _, again, _ = _unpack(_call("the factory", factory))
            yield _checked(again)
    elif callable(data):
        while True:
            yield _checked(_call("the batch function", data))
    else:
        try:
            iterator = iter(data)  # type: ignore[call-overload]
        except TypeError:
            raise ProbeError(
                "data must be a batch (inputs..., target), an iterable of batches or a "
                f"function returning one, got {type(data).__name__}"
            ) from None
        first = True
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                if first:
                    raise ProbeError("the data iterable is empty") from None
                iterator = iter(data)  # type: ignore[call-overload]
                continue
            except Exception as e:
                raise ProbeError(f"the data iterator raised {type(e).__name__}: {e}") from e
            first = False
            yield _checked(batch)


def probe(factory: Callable[[], Any], steps: int = 5) -> Probe:
    """Run ``steps`` forward/backward passes on fresh batches and diagnose the gradients."""
    from .health import BackwardOrder, find_nonfinite_forward
    from .stats import measure

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ProbeError(f"steps must be an int >= 1, got {steps!r}")
    model, data, loss_fn = _unpack(_call("the factory", factory))
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ProbeError("the model has no parameters that require grad")
    names = tuple(n for n, _ in trainable)
    family = infer_family(model)
    order = BackwardOrder(model)
    totals: list[float] = []
    losses: list[float] = []
    rows: list[list[float]] = []
    missing: set[str] = set()
    seen: set[int] = set()
    bad_batch: tuple | None = None
    batches = _batches(factory, data)
    for _ in range(steps):
        batch = next(batches)
        seen.add(hash(tuple(_fingerprint(t) for t in batch)))
        inputs, target = batch[:-1], batch[-1]
        model.zero_grad(set_to_none=True)
        loss = _call("running the model", _forward, model, loss_fn, inputs, target)
        _call("loss.backward()", loss.backward)
        present = [(n, p) for n, p in trainable if p.grad is not None]
        missing.update(n for n, p in trainable if p.grad is None)
        host = measure(present).to_host() if present else None
        by_name = dict(zip((n for n, _ in present), host.norms)) if host else {}
        rows.append([float(by_name.get(n, 0.0)) for n in names])
        totals.append(float(host.total_norm) if host else 0.0)
        losses.append(float(loss.detach()))
        if bad_batch is None and not math.isfinite(totals[-1]):
            bad_batch = inputs
    order.remove()
    config = HealthConfig(family=family, sustain=1, tensor_sustain=1, jump_sustain=1)
    monitor = HealthMonitor(config, order=order, rules=PROBE_RULES)
    passes = list(range(steps))
    found: dict[str, Finding] = {}
    batch = HostBatch(passes, {"total_norm": totals, "loss": losses}, names, passes, rows)
    for finding in monitor.update(batch):
        found[finding.key or finding.message] = finding
    result = Probe(
        family,
        names,
        totals,
        losses,
        sorted(found.values(), key=lambda f: f.steps[0]),
        tuple(n for n in names if n in missing),
        distinct_batches=len(seen),
    )
    if bad_batch is not None:
        try:
            result.forward_origin = find_nonfinite_forward(model, *bad_batch)
        except Exception:  # the check is a hint; never fail the probe on it
            result.forward_origin = None
    result.threshold, result.threshold_reason = _threshold(family, totals, result.findings)
    return result


def _forward(model: Any, loss_fn: Callable, inputs: tuple, target: Any) -> Any:
    return loss_fn(model(*inputs), target)


def _fingerprint(value: object) -> object:
    from torch import Tensor

    if isinstance(value, Tensor):
        return (tuple(value.shape), float(value.detach().double().sum()))
    return repr(value)


def _threshold(family: str, totals: list[float], findings: list[Finding]) -> tuple[float, str]:
    """A starting clip threshold from the healthy passes, never above the family's band."""
    row = get_family(family)
    high = row.healthy_range[1]
    healthy = [t for t in totals if math.isfinite(t) and 0.0 < t <= row.explode_above]
    unhealthy = [f.kind.value for f in findings if f.kind.value in ("exploding", "nonfinite")]
    if unhealthy or len(healthy) < len(totals) / 2:
        finite = [t for t in totals if math.isfinite(t)]
        median = sorted(finite)[len(finite) // 2] if finite else math.nan
        where = f"median norm {median:.3g}" if finite else "no finite norm"
        return math.nan, (
            f"no healthy window found ({where}; {row.label} models are healthy up to "
            f"{high:g}): fix the non-finite or exploding gradients first, then lower the "
            "learning rate or warm it up, and probe again"
        )
    try:
        advice = recommend_threshold(healthy, min_samples=20)
    except ValueError:
        clip_low, clip_high = row.clip_range
        median = sorted(healthy)[len(healthy) // 2]
        return min(row.clip_start, high), (
            f"the {row.label} family table starts at {clip_low:g}–{clip_high:g}; the probe's "
            f"median norm is {median:.3g} (run --steps 20 or more for a threshold from "
            "measured norms)"
        )
    if advice.threshold > high:
        return high, (
            f"{advice.reason}; capped at the top of the {row.label} healthy band ({high:g}): "
            "norms above it call for a lower learning rate, not a higher threshold"
        )
    return advice.threshold, advice.reason


def report(result: Probe) -> str:
    """The probe as text."""
    t = result.total_norms
    lines = [
        f"model family: {result.family} · {len(result.names)} trainable tensors · "
        f"{len(t)} forward/backward passes on {result.distinct_batches} distinct batches "
        "(no optimizer step)",
        "total grad norm per pass: " + ", ".join(f"{v:.4g}" for v in t),
    ]
    if len(t) > 1 and result.distinct_batches == 1:
        lines.append(
            "every pass saw the same batch: return a DataLoader, an iterable or a function "
            "as data (or draw the batch at random in the factory) to see the norms vary"
        )
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
    if math.isnan(result.threshold):
        lines.append(f"recommended clip threshold: none — {result.threshold_reason}")
    else:
        lines.append(
            f"recommended clip threshold: {result.threshold:.3g} ({result.threshold_reason})"
        )
    return "\n".join(lines)
