"""Fault isolation: a sink that raises is disabled with one warning; training goes on."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any


class Guarded:
    """Wraps a sink (or listener); the first exception disables it with one RuntimeWarning."""

    def __init__(self, target: Any, label: str | None = None) -> None:
        self.target = target
        self.label = label or _describe(target)
        self.failed: BaseException | None = None

    @property
    def alive(self) -> bool:
        return self.failed is None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``target.method(*args)``; return ``None`` if disabled or it raised."""
        if self.failed is not None:
            return None
        fn: Callable[..., Any] = getattr(self.target, method) if method else self.target
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self._disable(method, e)
            return None

    def _disable(self, method: str, error: Exception) -> None:
        self.failed = error
        where = f" in {method}()" if method else ""
        warnings.warn(
            f"gradguard: {self.label} failed{where} and is disabled for the rest of the run "
            f"({type(error).__name__}: {error}); training goes on",
            RuntimeWarning,
            stacklevel=4,
        )
        close = getattr(self.target, "close", None)
        if method != "close" and callable(close):
            with contextlib.suppress(Exception):  # a broken sink may fail to close too
                close()


def _describe(target: Any) -> str:
    path = getattr(target, "path", None)
    name = type(target).__name__ if not callable(target) or hasattr(target, "write") else getattr(
        target, "__qualname__", repr(target)
    )
    return f"{name}({str(path)!r})" if path is not None else name
