"""Per-example gradient statistics of a DP run, recorded through a :class:`Recorder`:
private by default.

What a run records about its examples must be as private as the model. By default each
observed step becomes one ``"per_sample"`` event holding only what the DP mechanism has
already released (:class:`gradguard.schema.PerSampleData`)::

    data = {"clip_norm": C, "expected_n": m, "noised_fraction_clipped": 1 - b̄,
            "noised": ["noised_fraction_clipped"], "exact": []}

``b̄`` is the adaptive clip's noisy unclipped fraction, the very draw that moves the
clip norm, so recording it is post-processing and costs no privacy. Exact statistics of
the examples (the realised batch size, private under Poisson sampling; the exact
fraction clipped; quantiles, mean and max of the per-example norms) are not covered by
epsilon: a monitor records them only when built with
``release_exact_statistics_not_private=True``, and lists them in ``data["exact"]``::

    data |= {"n": ..., "fraction_clipped": ..., "quantiles": {"0.5": ...}, "mean": ...,
             "max": ..., "layers": {name: {"0.5": ...}}}     # layers with by_layer=True

A released count given as a host number (as :meth:`AdaptiveQuantileClip.attach` does)
becomes an event at once, so nothing is pending when the recorder closes. Device values
(a count given as a tensor, exact statistics) cost a few device ops and no host sync:
they stay on the device until the recorder flushes, or until ``2 * recorder.log_every``
steps are buffered when it records no steps of its own (one transfer for all of them);
then call :meth:`PerSampleMonitor.flush` before closing the recorder.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _validate as check
from .. import _warn
from ..schema import Event, EventKind, HostBatch, PerSampleData
from .per_sample import DEFAULT_QUANTILES, PerSampleNorms

EVENT_KIND = EventKind.PER_SAMPLE
EXACT_FLAG = "release_exact_statistics_not_private"


@dataclass
class _Row:
    step: int
    n: int
    clip_norm: float | None
    expected: float | None
    noised: float | Tensor | None  # the released noisy unclipped fraction
    names: tuple[str, ...]
    values: Tensor | None  # exact statistics, on the device


class PerSampleMonitor:
    """Summarise each step's per-example norms as events, releasing only private numbers.

    Args:
        recorder: a :class:`~gradguard.record.Recorder` (e.g. ``guard.recorder``); the
            summaries are written at its flushes. ``None`` keeps them in :attr:`history`.
        quantiles: quantiles of the exact per-example norms to record, each in [0, 1]
            (exact statistics: needs ``release_exact_statistics_not_private=True``).
        by_layer: also record each tensor's exact per-example norm quantiles (idem).
        every: observe one step in ``every``.
        release_exact_statistics_not_private: also record exact statistics of the
            examples, which epsilon does NOT cover, to the recorder and every sink it
            feeds; they are listed in each event's ``data["exact"]``. Off by default.
    """

    def __init__(
        self,
        recorder: Any = None,
        *,
        quantiles: Sequence[float] | None = None,
        by_layer: bool = False,
        every: int = 1,
        release_exact_statistics_not_private: bool = False,
    ) -> None:
        exact = _flag(EXACT_FLAG, release_exact_statistics_not_private)
        self.by_layer = _flag("by_layer", by_layer)
        if not exact and (quantiles is not None or self.by_layer):
            name = "quantiles" if quantiles is not None else "by_layer"
            raise ValueError(
                f"{name}: exact per-example norm statistics are not covered by epsilon; "
                f"PerSampleMonitor records them only with {EXACT_FLAG}=True"
            )
        self.release_exact_statistics_not_private = exact
        self.quantiles = _quantiles(DEFAULT_QUANTILES if quantiles is None else quantiles)
        self.every = check.positive_int("every", every)
        if recorder is not None and not (
            callable(getattr(recorder, "event", None))
            and callable(getattr(recorder, "add_listener", None))
        ):
            raise TypeError(
                "recorder must be a gradguard Recorder (e.g. guard.recorder) or None, got "
                f"{type(recorder).__name__}"
            )
        self.recorder = recorder
        self.history: list[Event] = []
        self._rows: list[_Row] = []
        self._lock = threading.Lock()
        self._warned = False
        if recorder is not None:
            recorder.add_listener(self._on_flush)

    def observe(
        self,
        step: int,
        norms: PerSampleNorms,
        clip_norm: float | None = None,
        *,
        noisy_unclipped_fraction: Tensor | float | None = None,
        expected_size: float | None = None,
    ) -> None:
        """Record the summary of one step (no host sync).

        ``noisy_unclipped_fraction`` and ``expected_size`` are a DP release of this step
        (the adaptive clip's noisy count and the public expected batch size); without
        them, a private monitor has nothing to record.
        """
        step = check.positive_int("step", step, minimum=0)
        if step % self.every:
            return
        if not isinstance(norms, PerSampleNorms):
            raise TypeError(f"norms must be a PerSampleNorms, got {type(norms).__name__}")
        clip = None if clip_norm is None else check.positive("clip_norm", clip_norm)
        if (noisy_unclipped_fraction is None) != (expected_size is None):
            raise ValueError(
                "noisy_unclipped_fraction and expected_size: give both (a DP release of "
                "this step) or neither"
            )
        expected = None if expected_size is None else check.positive("expected_size", expected_size)
        noised = noisy_unclipped_fraction
        if noised is None and not self.release_exact_statistics_not_private:
            self._warn_nothing_private()
            return
        if noised is not None and not isinstance(noised, Tensor):
            noised = check.finite("noisy_unclipped_fraction", noised)
        values = None
        if self.release_exact_statistics_not_private:
            parts = _exact_parts(norms, clip, self.quantiles, self.by_layer)
            values = torch.cat([p.float().reshape(-1) for p in parts]).detach()
        row = _Row(int(step), len(norms), clip, expected, noised, norms.names, values)
        if values is None and not isinstance(noised, Tensor):
            self._emit([self._event(row, [])])  # all on the host already: record it now
            return
        with self._lock:
            self._rows.append(row)
            # a safety net: the recorder's own flushes drain every log_every steps
            every = getattr(self.recorder, "log_every", 50)
            full = self.recorder is not None and len(self._rows) >= 2 * every
        if full:
            self._emit(self._drain())

    def _warn_nothing_private(self) -> None:
        if not self._warned:
            self._warned = True
            _warn.warn(
                "PerSampleMonitor: no DP release was given for these per-example norms "
                "(attach the monitor through AdaptiveQuantileClip.attach(optimizer, "
                "monitor=...)), so nothing is recorded; to record exact statistics, which "
                f"epsilon does not cover, build it with {EXACT_FLAG}=True"
            )

    def flush(self) -> list[Event]:
        """Move buffered summaries to the host now and record them; returns those events."""
        events = self._drain()
        self._emit(events)
        if self.recorder is not None and events:
            self.recorder.flush()
        return events

    def _emit(self, events: list[Event]) -> None:
        if self.recorder is None:
            self.history.extend(events)
        else:
            for event in events:
                self.recorder.event(event)

    def _on_flush(self, batch: HostBatch) -> list[Event]:
        del batch
        return self._drain()  # the recorder records what a listener returns

    def _drain(self) -> list[Event]:
        """Buffered rows as events, their device values moved to the host in one transfer."""
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return []
        device_parts = [
            part
            for r in rows
            for part in (r.noised if isinstance(r.noised, Tensor) else None, r.values)
            if part is not None
        ]
        device = device_parts[0].device
        flat = torch.cat([p.to(device, torch.float64).reshape(-1) for p in device_parts])
        host, pos = flat.cpu().tolist(), 0
        events = []
        for row in rows:
            if isinstance(row.noised, Tensor):
                row.noised, pos = host[pos], pos + 1
            width = row.values.numel() if row.values is not None else 0
            events.append(self._event(row, host[pos : pos + width]))
            pos += width
        return events

    def _event(self, row: _Row, values: list[float]) -> Event:
        data: PerSampleData = {"exact": [], "noised": [], "clip_norm": row.clip_norm}
        if row.expected is not None:
            data["expected_n"] = row.expected
        parts = []
        if row.noised is not None:
            clipped = 1.0 - float(row.noised)
            data["noised_fraction_clipped"] = clipped
            data["noised"].append("noised_fraction_clipped")
            parts.append(f"about {100 * clipped:.0f}% clipped (noised count)")
        if self.release_exact_statistics_not_private:
            exact = self._exact_data(row, values)
            data.update(exact)  # type: ignore[typeddict-item]
            data["exact"] = list(exact)
            parts.insert(0, self._exact_text(row, exact))
        where = f"clip norm {row.clip_norm:.3g}" if row.clip_norm is not None else "no clip norm"
        message = f"per-example grad norms, {where}: " + "; ".join(parts)
        return Event(row.step, EVENT_KIND, message, dict(data))

    def _exact_data(self, row: _Row, values: list[float]) -> dict[str, Any]:
        k = len(self.quantiles)
        labels = [f"{q:g}" for q in self.quantiles]
        clipped, mean, top = values[k : k + 3]
        data: dict[str, Any] = {
            "n": row.n,
            "fraction_clipped": None if math.isnan(clipped) else clipped,
            "quantiles": dict(zip(labels, values[:k])),
            "mean": mean,
            "max": top,
        }
        if self.by_layer:
            rest = values[k + 3 :]
            names = row.names or tuple(str(i) for i in range(len(rest) // k))
            data["layers"] = {
                name or str(i): dict(zip(labels, rest[i * k : (i + 1) * k]))
                for i, name in enumerate(names)
            }
        return data

    def _exact_text(self, row: _Row, exact: dict[str, Any]) -> str:
        qs = exact["quantiles"]
        label = "0.5" if "0.5" in qs else next(iter(qs))
        text = f"exact (not private) over {row.n}: q{label} {qs[label]:.3g}"
        if exact["fraction_clipped"] is not None:
            text += f", {100 * exact['fraction_clipped']:.0f}% clipped"
        return text


def _exact_parts(
    norms: PerSampleNorms, clip: float | None, quantiles: tuple[float, ...], by_layer: bool
) -> list[Tensor]:
    """Exact statistics, on the device: quantiles, fraction clipped, mean, max[, layers]."""
    total = norms.total
    parts = [norms.quantiles(quantiles)]
    if len(norms):
        clipped = (
            norms.fraction_clipped(clip).reshape(1)
            if clip is not None
            else torch.full((1,), math.nan, device=total.device)
        )
        parts += [clipped, total.float().mean().reshape(1), total.float().max().reshape(1)]
    else:
        parts.append(torch.full((3,), math.nan, device=total.device))
    if by_layer:
        parts.append(norms.quantiles(quantiles, by_layer=True).reshape(-1))
    return parts


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _quantiles(values: object) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"quantiles must be a sequence of numbers, got {type(values).__name__}")
    quantiles = tuple(check.in_range("quantiles", q, 0.0, 1.0) for q in values)
    if not quantiles:
        raise ValueError("quantiles: give at least one quantile")
    return quantiles
