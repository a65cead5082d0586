"""Logger sinks; each imports its backend (tensorboard, wandb, mlflow, rich) only when built."""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "TensorBoardSink": "tensorboard_sink",
    "WandbSink": "wandb_sink",
    "MLflowSink": "mlflow_sink",
    "ConsoleSink": "console_sink",
}

__all__ = ["ConsoleSink", "MLflowSink", "TensorBoardSink", "WandbSink"]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
