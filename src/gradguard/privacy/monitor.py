"""Record the distribution of per-example gradient norms through a :class:`Recorder`.

Each observed step becomes one ``"per_sample"`` event (the store schema is unchanged)::

    data = {"n": examples, "clip_norm": C or None, "fraction_clipped": share with norm > C,
            "quantiles": {"0.5": median, ...}, "mean": ..., "max": ...,
            "layers": {name: {"0.5": ..., ...}}}          # only with by_layer=True

Observing costs a few device ops and no host sync: summaries stay on the device until
the recorder flushes (one extra transfer per flush, for all buffered steps).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _validate as check
from ..schema import Event, EventKind, HostBatch
from .per_sample import DEFAULT_QUANTILES, PerSampleNorms

EVENT_KIND = EventKind.PER_SAMPLE


class PerSampleMonitor:
    """Summarise per-example norms each step and record them as events.

    Args:
        recorder: a :class:`~gradguard.record.Recorder` (e.g. ``guard.recorder``); the
            summaries are written at its flushes. ``None`` keeps them in :attr:`history`.
        quantiles: quantiles to record, each in [0, 1].
        by_layer: also record the quantiles of each tensor's per-example norms.
        every: observe one step in ``every``.
    """

    def __init__(
        self,
        recorder: Any = None,
        *,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        by_layer: bool = False,
        every: int = 1,
    ) -> None:
        self.quantiles = tuple(check.in_range("quantiles", q, 0.0, 1.0) for q in quantiles)
        if not self.quantiles:
            raise ValueError("quantiles: give at least one quantile")
        self.by_layer = bool(by_layer)
        self.every = check.positive_int("every", every)
        self.recorder = recorder
        self.history: list[Event] = []
        self._rows: list[tuple[int, int, float | None, tuple[str, ...], Tensor]] = []
        self._lock = threading.Lock()
        if recorder is not None:
            recorder.add_listener(self._on_flush)

    def observe(self, step: int, norms: PerSampleNorms, clip_norm: float | None = None) -> None:
        """Buffer the summary of one step's per-example ``norms`` (no host sync)."""
        if step % self.every:
            return
        total = norms.total
        parts = [norms.quantiles(self.quantiles)]
        n = len(norms)
        if n:
            clipped = (
                (total > clip_norm).float().mean().reshape(1)
                if clip_norm is not None
                else torch.full((1,), math.nan, device=total.device)
            )
            parts += [clipped, total.float().mean().reshape(1), total.float().max().reshape(1)]
        else:
            parts.append(torch.full((3,), math.nan, device=total.device))
        if self.by_layer:
            parts.append(norms.quantiles(self.quantiles, by_layer=True).reshape(-1))
        row = torch.cat([p.float() for p in parts]).detach()
        with self._lock:
            self._rows.append((int(step), n, clip_norm, norms.names, row))

    def flush(self) -> list[Event]:
        """Move buffered summaries to the host now and record them; returns the events."""
        events = self._drain()
        if self.recorder is not None and events:
            for event in events:
                self.recorder.event(event)
            self.recorder.flush()
        return events

    def _on_flush(self, batch: HostBatch) -> list[Event]:
        del batch
        return self._drain()

    def _drain(self) -> list[Event]:
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return []
        device = rows[0][4].device
        flat = torch.cat([r[4].to(device) for r in rows]).cpu().tolist()
        events, pos = [], 0
        k = len(self.quantiles)
        for step, n, clip, names, row in rows:
            values = flat[pos : pos + row.numel()]
            pos += row.numel()
            events.append(self._event(step, n, clip, names, values, k))
        if self.recorder is None:
            self.history.extend(events)
        return events

    def _event(self, step, n, clip, names, values, k) -> Event:
        labels = [f"{q:g}" for q in self.quantiles]
        qs = dict(zip(labels, values[:k]))
        clipped, mean, top = values[k : k + 3]
        data: dict[str, Any] = {
            "n": n,
            "clip_norm": clip,
            "fraction_clipped": None if math.isnan(clipped) else clipped,
            "quantiles": qs,
            "mean": mean,
            "max": top,
        }
        if self.by_layer:
            rest = values[k + 3 :]
            data["layers"] = {
                name or str(i): dict(zip(labels, rest[i * k : (i + 1) * k]))
                for i, name in enumerate(names or [""] * (len(rest) // k))
            }
        median = qs.get("0.5")
        text = f"median {median:.3g}" if median is not None else f"q{labels[0]} {values[0]:.3g}"
        if clip is not None and data["fraction_clipped"] is not None:
            text += f", {100 * clipped:.0f}% clipped at {clip:.3g}"
        return Event(step, EVENT_KIND, f"per-example grad norms over {n}: {text}", data)
