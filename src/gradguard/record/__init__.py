"""Recording: the Recorder, the SQLite run store, and logger sinks.

Sinks for optional backends live in :mod:`gradguard.record.sinks` and import their
backend only when constructed (``TensorBoardSink``, ``WandbSink``, ``MLflowSink``,
``ConsoleSink`` are also reachable from here, lazily).
"""

from __future__ import annotations

from typing import Any

from ..schema import STEP_COLUMNS, Event, HostBatch, Sink, SkipReason
from .recorder import Recorder
from .store import SCHEMA_VERSION, RunInfo, RunStore, StoreError

_LAZY_SINKS = ("TensorBoardSink", "WandbSink", "MLflowSink", "ConsoleSink")

__all__ = [
    "SCHEMA_VERSION",
    "STEP_COLUMNS",
    "ConsoleSink",
    "Event",
    "HostBatch",
    "MLflowSink",
    "Recorder",
    "RunInfo",
    "RunStore",
    "Sink",
    "SkipReason",
    "StoreError",
    "TensorBoardSink",
    "WandbSink",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SINKS:
        from . import sinks

        return getattr(sinks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
