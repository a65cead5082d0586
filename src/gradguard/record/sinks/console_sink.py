"""Console sink: one compact line per flush (rich when installed, else ``print``)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ...schema import Event, HostBatch
from ._episodes import EpisodeLog, describe, step_of


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def summarize(batch: HostBatch) -> str:
    """``steps a-b | norm med (min..max) | clipped k/n | skipped k/n | loss x | lr y``."""
    cols = batch.columns
    norms = [v for v in cols["total_norm"] if not math.isnan(v)]
    n = len(batch)
    parts = [f"steps {batch.steps[0]}-{batch.steps[-1]}" if n else "no steps"]
    if norms:
        ordered = sorted(norms)
        parts.append(
            f"norm {_fmt(ordered[len(ordered) // 2])} ({_fmt(ordered[0])}..{_fmt(ordered[-1])})"
        )
    if n:
        parts.append(f"clipped {int(sum(v == 1.0 for v in cols['clipped']))}/{n}")
        parts.append(f"skipped {int(sum(v == 1.0 for v in cols['skipped']))}/{n}")
    for col in ("loss", "lr", "loss_scale"):
        if col not in batch.absent and n:
            parts.append(f"{col} {_fmt(cols[col][-1])}")
    return "gradguard | " + " | ".join(parts)


class ConsoleSink:
    """Prints one line per flush, one per event, and two per episode (opened, closed)."""

    def __init__(self, file: TextIO | None = None, use_rich: bool | None = None) -> None:
        self.file = file
        self._episodes = EpisodeLog()
        self._console: Any = None
        if use_rich is not False:
            try:
                from rich.console import Console
            except ImportError:
                if use_rich:
                    raise ImportError(
                        "ConsoleSink(use_rich=True) needs rich: pip install 'gradguard[console]'"
                    ) from None
            else:
                self._console = Console(file=file, highlight=False)

    def _print(self, text: str, style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(text, style=style, markup=False)
        else:
            print(text, file=self.file or sys.stdout, flush=True)

    def start(self, names: Sequence[str], config: dict) -> None:
        self._print(f"gradguard | recording {len(names)} tensors")

    def write(self, batch: HostBatch) -> None:
        self._print(summarize(batch))

    def write_events(self, events: Sequence[Event]) -> None:
        for e, phase in self._episodes.select(events):
            step = step_of(e, phase)
            self._print(f"gradguard | step {step} | {e.kind}: {describe(e, phase)}", style="yellow")

    def close(self) -> None:
        return None
